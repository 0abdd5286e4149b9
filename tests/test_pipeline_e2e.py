"""End-to-end: the embedded DAG in a scratch clone of the working tree, with `dvc repro` as a user runs it.

Properties of DVC's wiring that need no real stage are tested once elsewhere, through DVC on the real dvc.yaml
with stand-in commands (seconds, not a retraining): a new training recaptions only our model row
(test_model_rows.py), a failing stage keeps its `cache: false` metrics and `dvc checkout` restores the rest
(test_dvc_params.py::test_a_failing_stage_loses_no_output, every stage's outs), every declared param reruns its
stage (test_dvc_params.py). Here: what only the real stages show."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

SETTINGS, MODES, MODELS = ("single", "multi2", "multi4"), ("skip", "retrieval"), ("base", "trained", "merged")


def _sh(args: list[str], cwd: Path, timeout: int = 1200) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def pipeline(embedded_dag: Path) -> Path:
    """A scratch git checkout of the working tree with the embedded DAG reproduced once by `dvc repro`: the run
    conftest.py starts in the background once the tests are collected."""
    return embedded_dag


def test_metrics_cover_every_setting_mode_and_model(pipeline):
    metrics = json.loads((pipeline / "results/score/metrics.json").read_text())
    for s in SETTINGS:
        for m in MODES:
            for model in MODELS:
                cell = metrics[s]["synthetic"][m][model]  # setting -> dataset -> mode -> model
                assert {"precision", "recall", "f1", "n_slots"} <= set(cell)
                assert 0.0 <= cell["f1"] <= 100.0 and cell["n_slots"] > 0
    table = (pipeline / "results/score/table.md").read_text()
    assert "| trained |" in table and "| base |" in table and "| merged |" in table and "4-concept" in table
    strict = json.loads((pipeline / "results/score/metrics_strict.json").read_text())
    assert set(strict) == set(SETTINGS)
    for protocol in ("repic", "strict"):
        for table_name in ("table1_single", "table2_multi"):
            for ext in ("md", "csv", "tex"):
                assert (pipeline / f"results/tables/{table_name}_{protocol}.{ext}").stat().st_size > 0
    # `make repro`'s time is measured on an idle 2-core machine (README: 849 s, 2026-12-06); this bound only
    # guards against gross regressions, in CPU seconds (its processes', from wait4): the run shares the machine
    # with other tests (conftest). 878 CPU s, 1,704 s wall, on the shared machine under load; 1,396 CPU s in a fresh
    # clone's make test with the merged row and 1-thread warm-up (2026-12-06): the bound leaves room for slower CPUs.
    assert float((pipeline / "repro.cpu_seconds").read_text()) < 2400


def test_every_stage_wrote_its_artifacts(pipeline):
    import pandas as pd

    manifest = json.loads((pipeline / "data/subset/manifest.json").read_text())
    assert set(manifest["counts"]) == {"yes_no", "iou", "yes_no_name", "yes_no_name_multi"}
    assert len(pd.read_parquet(pipeline / "data/subset/train_subset.parquet")) == manifest["size"]
    assert (pipeline / "results/train/adapter/adapter_config.json").is_file()
    assert json.loads((pipeline / "data/db/manifest.json").read_text()) == {"built": ["synthetic"], "skipped": {}}
    log = [json.loads(line) for line in (pipeline / "results/train/log.jsonl").read_text().splitlines()]
    assert log and {"loss", "kl", "reward", "rewards/object_consistency/mean"} <= set(log[0]) | set(log[-1])
    heldout = json.loads((pipeline / "results/train/summary.json").read_text())["heldout"]
    assert heldout["n"] == 40  # train_grpo_lora.heldout_eval, drawn from data/subset/heldout.json
    rewards = {"object_consistency", "visual_localization", "identity_consistency"}
    assert set(heldout["base"]) == set(heldout["trained"]) == rewards
    assert all(0.0 <= v <= 1.0 for who in ("base", "trained") for v in heldout[who].values())
    assert len(json.loads((pipeline / "data/subset/heldout.json").read_text())) == 64 - manifest["size"]
    repro_log = (pipeline / "repro.log").read_text()
    for s in SETTINGS:
        # retrieval ran once per setting and dataset (retrieve@<setting>), whatever the number of model rows
        assert repro_log.count(f"Running stage 'retrieve@{s}'") == 1
        assert len(re.findall(rf"INFO __main__: retrieved {s} synthetic: \d+ queries", repro_log)) == 1
        retrieved = pipeline / f"results/retrieval/{s}/synthetic/retrieval.json"
        retrieval = json.loads(retrieved.read_text())
        assert 0.0 <= retrieval["recall_at_k"] <= 1.0 and retrieval["setting"] == s
        assert all(q["retrieved"] == [h["key"] for h in q["hits"] if h["key"] and not h["missing"]]
                   for q in retrieval["per_query"])
        recall = json.loads((pipeline / "results/score/recall.json").read_text())[s]["synthetic"]
        assert recall == {"k": retrieval["k"], "recall_at_k": retrieval["recall_at_k"],
                          "n_queries": retrieval["n_queries"]}
        for model in MODELS:  # one caption stage per model row: results/captions/<setting>/<model>/<dataset>/
            folder = pipeline / f"results/captions/{s}/{model}/synthetic"
            rows = json.loads((folder / f"{model}_retrieval.json").read_text())
            assert all(len(r) == 4 and isinstance(r[2], str) for r in rows)
            assert len(rows) == retrieval["n_queries"]
            # every row read the one retrieval of its setting (by construction: the same references)
            read = json.loads((folder / "caption_report.json").read_text())["retrieval"]
            assert read == {"file": str(retrieved.relative_to(pipeline)),
                            "sha256": hashlib.sha256(retrieved.read_bytes()).hexdigest()}
            assert len(pd.read_parquet(folder / "captions.parquet")) == 2 * len(rows)
    merge = json.loads((pipeline / "results/merged/merge_report.json").read_text())
    assert merge["ok"] and merge["captions_identical_fp32"] and (pipeline / "results/merged/model").is_dir()
    page = (pipeline / "results/report/index.html").read_text()
    assert page.count('class="query"') > 0 and (pipeline / "results/report/plots/rewards.png").is_file()
    judge = json.loads((pipeline / "results/judge/win_rates.json").read_text())
    assert judge["status"] == "ok" and judge["reference"] == "trained"
    assert list(judge["versus"]) == ["base", "merged"]  # every other row, in params order
    assert all(v["overall"]["n_pairs"] > 0 for v in judge["versus"].values())
    assert len(pd.read_parquet(pipeline / "results/judge/verdicts.parquet")) == sum(
        v["overall"]["n_pairs"] for v in judge["versus"].values())


def test_trained_beats_base_on_unseen_concepts(pipeline):
    """Issue 14's margins on the embedded default, on evaluation concepts never trained on (their names and looks
    are not in the warm-up or the training JSON): caption F1 on single-concept skip-retrieval up >= 20 points
    and name recall up on 2 and 4 concepts; held-out object-consistency reward not down (localization: see below) and
    identity consistency up; the training reward up from the first to the last quarter of steps; the local
    judge preferring trained captions in more than half of the pairs; the report marking trained names correct."""
    metrics = json.loads((pipeline / "results/score/metrics.json").read_text())
    single = metrics["single"]["synthetic"]["skip"]
    assert single["trained"]["f1"] - single["base"]["f1"] >= 20.0, single
    assert 0.0 < single["base"]["recall"] < 50.0, single  # the base names some unseen concepts, not most
    for setting in ("multi2", "multi4"):
        cell = metrics[setting]["synthetic"]["skip"]
        assert cell["trained"]["recall"] > cell["base"]["recall"], (setting, cell)
    summary = json.loads((pipeline / "results/train/summary.json").read_text())
    heldout = summary["heldout"]
    assert heldout["trained"]["object_consistency"] >= heldout["base"]["object_consistency"], heldout
    # Localization is not asserted: the warm-up teaches the tiny base the box format with boxes drawn at random
    # (repic.synthetic.warmup), so both rows score 0 and `trained >= base` held as 0.0 >= 0.0, unable to fail.
    # The reward itself is tested on known boxes (tests/test_rewards.py) and reported in [0, 1] above.
    assert heldout["trained"]["identity_consistency"] > heldout["base"]["identity_consistency"], heldout
    assert summary["last"]["reward"] > summary["first"]["reward"], summary
    judge = json.loads((pipeline / "results/judge/win_rates.json").read_text())["versus"]["base"]["overall"]
    assert judge["reference_win_rate"] > 0.5 > judge["model_win_rate"], judge
    page = (pipeline / "results/report/index.html").read_text()
    lines = re.findall(r'<div class="caption"><span class="run">([^<]*)</span>(.*?)</div>', page)
    marked = {run: sum('class="correct"' in rest for who, rest in lines if who.split(" · ")[0] == run)
              for run in MODELS}  # run labels read "trained · skip"
    assert marked["trained"] > marked["base"] > 0, marked  # captions with a name marked correct


def test_second_repro_runs_nothing(pipeline):
    start = time.monotonic()
    log = _sh(["dvc", "repro"], pipeline)
    assert "Running stage" not in log
    assert time.monotonic() - start <= 10


def test_param_change_reruns_only_dependants(pipeline):
    params_path = pipeline / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    try:
        params["caption"]["max_new_tokens"] += 1
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        # A dry run lists the stages the edit invalidates directly (their dependants follow once their
        # outputs change): the caption stages of every model row, nothing upstream (no retraining, no refetch).
        dry = _sh(["dvc", "repro", "--dry"], pipeline)
        ran = {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}
        assert ran == {f"caption_{s}@{m}" for s in SETTINGS for m in MODELS}
        # a retrieval option: the retrieve stages (once per setting), no caption stage directly
        params = yaml.safe_load(original)
        params["caption"]["retrieval"]["box_pad"] += 0.05
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        dry = _sh(["dvc", "repro", "--dry"], pipeline)
        ran = {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}
        assert ran == {f"retrieve@{s}" for s in SETTINGS}

        params = yaml.safe_load(original)
        params["score"]["protocol"] = "strict"
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        log = _sh(["dvc", "repro"], pipeline)
        ran = {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}
        # score reruns and its headline table switches protocol; both metrics files keep their fixed names and
        # values, so the report (which reads metrics.json) is not rerun
        assert ran == {"score"}
        assert (pipeline / "results/score/table.md").read_text().startswith(
            "Name precision / recall / F1 (%), protocol `strict`")
        assert (pipeline / "results/score/metrics_strict.json").is_file()
    finally:
        params_path.write_text(original)


def test_dvc_metrics_show_and_diff(pipeline):
    """The registered metrics work with DVC's own commands: `show` lists them, `diff` against the last commit
    reports a changed value after a param edit and a rerun."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}

    def out(args: list[str]) -> str:
        proc = subprocess.run(args, cwd=pipeline, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    out(["git", "add", "-A"])
    out(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "pipeline run"])
    show = json.loads(out(["dvc", "metrics", "show", "--json"]))
    files = next(iter(show.values()))["data"]  # the workspace
    f1 = files["results/score/metrics.json"]["data"]["single"]["synthetic"]["retrieval"]["trained"]["f1"]
    assert f1 == json.loads((pipeline / "results/score/metrics.json").read_text())[
        "single"]["synthetic"]["retrieval"]["trained"]["f1"]
    assert "results/score/metrics_strict.json" in files and "results/judge/win_rates.json" in files
    params_path = pipeline / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["judge_llm"]["max_pairs"] = 2
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        out(["dvc", "repro", "judge_llm"])
        diff = json.loads(out(["dvc", "metrics", "diff", "--json"]))["results/judge/win_rates.json"]
        assert diff["versus.base.overall.n_pairs"]["new"] == 2 * 3 * 2  # max_pairs x settings x modes
        assert diff["versus.base.overall.n_pairs"]["old"] > diff["versus.base.overall.n_pairs"]["new"]
    finally:
        params_path.write_text(original)
