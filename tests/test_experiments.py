"""DVC experiments compare runs (README "Comparing runs"): `dvc exp run -S` queued in temporary copies
(`--queue`, `dvc queue start`), `dvc exp show`, `dvc exp apply`, and the `plots:` of dvc.yaml under `dvc plots
show` / `dvc plots diff`. The real dvc.yaml's stages (deps, params, outs and their flags, plots) with the stand-in
commands of tests/test_model_rows.py, and the repository's .gitignore: real DVC commands in seconds, not the DAG."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from repic.core.layout import SETTINGS, caption_stage, retrieve_stage

from .conftest import REPO
from .test_model_rows import _default, _plot_fields, _stand_in_pipeline


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "RAN_LOG": str(tmp_path / "ran.log"),  # the stand-ins log here, from the workspace or a temporary copy
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def _run(work: Path, env: dict, *cmd: str) -> str:
    if cmd[0] == "dvc":
        cmd = (sys.executable, "-m", *cmd)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc.stdout


def _ran(tmp_path: Path) -> dict[str, set[str]]:
    """The stages each experiment ran (`-`: the workspace), and the log emptied."""
    log = tmp_path / "ran.log"
    out: dict[str, set[str]] = {}
    for line in (log.read_text().splitlines() if log.exists() else []):
        name, stage = line.split()
        out.setdefault(name, set()).add(stage)
    log.unlink(missing_ok=True)
    return out


def _committed_pipeline(tmp_path: Path) -> tuple[Path, dict]:
    """The embedded default's pipeline reproduced and committed (dvc.lock and the `cache: false` metrics in
    git), as a user commits after `make repro`; training's checkpoints beside it, gitignored as here."""
    env = _env(tmp_path)
    work = _stand_in_pipeline(tmp_path, copy.deepcopy(_default()))
    shutil.copy(REPO / ".gitignore", work / ".gitignore")
    _run(work, env, "git", "add", "-A")
    _run(work, env, "git", "commit", "-qm", "pipeline")
    _run(work, env, "dvc", "repro")
    # what the real train_grpo_lora also writes (not an out): resumable checkpoints, never in git nor the cache
    (work / "results/train/checkpoints/checkpoint-8").mkdir(parents=True)
    (work / "results/train/checkpoints/checkpoint-8/adapter_model.safetensors").write_text("weights")
    _run(work, env, "git", "add", "-A")
    _run(work, env, "git", "commit", "-qm", "results")
    assert _run(work, env, "git", "status", "--porcelain") == ""
    _ran(tmp_path)
    return work, env


