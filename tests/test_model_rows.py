"""Model rows (params `models`): the paper's rows from one config, validated with one-line errors, and DVC's
per-row caption stages: a new training recomputes only our rows, the released checkpoints' rows stay cached, and
the released rows alone evaluate without train_grpo_lora (`make paper-released`)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repic.core.io import RepicError
from repic.core.layout import SETTINGS, caption_stage, model_labels, model_rows, retrieve_stage
from repic.core.params import deep_merge, trained_rows, validate, without_training

from .conftest import REPO


def _default() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _paper() -> dict:
    return deep_merge(_default(), yaml.safe_load((REPO / "configs/paper.yaml").read_text()))


def test_embedded_default_keeps_base_and_trained():
    params = _default()
    assert [(r.name, r.kind, r.path) for r in model_rows(params)] == [
        ("base", "model", "data/models/base"), ("trained", "adapter", "results/train/adapter"),
        ("merged", "model", "results/merged/model")]
    assert params["judge_llm"]["reference"] == "trained"


def test_paper_lists_the_papers_rows_in_order_and_replaces_the_default_list():
    params = _paper()
    validate(params, "paper")
    assert model_labels(params) == {
        "base": "Qwen2.5-VL-7B (zero-shot)", "rap_qwen": "RAP-Qwen (SFT)", "repic_lora": "RePIC (released LoRA)",
        "repic_merged": "RePIC (released merged)", "trained": "Ours (LoRA)", "merged": "Ours (merged)"}
    rows = {r.name: r for r in model_rows(params)}
    assert rows["repic_lora"].kind == "adapter" and rows["repic_merged"].kind == "model"
    # every released row is a fetch_data source (a record: true one, pinned on first download)
    sources = params["fetch_data"]["sources"]
    for name, source in (("repic_lora", "released_lora"), ("repic_merged", "released_repic"),
                         ("rap_qwen", "released_rap")):
        assert rows[name].path == "data/repic/" + sources[source]["dest"].partition("/")[2]
        assert sources[source]["record"] is True
    assert rows["base"].path == params["base"]["base_model"]
    assert params["judge_llm"]["reference"] == "repic_lora"  # RePIC compared every baseline with its model
    assert trained_rows(params) == ["trained", "merged"]
    assert list(without_training(params)["models"]) == ["base", "rap_qwen", "repic_lora", "repic_merged"]


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["models"].update({"new row": {"label": "x", "kind": "model", "path": "data/models/base"}}),
     "params.yaml: models.new row: model row names are letters, digits, _ and - (a DVC stage name and a file-name "
     "part), starting with a letter"),
    (lambda p: p["models"]["base"].update({"adapter": "x"}),
     "params.yaml: models.base.adapter: unknown key (expected one of ['external', 'kind', 'label', 'path'])"),
    (lambda p: p["models"]["base"].pop("label"), "params.yaml: models.base: 'label' is a required property"),
    (lambda p: p["models"]["base"].update({"kind": "lora"}),
     "params.yaml: models.base.kind: 'lora' is not one of ['model', 'adapter']"),
    (lambda p: p.update({"models": {}}), "params.yaml: models: {} should be non-empty"),
    (lambda p: p["judge_llm"].update({"reference": "ours"}),
     "params.yaml: judge_llm.reference: 'ours' is not a model row (models: base, trained, merged)"),
    (lambda p: p["models"]["base"].update({"path": "/models/qwen"}),
     "params.yaml: models.base.path: '/models/qwen' is not produced by the DAG (expected inside one of "
     "data/models/base, data/world, results/train, results/merged: fetch a released checkpoint with a "
     "fetch_data.sources entry, or mark a local folder outside the project `external: true`)"),
])
def test_bad_rows_are_one_line_errors(edit, message):
    params = _default()
    edit(params)
    with pytest.raises(RepicError) as err:
        validate(params)
    assert str(err.value) == message


def test_a_released_row_must_be_a_fetch_data_source():
    params = _paper()
    params["models"]["extra"] = {"label": "x", "kind": "model", "path": "data/repic/released/other"}
    with pytest.raises(RepicError, match=r"^paper: models.extra.path: 'data/repic/released/other': no fetch_data"
                                         r".sources entry lands there"):
        validate(params, "paper")
    params = _paper()
    params["judge_llm"]["reference"] = "trained"
    with pytest.raises(RepicError, match="judge_llm.reference: 'trained' is made by training"):
        without_training(params)


def test_adding_a_model_is_one_params_entry(tmp_path):
    """One entry in `models` gives one more caption stage per setting, named after it, depending on its weights."""
    from dvc.repo import Repo

    params = _default()
    params["models"]["extra"] = {"label": "extra", "kind": "model", "path": "data/world/extra"}
    validate(params)
    repo = _scratch_checkout(tmp_path, params)
    stages = {s.name: s for s in Repo(str(repo)).index.stages}
    for setting in SETTINGS:
        stage = stages[caption_stage(setting, "extra")]
        assert "--row extra --model data/world/extra" in stage.cmd
        assert "data/world/extra" in [d.def_path for d in stage.deps]
        assert [o.def_path for o in stage.outs] == [f"results/captions/{setting}/extra"]
        assert "results/train/adapter" not in [d.def_path for d in stages[caption_stage(setting, "base")].deps]


# ---------------------------------------------------------------------------------------- DVC, per-row stages
# Every stage of the real dvc.yaml (resolved by DVC for a params file) with its real deps, outs and params, and a
# stand-in command: it logs that it ran and writes each out from a digest of its deps and params, so a changed input
# changes every output downstream, as the real stages' outputs would.
FAKE = """
import hashlib, json, os, sys
from pathlib import Path
import yaml
stage, deps, outs, inner, plots, keys = sys.argv[1], *(a.split("|") if a else [] for a in sys.argv[2:7])
h = hashlib.sha256()
params = yaml.safe_load(Path("params.yaml").read_text())
for key in keys:  # the values of its params too, as a real stage's outputs depend on them
    node = params
    for part in key.split("."):
        node = node[part]
    h.update(f"{key}={json.dumps(node, sort_keys=True)}".encode())
