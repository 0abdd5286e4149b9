"""Paths come from one place: dvc.yaml's outs are what `repic.core.layout` says each stage writes, each stage's
`--out` is the layout's folder, and the synthetic world writes where params.yaml's `base.data` looks."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from repic.core import layout

from .conftest import REPO, dvc_stages, resolve_dvc


def _dvc() -> tuple[dict, dict]:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    return dvc_stages(), params


def _declared_outs(stage: dict, params: dict) -> set[str]:
    return {resolve_dvc(next(iter(o)) if isinstance(o, dict) else o, params)
            for o in stage.get("outs", []) + stage.get("metrics", [])}


def test_dvc_outs_are_the_layouts_outputs_of_each_stage():
    stages, params = _dvc()
    expected = layout.stage_outs(params["base"], params["models"])
    assert set(stages) == set(expected), "dvc.yaml's stages and the layout's differ"
    for name, stage in stages.items():
        assert _declared_outs(stage, params) == set(expected[name]), f"dvc.yaml: stage {name}: outs"


def test_each_stage_writes_inside_the_folder_its_command_is_given():
    """A stage writes `<--out>/<layout file>`: its --out (and score's --tables) is the layout's folder of it."""
    stages, params = _dvc()
    for name, folder in layout.stage_dirs(params["models"]).items():
        cmd = shlex.split(resolve_dvc(stages[name]["cmd"], params))
        given = {cmd[i + 1] for i, option in enumerate(cmd[:-1]) if option in ("--out", "--out-data", "--tables")}
        assert given == set(folder if isinstance(folder, tuple) else (folder,)), name


def test_inputs_a_command_reads_are_outputs_the_layout_names():
    """The files one stage hands to the next (`--train`, `--heldout`, `--adapter`, `--metrics`, ...)."""
    stages, params = _dvc()
    outs = {o for stage in stages.values() for o in _declared_outs(stage, params)}
    named = {"--train": f"{layout.SUBSET_DIR}/{layout.SUBSET_TRAIN}",
             "--heldout": f"{layout.SUBSET_DIR}/{layout.SUBSET_HELDOUT}",
             "--adapter": f"{layout.TRAIN_DIR}/{layout.TRAIN_ADAPTER}",
             "--metrics": f"{layout.SCORE_DIR}/{layout.METRICS_FILES['repic']}",
             "--train-log": f"{layout.TRAIN_DIR}/{layout.TRAIN_LOG}",
             "--slots": f"{layout.SCORE_DIR}/{layout.SLOTS}",
             "--index": layout.DB_DIR, "--captions": layout.CAPTIONS_DIR}
    seen = set()
    for name, stage in stages.items():
        cmd = shlex.split(resolve_dvc(stage["cmd"], params))
        for option, value in zip(cmd, cmd[1:]):
            if option in named:
                assert value == named[option], f"dvc.yaml: stage {name}: {option} {value}"
                # an out, inside one (data/subset/train_subset.json) or holding them (results/captions)
                assert any(o == value or value.startswith(o + "/") or o.startswith(value + "/") for o in outs), (
                    name, option)
                seen.add(option)
    assert seen == set(named)


def test_a_caption_stage_per_setting_and_its_readers_depend_on_each():
    stages, params = _dvc()
    assert {n for n in stages if n.startswith("caption_")} == {
        layout.caption_stage(s, m) for s in layout.SETTINGS for m in params["models"]}
    folders = {f"{layout.CAPTIONS_DIR}/{s}" for s in layout.SETTINGS}
    for reader in ("score", "judge_llm", "report"):  # they read every setting's captions through --captions
        assert folders <= set(stages[reader]["deps"]), reader


def test_retrieval_runs_once_per_setting_and_every_caption_row_reads_it():
    """retrieve@<setting> is the one stage that reads the index (data/db): each caption stage of the setting reads its
    folder instead (`--retrieval`), and score and report take recall@k from all of them."""
    stages, params = _dvc()
    assert {n for n in stages if n.startswith("retrieve")} == {layout.retrieve_stage(s) for s in layout.SETTINGS}
    for setting in layout.SETTINGS:
        folder = str(layout.retrieval_stage_dir(layout.RETRIEVAL_DIR, setting))
        assert "data/db" in stages[layout.retrieve_stage(setting)]["deps"]
        for model in params["models"]:
            stage = stages[layout.caption_stage(setting, model)]
            cmd = shlex.split(resolve_dvc(stage["cmd"], params))
            assert cmd[cmd.index("--retrieval") + 1] == folder and folder in stage["deps"]
            assert "data/db" not in stage["deps"] and "--index" not in cmd
            # the retrieval options are the retrieve stage's params, not a caption row's
            assert not any(k in p for p in stage["params"] for k in ("detector", "retrieval", "top_k")), stage["params"]
        for reader in ("score", "report"):
            assert folder in stages[reader]["deps"], reader
    for reader in ("score", "report"):
        cmd = shlex.split(resolve_dvc(stages[reader]["cmd"], params))
        assert cmd[cmd.index("--retrieval") + 1] == layout.RETRIEVAL_DIR


def test_synthetic_world_writes_where_params_look(tmp_path):
    """params.yaml's base.data paths (embedded default) are the files the synthetic world writes."""
    from repic.synthetic import world

    _, params = _dvc()
    data = params["base"]["data"]
    root = Path(data["root"])
    (dataset,) = data["datasets"]
    assert Path(dataset["database"]) == root / world.DATABASE_DIR / "database_mod.json"
    assert {s: Path(q) for s, q in dataset["queries"].items()} == {
        s: root / world.QUERY_TEMPLATES_DIR / f for s, f in world.QUERY_FILES.items()}
    assert Path(data["train_json"]) == root / world.TRAIN_DIR / "train.json"
    assert set(world.QUERY_FILES) == set(layout.SETTINGS)


def test_caption_file_names():
    assert layout.caption_file("trained", "retrieval") == "trained_retrieval.json"
    assert [layout.run_name(m, d) for m, d in layout.runs(["base", "trained"])] == [
        "base_skip", "trained_skip", "base_retrieval", "trained_retrieval"]
    assert layout.caption_folder("results/captions", "multi2", "trained", "synthetic") == Path(
        "results/captions/multi2/trained/synthetic")
