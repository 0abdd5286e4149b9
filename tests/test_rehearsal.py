"""`make paper-rehearsal`: the paper config, unchanged but for network (loopback servers) and an allow-listed
size/hardware overlay, runs every DAG stage through its real code path. The full run is marked slow (CI runs it:
../shared exists there); the overlay's allow-list check is fast."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from repic.core.io import RepicError
from repic.core.params import deep_merge, validate
from repic.rehearsal.__main__ import ALLOWED, OVERLAY, allowed, check_overlay, leaves

from .conftest import REPO, SHARED, need_shared


def _paper_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return deep_merge(params, yaml.safe_load((REPO / "configs/paper.yaml").read_text()))


def test_rehearsal_overlay_changes_only_allow_listed_size_and_hardware_keys() -> None:
    overlay = yaml.safe_load((REPO / OVERLAY).read_text())
    check_overlay(overlay)  # every key it names is allowed
    paper = _paper_params()
    rehearsed = deep_merge(paper, overlay)
    validate(rehearsed, "paper + rehearsal")
    before, after = leaves(paper), leaves(rehearsed)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed and all(allowed(k) for k in changed), [k for k in changed if not allowed(k)]
    # what must never change in a rehearsal: sources and their pins, the inference settings, the recipe
    for key in ("fetch_data.sources", "fetch_data.lock", "caption.detector", "caption.top_k", "caption.backend",
                "build_db", "train_grpo_lora.lora", "train_grpo_lora.grpo.beta", "judge_llm.backend", "score"):
        assert not any(k == key or k.startswith(key + ".") for k in changed), key
    assert not any(a.startswith(("fetch_data.sources", "caption.detector", "caption.top_k")) for a in ALLOWED)
    with pytest.raises(RepicError, match=r"configs/rehearsal.yaml: fetch_data.sources.qwen.revision: not a size"):
        check_overlay({**overlay, "fetch_data": {"sources": {"qwen": {"revision": "0" * 40}}}})
    with pytest.raises(RepicError, match=r"caption.top_k.single: not a size/hardware key"):
        check_overlay({"caption": {"top_k": {"single": 1}}})


def _can_run() -> bool:
    return shutil.which("make") is not None and (Path(os.sys.executable).parent.parent / ".installed").exists()


def start_in_background(tmp: Path):
    """`python -m repic.rehearsal` (about 6 minutes of one-core work), started in the background by conftest.py with
    the first slow test, at a lower priority (conftest.NICE); None where it cannot run (no ../shared, no
    make or project venv: the test says why)."""
    from .conftest import BackgroundRun

    if not ((SHARED / "repic_eval").exists() and _can_run()):
        return None
    return BackgroundRun((os.sys.executable, "-m", "repic.rehearsal", "--work", str(tmp / "work"), "--report",
                          str(tmp / "rehearsal.json"), "--shared", str(SHARED)), REPO, tmp / "rehearsal.log")


@pytest.mark.slow
def test_paper_rehearsal_runs_every_stage(background) -> None:
    need_shared(SHARED / "repic_eval", "RePIC's evaluation files for the stand-ins")
    if not _can_run():
        pytest.skip("needs make and the project venv built by `make venv`")
    assert background is not None  # started by conftest.py (start_in_background) whenever it can run
    if background.wait(timeout=2400) != 0:
        pytest.fail(f"repic.rehearsal exited {background.returncode}:\n{background.tail()}")
    report_path = background.log_path.parent / "rehearsal.json"
    report = json.loads(report_path.read_text())
    repo = Path(report["checkout"])
    paper = yaml.safe_load((REPO / "configs/paper.yaml").read_text())
    rows = list(paper["models"])
    released = [r for r in rows if r not in ("trained", "merged")]
    assert released == ["base", "rap_qwen", "repic_lora", "repic_merged"]
    captions = {r: [f"caption_{s}@{r}" for s in ("single", "multi2", "multi4")] for r in rows}
    retrieval = [f"retrieve@{s}" for s in ("single", "multi2", "multi4")]  # once per setting, for every row
    stages = ["fetch_data", "subset_2k", "build_db", *retrieval, "train_grpo_lora", "merge_lora",
              *(c for r in rows for c in captions[r]), "score", "judge_llm", "report"]
    assert sorted(report["stages"]) == sorted(stages)  # every stage ran, through dvc repro
    # `make paper-released` evaluated the released rows without training; `make paper` then ran only our row's
    # caption stages (the released rows' came from DVC's cache), and no retrieval: the new rows read the references
    # the retrieve stages found for the released ones
    assert sorted(report["steps"]["paper-released"]) == sorted(
        ["fetch_data", "build_db", *retrieval, *(c for r in released for c in captions[r]), "score", "judge_llm"])
    assert sorted(report["steps"]["paper"]) == sorted(
        ["subset_2k", "train_grpo_lora", "merge_lora", *captions["trained"], *captions["merged"], "score", "judge_llm",
         "report"])
    # the scratch copy's paper.yaml is the committed one, byte for byte
    assert (repo / "configs/paper.yaml").read_bytes() == (REPO / "configs/paper.yaml").read_bytes()
    # record-on-first-download: every record source got a value, and a second fetch matched it silently
    recording = sorted(n for n, s in paper["fetch_data"]["sources"].items() if s.get("record"))
    assert sorted(report["recorded"]) == recording and report["second_fetch_recorded_nothing"]
    assert report["requests"]["drive_confirmations"] >= 3 and report["requests"]["judge"] > 0
    assert report["real_files_checked"]["repic"] >= 830  # RePIC's real files, checked against their blob ids
    # RePIC's layout, every dataset validated, indexed, captioned, scored
    for folder in ("myvlm_data", "dreambooth", "yollava-data", "query-image-2-concepts", "query-image-4-concepts"):
        assert any((repo / "data/repic/data" / folder).rglob("*.*")), folder
    validation = json.loads((repo / "data/repic/validation.json").read_text())
    assert validation["ok"], validation
    assert json.loads((repo / "data/db/manifest.json").read_text())["built"] == [
        "myvlm", "yollava", "dreambooth", "2_concepts", "4_concepts"]
    metrics = json.loads((repo / "results/score/metrics.json").read_text())
    assert set(metrics["single"]) == {"myvlm", "yollava", "dreambooth"}
    # one row per model everywhere: metrics (both protocols), Tables 1-2 by label, the judge against RePIC's LoRA
    for name in ("metrics.json", "metrics_strict.json"):
        cells = json.loads((repo / "results/score" / name).read_text())
        assert all(list(cells[s][d][m]) == rows for s in cells for d in cells[s] for m in cells[s][d]), name
    for table in ("table1_single_repic.md", "table2_multi_strict.csv"):
        text = (repo / "results/tables" / table).read_text()
        assert all(text.count(row["label"]) == 1 for row in paper["models"].values()), table
    multi4 = json.loads((repo / "results/retrieval/multi4/4_concepts/retrieval.json").read_text())
    assert multi4["k"] == 4 and all(len(q["retrieved"]) <= 4 and all(isinstance(h["score"], float) for h in q["hits"])
                                    for q in multi4["per_query"])
    caption = json.loads((repo / "results/captions/multi4/trained/4_concepts/caption_report.json").read_text())
    assert caption["max_new_tokens"] == 4 and set(caption["hit_max_new_tokens"]) == {"trained_skip",
                                                                                      "trained_retrieval"}
    single = json.loads((repo / "results/retrieval/single/myvlm/retrieval.json").read_text())
    assert single["k"] == 2 and single["n_queries"] == 340
    recall = json.loads((repo / "results/score/recall.json").read_text())
    assert recall["single"]["myvlm"] == {"k": 2, "recall_at_k": single["recall_at_k"], "n_queries": 340}
    # the same code path for every row: each captioned the same queries with the references of its setting's one
    # retrieval (its caption_report.json names the retrieval.json it read, by sha256), and the merged stand-in
    # (served as RePIC's hub model: the base's weights) captions exactly as the base row
    for setting, dataset in (("single", "myvlm"), ("multi2", "2_concepts"), ("multi4", "4_concepts")):
        folder = repo / "results/captions" / setting
        retrieved = repo / "results/retrieval" / setting / dataset / "retrieval.json"
        read = {r: json.loads((folder / r / dataset / "caption_report.json").read_text())["retrieval"] for r in rows}
        assert all(read[r] == {"file": str(retrieved.relative_to(repo)),
                               "sha256": hashlib.sha256(retrieved.read_bytes()).hexdigest()} for r in rows), setting
        references = [q["retrieved"] for q in json.loads(retrieved.read_text())["per_query"]]
        for mode in ("skip", "retrieval"):
            caps = {r: json.loads((folder / r / dataset / f"{r}_{mode}.json").read_text()) for r in rows}
            assert all([c[:2] for c in caps[r]] == [c[:2] for c in caps["trained"]] for r in rows)
            assert len(caps["trained"]) == len(references)
            # the base row is RePIC's zero-shot row (caption.prompts: its question gets RePIC's zero-shot instruction),
            # so its captions may differ from the merged stand-in's; the queries and questions are the same
            assert [c[:2] + c[3:] for c in caps["repic_merged"]] == [c[:2] + c[3:] for c in caps["base"]]
    win = json.loads((repo / "results/judge/win_rates.json").read_text())
    # the openai backend answered through the loopback endpoint, for every row against the reference
    assert win["reference"] == "repic_lora" and list(win["versus"]) == ["base", "rap_qwen", "repic_merged", "trained",
                                                                 "merged"]
    assert all(v["overall"]["n_pairs"] > 0 for v in win["versus"].values())
    assert (repo / "results/report/index.html").stat().st_size > 0
    assert (repo / "results/merged/merge_report.json").is_file()
    # the released LoRA checkpoint (record on first download) loads onto the base with PEFT
    lora = next((repo / "data/repic/released/repic_lora").rglob("adapter_config.json")).parent
    from peft import PeftModel

    from repic.vlm.models import load_model

    model = PeftModel.from_pretrained(load_model(repo / "data/models/Qwen2.5-VL-7B-Instruct", device="cpu"), lora)
    assert model.peft_config["default"].r == 8
    # a gross-regression bound, wall seconds: 978 s in make test on 2 cores beside the embedded DAG's background run
    # (2026-12-06, six model rows; README, Development)
    assert report["seconds"]["total"] < 2400