for dep in sorted(deps):
    for p in sorted([Path(dep)] if Path(dep).is_file() else Path(dep).rglob("*")):
        if p.is_file():
            h.update(str(p).encode() + p.read_bytes())
with open(os.environ.get("RAN_LOG", "ran.log"), "a") as log:  # a queued experiment runs in a temporary copy
    log.write(f"{os.environ.get('DVC_EXP_NAME', '-')} {stage}\\n")
for out in map(Path, outs):  # and what other stages read inside an out folder (a released checkpoint)
    for target in [out if out.suffix else out / "content.txt"] + [Path(p) for p in inner if p.startswith(f"{out}/")]:
        target.parent.mkdir(parents=True, exist_ok=True)  # a .json out (a metric) is JSON, with a number
        target.write_text(f'{{"digest": "{h.hexdigest()}", "value": {int(h.hexdigest()[:6], 16)}}}'
                          if target.suffix == ".json" else h.hexdigest())
for spec in plots:  # a file of dvc.yaml's `plots`: records with its fields, values from the digest
    path, fields = spec.split("=")
    value = int(h.hexdigest()[:4], 16)
    Path(path).write_text(json.dumps([{f: value + i + j for j, f in enumerate(fields.split(","))} for i in range(3)]))
"""


def _scratch_checkout(tmp_path: Path, params: dict) -> Path:
    """dvc.yaml and the given params.yaml in a scratch git+DVC repository (DVC resolves foreach against them)."""
    repo = tmp_path / "resolve"
    if not repo.is_dir():
        repo.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def _plot_fields(plots: list[dict]) -> dict[str, list[str]]:
    """The fields each data file of dvc.yaml's top-level `plots` must hold (its x and y fields)."""
    fields: dict[str, list[str]] = {}
    for plot in plots:
        (props,) = plot.values()
        for path, ys in props["y"].items():
            names = [props["x"]] + (ys if isinstance(ys, list) else [ys])
            fields[path] = list(dict.fromkeys(fields.get(path, []) + names))
    return fields


