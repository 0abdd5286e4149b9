"""The static report: each caption's names marked with the scorer's own verdicts, and it renders in headless
Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pandas as pd
import pytest
from PIL import Image

from repic.core.io import RepicError
from repic.eval.report import build_report
from repic.eval.scoring import score_runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def report_inputs(tmp_path):
    root = tmp_path / "world"
    (root / "data").mkdir(parents=True)
    colors = {"<a>": "red", "<b>": "blue", "<c>": "green", "<d>": "orange"}
    concept_dict = {}
    for key, color in colors.items():
        Image.new("RGB", (64, 64), color).save(root / "data" / f"{key[1]}.png")
        concept_dict[key] = {"name": key[1], "image": f"./data/{key[1]}.png", "info": color, "category": "toy"}
    database = {"concept_dict": concept_dict, "path_to_concept": {}}
    Image.new("RGB", (96, 96), "white").save(root / "data" / "q.png")
    caps = tmp_path / "captions"
    gts = {"single": ["<a>"], "multi2": ["<a>", "<b>"], "multi4": ["<a>", "<b>", "<c>", "<d>"]}
    # two single-concept datasets (as the paper's MyVLM / Yo'LLaVA / DreamBooth), one for each multi setting
    layout = {"single": [("myvlm", database), ("dreambooth", database)], "multi2": [("toy", database)],
              "multi4": [("toy", database)]}
    labels = {"base": "Zero-shot", "repic_lora": "RePIC (released LoRA)", "trained": "Ours"}
    for setting, gt in gts.items():
        for dataset, _ in layout[setting]:
            for model in labels:  # each model row's caption stage writes its own folder
                folder = caps / setting / model / dataset
                folder.mkdir(parents=True)
                for mode in ("skip", "retrieval"):
                    wrong = "<b>" if setting == "single" else ""
                    caption = "A photo." if model == "base" else f"{gt[0]} with <zzz> and {wrong}"
                    # the second row names <a>, not its own <b>: the scorer's "miss"
                    (folder / f"{model}_{mode}.json").write_text(json.dumps(
                        [["./data/q.png", gt, caption, "q?"], ["./data/q.png", ["<b>"] * len(gt), "<a>.", "q?"]]))
            # retrieved once per setting and dataset (the retrieve stage), read by the report for every row
            retrieval = tmp_path / "retrieval" / setting / dataset
            retrieval.mkdir(parents=True)
            (retrieval / "retrieval.json").write_text(json.dumps(
                {"k": 2, "recall_at_k": 0.5, "per_query": [{"retrieved": ["<a>", "<c>"]}, {"retrieved": ["<b>"]}]}))
    cell = {"precision": 50.0, "recall": 25.0, "f1": 33.3}
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({s: {d: {m: {model: cell for model in labels} for m in ("skip", "retrieval")}
                                       for d, _ in layout[s]} for s in gts}))
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"loss": 0.1 * i, "kl": 0.01 * i, "reward": i / 10,
                                         "rewards/object_consistency/mean": None if i % 2 else i / 10})
                             for i in range(8)))
    _, slots = score_runs(caps, "repic", layout, list(labels))
    slots_path = tmp_path / "slots.parquet"
    pd.DataFrame(slots).assign(protocol="repic").to_parquet(slots_path)
    return dict(captions_dir=caps, metrics_path=metrics, slots_path=slots_path, retrieval_dir=tmp_path / "retrieval",
                train_log=log, layout=layout,
                root=root, labels=labels)


def test_report_files(tmp_path, report_inputs):
    out = tmp_path / "report"
    build_report(out, max_queries=5, **report_inputs)
    page = (out / "index.html").read_text()
    assert (out / "plots" / "rewards.png").stat().st_size > 0 and (out / "plots" / "prf.png").stat().st_size > 0
    assert page.count('class="query"') == 8  # 2 queries x (2 single-concept datasets + 2 multi settings)
    assert "<h2>single · dreambooth: 2 queries" in page and "<h2>multi4 · toy: 2 queries" in page
    assert "<td>Single MyVLM</td>" in page and "<td>Single DreamBooth</td>" in page and "<td>2-concept</td>" in page
    # the scorer's verdicts: trained names <a> (correct), the second row names <a> for <b> (miss), base nothing
    assert '<span class="correct" title="named">&lt;a&gt;</span>' in page
    assert '<span class="wrong" title="not named; another concept named instead">&lt;b&gt;</span>' in page
    assert '<span class="missed" title="not named">&lt;a&gt;</span>' in page
    assert "A photo." in page and "&lt;a&gt; with &lt;zzz&gt;" in page  # captions shown as written
    # one caption line per model row and mode, by label, in params order; one metrics row per model row
    assert page.count('<span class="run">') == 8 * 6
    first = page.split('<div class="query">')[1]
    assert re.findall(r'<span class="run">([^<]+)</span>', first) == [
        "Zero-shot · skip", "RePIC (released LoRA) · skip", "Ours · skip",
        "Zero-shot · retrieval", "RePIC (released LoRA) · retrieval", "Ours · retrieval"]
    assert page.count("<td>RePIC (released LoRA)</td>") == 8  # 4 column groups x 2 modes
    for src in re.findall(r'src="([^"]+)"', page):
        assert (out / src).is_file(), src


def test_report_renders_in_headless_chromium(tmp_path, report_inputs):
    if CHROMIUM is None:  # a user's machine may lack it (skip); CI installs it (.ci/run), so there it fails
        reason = "headless Chromium is not installed (.ci/run installs Debian's)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI (env CI is set) must have it", pytrace=False)
        pytest.skip(reason)
    out = tmp_path / "report"
    build_report(out, max_queries=5, **report_inputs)
    url = (out / "index.html").as_uri()
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile1'}", "--virtual-time-budget=5000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-images="(\d+)" data-images-loaded="(\d+)"', dom)
    assert m, dom[:500]
    assert int(m.group(1)) > 6 and m.group(1) == m.group(2)  # every image decoded
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1000,1400",
                    f"--screenshot={shot}", url], capture_output=True, timeout=120)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1000, 1400) and len(img.getcolors(1 << 20) or []) > 50  # not a blank page


def test_report_marks_what_the_scorer_counted_not_a_matcher_of_its_own(tmp_path, report_inputs):
    """`Here is <a>'s dog`: RePIC's scorer does not find <a> (its token is `<a>'s`), so neither does the report;
    the verdicts come from slots.parquet, whatever the captions look like."""
    caps = report_inputs["captions_dir"]
    folder = caps / "single" / "trained" / "myvlm"
    rows = json.loads((folder / "trained_skip.json").read_text())
    rows[0][2] = "Here is <a>'s dog"
    (folder / "trained_skip.json").write_text(json.dumps(rows))
    _, slots = score_runs(caps, "repic", report_inputs["layout"], list(report_inputs["labels"]))
    pd.DataFrame(slots).assign(protocol="repic").to_parquet(report_inputs["slots_path"])
    out = tmp_path / "report"
    build_report(out, max_queries=5, **report_inputs)
    page = (out / "index.html").read_text()
    line = next(x for x in page.split('<div class="caption">') if "Here is &lt;a&gt;&#x27;s dog" in x)
    assert '<span class="missed" title="not named">&lt;a&gt;</span>' in line and 'class="correct"' not in line
    # slots that do not cover the captions shown are an error naming the file, not a silent blank
    pd.DataFrame(slots).assign(protocol="repic").iloc[:4].to_parquet(report_inputs["slots_path"])
    with pytest.raises(RepicError, match="slots.parquet: no verdict for"):
        build_report(tmp_path / "r2", max_queries=5, **report_inputs)