def _experiments(show: list) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> its data (params, metrics), at any depth of the answer."""
    found: dict[str, dict] = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict) and "params" in node["data"]:
                found[node["name"]] = node["data"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(show)
    return found


@pytest.mark.slow
def test_queued_experiments_rerun_only_what_their_params_feed(tmp_path):
    """Three queued experiments, each run by `dvc queue start` in a temporary copy of the repository, and one in
    the workspace: a judge-only
    change reruns `judge_llm` alone (never training: the checkpoints are no DVC out, so their absence there is
    not a missing output), a retrieval top-k reruns the captions and what reads them, a subset
    size reruns training and everything after it. `dvc exp show` carries each one's params and metrics, `dvc exp
    apply` restores one's outputs, and `dvc plots diff` between two holds both experiments' series."""
    work, env = _committed_pipeline(tmp_path)
    queued = {"judge6": "judge_llm.max_pairs=6", "topk1": "caption.top_k.single=1",
              "subset12": "subset_2k.n_samples=12"}
    for name, setting in queued.items():
        _run(work, env, "dvc", "exp", "run", "--queue", "-n", name, "-S", setting)
    _run(work, env, "dvc", "queue", "start", "-j", "1")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = _run(work, env, "dvc", "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(1)
    assert status.count("Success") == 3, status

    ran = _ran(tmp_path)
    captions = {m: {caption_stage(s, m) for s in SETTINGS} for m in ("base", "trained", "merged")}
    assert ran["judge6"] == {"judge_llm"}
    # a top-k reruns the retrieve stages (they declare caption.top_k), then every row's captions, not training
    assert ran["topk1"] == ({retrieve_stage(s) for s in SETTINGS} | {s for c in captions.values() for s in c}
                            | {"score", "judge_llm", "report"})
    assert ran["subset12"] == {"subset_2k", "train_grpo_lora", "merge_lora", *captions["trained"],
                               *captions["merged"], "score", "judge_llm", "report"}
    assert "-" not in ran  # the workspace ran nothing

    exps = _experiments(json.loads(_run(work, env, "dvc", "exp", "show", "--json")))
    assert set(queued) <= set(exps), list(exps)
    params = {n: exps[n]["params"]["params.yaml"]["data"] for n in queued}
    assert params["judge6"]["judge_llm"]["max_pairs"] == 6 and params["topk1"]["caption"]["top_k"]["single"] == 1
    assert params["subset12"]["subset_2k"]["n_samples"] == 12
    metrics = {n: exps[n]["metrics"] for n in queued}
    score = {n: m["results/score/metrics.json"]["data"]["value"] for n, m in metrics.items()}
    judge = {n: m["results/judge/win_rates.json"]["data"]["value"] for n, m in metrics.items()}
    baseline = json.loads((work / "results/score/metrics.json").read_text())["value"]
    assert score["judge6"] == baseline and len({baseline, score["topk1"], score["subset12"]}) == 3
    assert len(set(judge.values())) == 3
    assert "results/train/summary.json" in metrics["subset12"]

    # an experiment in the workspace (no --queue) the same way: a judge setting reruns the judge alone
    _run(work, env, "dvc", "exp", "run", "-n", "judge4", "-S", "judge_llm.max_pairs=4")
    assert {s for stages in _ran(tmp_path).values() for s in stages} == {"judge_llm"}
    assert _experiments(json.loads(_run(work, env, "dvc", "exp", "show", "--json")))["judge4"][
        "params"]["params.yaml"]["data"]["judge_llm"]["max_pairs"] == 4

    # applying one restores its outputs: params, metrics and cached outs as that run left them
    _run(work, env, "dvc", "exp", "apply", "topk1")
    assert yaml.safe_load((work / "params.yaml").read_text())["caption"]["top_k"]["single"] == 1
    assert json.loads((work / "results/score/metrics.json").read_text())["value"] == score["topk1"]
    assert "up to date" in _run(work, env, "dvc", "status")
    assert _ran(tmp_path) == {}

    # dvc plots: every plot of dvc.yaml renders, and a diff of two experiments holds both one's series
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    shown = json.loads(_run(work, env, "dvc", "plots", "show", "--json"))
    assert not shown.get("errors") and set(shown["data"]) == {next(iter(p)) for p in plots}
    diff = json.loads(_run(work, env, "dvc", "plots", "diff", "topk1", "subset12", "--json"))
    assert not diff.get("errors"), diff["errors"]
    for name, rendered in diff["data"].items():
        values = rendered[0]["content"]["data"]["values"]
        assert {v["rev"] for v in values} == {"topk1", "subset12"}, name
    assert _plot_fields(plots)  # the plots read the report stage's data files


def test_the_report_stage_writes_every_field_of_dvc_yaml_plots(tmp_path):
    """The data files of dvc.yaml's `plots` as the report stage writes them (repic.eval.report.write_plots_data):
    every record holds every field its plots read (DVC fails a plot otherwise), a step that logged no sample of
    a reward type gives null there, TRL's closing summary line is no step, and P/R/F1 come from metrics.json."""
    from repic.core.layout import PLOTS_DIR, PLOTS_TRAIN, REWARDS, plots_score_file
    from repic.eval.report import write_plots_data

    log = tmp_path / "log.jsonl"
    rows = [{"loss": 0.5, "reward": 0.25, "kl": 0.0, "rewards/object_consistency/mean": None,
             "rewards/visual_localization/mean": 0.5, "step": 1},
            {"loss": 0.25, "reward": 0.75, "kl": 0.01, "rewards/object_consistency/mean": 1.0,
             "rewards/visual_localization/mean": float("nan"), "step": 2},
            {"train_runtime": 3.0, "train_loss": 0.4, "step": 2}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cell = {"precision": 50.0, "recall": 25.0, "f1": 100 / 3}
    metrics = {"single": {"synthetic": {"skip": {"base": cell}, "retrieval": {"base": cell, "trained": cell}}},
               "multi2": {"synthetic": {"skip": {"trained": cell}}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / PLOTS_DIR
    write_plots_data(out, train_log=log, metrics_path=tmp_path / "metrics.json",
                     labels={"base": "Base", "trained": "Ours"})
    curves = json.loads((out / PLOTS_TRAIN).read_text())
    assert curves == [
        {"step": 1, "reward": 0.25, "kl": 0.0, "loss": 0.5, "object_consistency": None, "visual_localization": 0.5,
         "identity_consistency": None},
        {"step": 2, "reward": 0.75, "kl": 0.01, "loss": 0.25, "object_consistency": 1.0,
         "visual_localization": None, "identity_consistency": None}]
    assert set(REWARDS) < set(curves[0])
    single = json.loads((out / plots_score_file("single")).read_text())
    assert single[:3] == [{"run": "synthetic · skip · Base", "metric": m, "value": cell[m]}
                          for m in ("precision", "recall", "f1")]
    assert [r["run"] for r in single[3::3]] == ["synthetic · retrieval · Base", "synthetic · retrieval · Ours"]
    assert sorted(p.name for p in out.iterdir()) == sorted([PLOTS_TRAIN, *(plots_score_file(s) for s in SETTINGS)])
    assert json.loads((out / plots_score_file("multi4")).read_text()) == []  # no such setting: empty, no error
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    for path, fields in _plot_fields(plots).items():
        assert path.startswith(PLOTS_DIR + "/"), path
        data = out / Path(path).name
        if data.exists():
            assert all(set(fields) <= set(record) for record in json.loads(data.read_text())), path
    assert {Path(p).name for p in _plot_fields(plots)} == {PLOTS_TRAIN, *(plots_score_file(s) for s in SETTINGS)}