def _stand_in_pipeline(tmp_path: Path, params: dict) -> Path:
    """A git+DVC repository running the real DAG's stages, as DVC resolves them for `params`, with the stand-in
    command; called again with other params, it rewrites the stages (as DVC resolves dvc.yaml again)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    resolved = _scratch_checkout(tmp_path, params)
    real = [s for s in Repo(str(resolved)).index.stages if s.cmd]
    work = tmp_path / "work"
    if not work.is_dir():
        work.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=work, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=work, check=True)
    outs = {o.def_path for s in real for o in s.outs}
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text()).get("plots", [])
    plot_fields = _plot_fields(plots)
    every_dep = {d.def_path for s in real for d in s.deps if not isinstance(d, ParamsDependency)}
    stages = {}
    for stage in real:
        deps = [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)]
        keys = [k for d in stage.deps if isinstance(d, ParamsDependency) for k in d.params]
        for dep in deps:  # inputs no stage makes (code, pins): present, fixed content
            path = work / dep
            if not any(dep == o or dep.startswith(o + "/") or o.startswith(dep + "/") for o in outs) \
                    and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{dep}\n")
        out_paths = [o.def_path for o in stage.outs]
        inner = sorted(d for d in every_dep if any(d.startswith(o + "/") for o in out_paths))
        its_plots = [f"{f}={','.join(fields)}" for f, fields in plot_fields.items()
                     if any(f == o or f.startswith(o + "/") for o in out_paths)]
        entry = {"cmd": f"python fake.py {stage.name} '{'|'.join(deps)}' '{'|'.join(out_paths)}' '{'|'.join(inner)}' "
                        f"'{'|'.join(its_plots)}' '{'|'.join(keys)}'", "deps": deps, "params": keys}
        for out in stage.outs:  # each out as dvc.yaml declares it: a metric, uncached, persistent
            flags = {k: v for k, v in (("cache", out.use_cache), ("persist", out.persist)) if v != (k == "cache")}
            entry.setdefault("metrics" if out.metric else "outs", []).append(
                {out.def_path: flags} if flags else out.def_path)
        stages[stage.name.replace("@", "-AT-")] = entry
    (work / "fake.py").write_text(FAKE)
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages, "plots": plots}, sort_keys=False))
    shutil.copytree(REPO / ".dvc" / "plots", work / ".dvc" / "plots", dirs_exist_ok=True)  # plot templates
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def _repro(work: Path, *targets: str) -> set[str]:
    """The stages `dvc repro` ran (DVC names, `caption_single@trained`)."""
    log = work / "ran.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", *targets], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {line.split()[1] for line in log.read_text().splitlines()} if log.exists() else set()


@pytest.mark.slow  # 5 dvc repro runs of the whole stand-in DAG: 25-60 s on 2 shared cores
def test_training_again_recomputes_only_our_rows_and_released_rows_need_no_training(tmp_path):
    """The paper's rows: `make paper-released` (the released rows alone, `dvc repro score judge_llm`) runs no
    training; putting our row back then computes only our row's captions, and a new training recomputes only
    them again: the base, RAP-Qwen and RePIC rows' caption stages never rerun, nor does retrieval (retrieve@<setting>:
    new model rows read the references it found for the released ones). (The embedded default's rows, base
    and trained, are the same two kinds of row through the same `foreach`: this is the one test of the property.)"""
    paper = _paper()
    released = without_training(paper)
    work = _stand_in_pipeline(tmp_path, released)
    ran = _repro(work, "score", "judge_llm")
    captions = {caption_stage(s, m) for s in SETTINGS for m in released["models"]}
    retrieval = {retrieve_stage(s) for s in SETTINGS}  # once per setting, for every row
    assert ran == {"fetch_data", "build_db", *retrieval, *captions, "score", "judge_llm"}  # no subset, no training
    _stand_in_pipeline(tmp_path, paper)  # `make paper`: our row is back, retrieval is not run again
    ran = _repro(work)
    ours = {caption_stage(s, m) for s in SETTINGS for m in ("trained", "merged")}
    assert ran == {"subset_2k", "train_grpo_lora", "merge_lora", *ours, "score", "judge_llm", "report"}
    assert _repro(work) == set()
    # a new training (here: its code changed) changes the adapter: our row only is captioned again
    train_code = work / "stages/train_grpo_lora.py"
    train_code.write_text(train_code.read_text() + "# changed\n")
    ran = _repro(work)
    assert ran == {"train_grpo_lora", "merge_lora", *ours, "score", "judge_llm", "report"}


@pytest.mark.slow  # dvc repro runs of the whole stand-in DAG: 14 s alone, 34 s beside the background runs
def test_embedded_default_rows_the_same_way(tmp_path):
    """The embedded default (base, trained, merged): new training output reruns caption_<setting>@trained and
    @merged (the merge of the new adapter), not @base. An edit to a module that cannot change an output
    (NOT_STAGE_DEPS: a help string, a progress line) reruns nothing; an edit to a reward reruns training, and its
    rows' captions, not retrieval (retrieve@<setting>, once per setting for every row)."""
    from repic.core.layout import NOT_STAGE_DEPS

    params = copy.deepcopy(_default())
    work = _stand_in_pipeline(tmp_path, params)
    retrieval = {retrieve_stage(s) for s in SETTINGS}
    assert _repro(work) >= {caption_stage(s, m) for s in SETTINGS for m in ("base", "trained", "merged")} | retrieval
    for module in NOT_STAGE_DEPS:
        (work / module).parent.mkdir(parents=True, exist_ok=True)
        (work / module).write_text((REPO / module).read_text().replace("help=", "help='edited ' + ") + "# edited\n")
    assert _repro(work) == set()
    train_code = work / "repic/train/rewards.py"
    train_code.write_text(train_code.read_text() + "# changed\n")
    assert {s for s in _repro(work) if s.startswith(("caption_", "retrieve"))} == {
        caption_stage(s, m) for s in SETTINGS for m in ("trained", "merged")}


@pytest.mark.slow  # reason: three `dvc repro` runs of the stand-in DAG, as the test above (a minute on 2 loaded cores)
def test_an_external_row_evaluates_a_local_checkpoint_dvc_tracks_by_content(tmp_path):
    """A user's own checkpoint outside the project is one params entry (`external: true`, an absolute path):
    `make paper-released` captions and scores it with the released rows, and DVC tracks the folder by content: a
    changed file recaptions that row only."""
    ckpt = tmp_path / "elsewhere" / "my-checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights v1")
    paper = _paper()
    paper["models"]["mine"] = {"label": "Mine", "kind": "model", "path": str(ckpt), "external": True}
    validate(paper, "paper")
    released = without_training(paper)
    assert "mine" in released["models"]
    for bad in ("relative/folder", str(tmp_path / "absent")):
        params = copy.deepcopy(paper)
        params["models"]["mine"]["path"] = bad
        with pytest.raises(RepicError, match=rf"^paper: models.mine.path: '{bad}': an external row's weights are an "
                                             r"existing folder, by its absolute path \(DVC tracks it by content\)$"):
            validate(params, "paper")
    work = _stand_in_pipeline(tmp_path, released)
    mine = {caption_stage(s, "mine") for s in SETTINGS}
    assert mine <= _repro(work, "score", "judge_llm")
    assert _repro(work, "score", "judge_llm") == set()
    (ckpt / "model.safetensors").write_bytes(b"weights v2")
    assert _repro(work, "score", "judge_llm") == {*mine, "score", "judge_llm"}
