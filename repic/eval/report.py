"""The visual report: a static `index.html` (no server) with per-query captions, each ground-truth name marked
with the scorer's verdict (the score stage's slots.parquet), metrics, and PNG plots of the training reward curves
and of P/R/F1 per setting."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from repic.core.io import RepicError, atomic_dir, read_json, resolve_image
from repic.core.layout import (
    MODES,
    PLOTS_TRAIN,
    PROTOCOL_DEFAULT,
    REPORT_INDEX,
    REWARDS,
    SETTINGS,
    Layout,
    caption_file,
    caption_folder,
    plots_score_file,
    retrieval_file,
    run_name,
    runs,
)
from repic.eval.tables import column_groups, group_label

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1,h2{font-weight:600} table{border-collapse:collapse;margin:1em 0} td,th{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3} .query{border:1px solid #ddd;border-radius:6px;padding:1em;margin:1em 0}
.imgs img{height:96px;margin-right:6px;border:1px solid #eee;vertical-align:top}
.ref{display:inline-block;text-align:center;font-size:12px;margin-right:8px}
.correct{background:#c8f7c5;font-weight:600} .wrong{background:#ffc9c9;font-weight:600}
img{max-width:100%} .missed{color:#999;text-decoration:line-through} .caption{margin:.3em 0}
.run{font-weight:600;min-width:9em;display:inline-block;margin-right:.5em}
"""

# Marks the page as rendered once every image decoded; the Chromium test reads these attributes.
LOAD_SCRIPT = """
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


# A ground-truth name as the scorer judged it (slots.parquet, protocol repic): named (`correct`), not named but
# another concept named instead (`miss`), or nothing of the pool named (`none`). The report has no matcher of
# its own: what it marks is what the metrics counted.
VERDICT_CLASS = {"correct": "correct", "miss": "wrong", "none": "missed"}
VERDICT_TITLE = {"correct": "named", "miss": "not named; another concept named instead", "none": "not named"}
LEGEND = ("<h2>Captions</h2><p>After each caption, its ground-truth names with the scorer's verdict (protocol "
          f"{PROTOCOL_DEFAULT}, results/score/slots.parquet): "
          + ", ".join(f'<span class="{VERDICT_CLASS[o]}">{o}</span> ({VERDICT_TITLE[o]})' for o in VERDICT_CLASS)
          + ".</p>")


def verdict_chips(slots: list[tuple[str, str]]) -> str:
    """HTML of one caption's ground-truth names, each marked with the scorer's verdict `(key, outcome)`."""
    return " ".join(f'<span class="{VERDICT_CLASS[o]}" title="{VERDICT_TITLE[o]}">{html.escape(k)}</span>'
                    for k, o in slots)


def read_verdicts(slots_path: str | os.PathLike, protocol: str = PROTOCOL_DEFAULT
                  ) -> dict[tuple[str, str, str, int], list[tuple[str, str]]]:
    """The score stage's per-slot verdicts of one protocol: `(setting, dataset, run, row) -> [(key, outcome)]`
    in slot order (`run` as `base_skip`)."""
    import pandas as pd

    frame = pd.read_parquet(slots_path)
    frame = frame[frame["protocol"] == protocol].sort_values(["setting", "dataset", "model", "mode", "row", "slot"])
    out: dict[tuple[str, str, str, int], list[tuple[str, str]]] = {}
    for r in frame.itertuples(index=False):
        out.setdefault((r.setting, r.dataset, run_name(r.model, r.mode), int(r.row)), []).append((r.key, r.outcome))
    return out


def _thumb(src: Path, dest: Path, size: int = 192) -> None:
    from PIL import Image

    img = Image.open(src).convert("RGB")
    img.thumbnail((size, size))
    dest.parent.mkdir(parents=True, exist_ok=True)
    img.save(dest, format="PNG")


def plot_rewards(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    log = pd.read_json(log_path, lines=True)
    cols = [c for c in log.columns if c.startswith("rewards/") and c.endswith("/mean")] + ["reward"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for col in cols:
        if col in log:
            # Steps without a sample of this reward type log nothing (NaN); one step sees one prompt group,
            # so smooth the logged values over a few steps to see the trend.
            series = pd.to_numeric(log[col], errors="coerce").dropna()
            axes[0].plot(series.index + 1, series.rolling(4, min_periods=1).mean(),
                         label=col.split("/")[1] if "/" in col else "total")
    axes[0].set(xlabel="step", ylabel="reward (rolling mean of 4)", title="GRPO rewards")
    axes[0].legend(fontsize=8)
    for col in ("kl", "loss"):
        if col in log:
            axes[1].plot(log.index + 1, pd.to_numeric(log[col], errors="coerce"), label=col)
    axes[1].set(xlabel="step", title="KL and loss")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_prf(metrics: dict[str, Any], out: Path, labels: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = column_groups(metrics)
    groups = [(g, m) for g in flat for m in MODES if m in flat[g]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)
    width = 0.8 / len(labels)
    for ax, key in zip(axes, ("precision", "recall", "f1")):
        for j, (model, label) in enumerate(labels.items()):
            vals = [flat[g][m].get(model, {}).get(key, 0.0) for g, m in groups]
            ax.bar([i + (j - (len(labels) - 1) / 2) * width for i in range(len(groups))], vals, width, label=label)
        ax.set_xticks(range(len(groups)), [f"{group_label(g)}\n{m}" for g, m in groups], fontsize=8)
        ax.set_title(key)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ---- the data of dvc.yaml's `plots:` (DVC renders them, `dvc plots diff` overlays experiments; the report keeps its
# own figures above). DVC wants every field of a plot in every record: a step without a sample of a reward type
# gives null there (a gap in its line).
TRAIN_CURVES = ("reward", "kl", "loss")
PRF = ("precision", "recall", "f1")


def train_curves(train_log: str | os.PathLike) -> list[dict[str, Any]]:
    """One record per logged step of the training log (TRL's per-step logs, log.jsonl): `step`, the total
    `reward`, `kl`, `loss` and the mean of every reward type of the registry (`rewards/<name>/mean`, named
    `<name>`), null where a step logged none (or the run used no such reward): the same fields for every run."""
    import json
    import math

    path = Path(train_log)
    if not path.is_file():
        raise RepicError(f"{path}: file not found")
    logs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                logs.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RepicError(f"{path}: line {n}: invalid JSON ({exc.msg})") from None

    def number(value: Any) -> float | None:
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    steps = [log for log in logs if isinstance(log, dict) and "step" in log and "loss" in log]  # not a summary line
    return [{"step": log["step"], **{k: number(log.get(k)) for k in TRAIN_CURVES},
             **{name: number(log.get(f"rewards/{name}/mean")) for name in REWARDS}} for log in steps]


def score_bars(metrics: dict[str, Any], labels: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Per setting (each of the layout's, empty without data), one record per dataset, mode, model row and
    measure: `run` ("<dataset> · <mode> · <label>"), `metric` (precision, recall, f1) and `value` (%), from the
    score stage's metrics.json."""
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}  # every file, so a plot never lacks one
    for setting, datasets in metrics.items():
        out[setting] = [{"run": f"{dataset} · {mode} · {labels.get(model, model)}", "metric": key,
                         "value": cells[model][key]}
                        for dataset, modes in datasets.items() for mode in MODES if mode in modes
                        for model, cells in ((m, modes[mode]) for m in labels if m in modes[mode]) for key in PRF]
    return out


def write_plots_data(out_dir: str | os.PathLike, *, train_log: str | os.PathLike, metrics_path: str | os.PathLike,
                     labels: dict[str, str]) -> None:
    """`out_dir/train.json` (`train_curves`) and `out_dir/score_<setting>.json` (`score_bars`), atomically."""
    import json

    curves, bars = train_curves(train_log), score_bars(read_json(metrics_path), labels)
    with atomic_dir(out_dir) as tmp:
        (tmp / PLOTS_TRAIN).write_text(json.dumps(curves, indent=1) + "\n", encoding="utf-8")
        for setting, records in bars.items():
            (tmp / plots_score_file(setting)).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n",
                                                         encoding="utf-8")


def build_report(out_dir: str | os.PathLike, *, captions_dir: str | os.PathLike, metrics_path: str | os.PathLike,
                 slots_path: str | os.PathLike, retrieval_dir: str | os.PathLike, train_log: str | os.PathLike,
                 layout: Layout, root: str | os.PathLike, max_queries: int, labels: dict[str, str]) -> None:
    """Write `out_dir/index.html`, `out_dir/plots/*.png` and `out_dir/img/*` (thumbnails), atomically.
    `layout` is `{setting: [(dataset, its database)]}` (`repic.core.layout.layout_of`); `labels` the model rows
    (params `models`, name -> label, in table order): one caption line, metrics row and bar per row. Each
    caption's names are marked with the score stage's verdicts (`slots_path`, its slots.parquet); each query's
    retrieved references and recall@k come from the retrieve stages' retrieval.json (`retrieval_dir`)."""
    metrics = read_json(metrics_path)
    verdicts = read_verdicts(slots_path)
    with atomic_dir(out_dir) as tmp:
        (tmp / "plots").mkdir()
        plot_rewards(Path(train_log), tmp / "plots" / "rewards.png")
        plot_prf(metrics, tmp / "plots" / "prf.png", labels)
        thumbs: dict[str, str] = {}

        def thumb(rel: str) -> str:
            if rel not in thumbs:
                name = f"img/{len(thumbs):04d}.png"
                _thumb(resolve_image(root, rel), tmp / name)
                thumbs[rel] = name
            return thumbs[rel]

        body = ["<h1>RePIC results</h1>", f"<h2>Metrics (protocol {PROTOCOL_DEFAULT})</h2>",
                _metrics_html(metrics, labels),
                '<img src="plots/prf.png" alt="P/R/F1 per setting">', "<h2>Training</h2>",
                '<img src="plots/rewards.png" alt="GRPO reward curves">', LEGEND]
        for setting, dataset, database in ((s, d, db) for s, datasets in layout.items() for d, db in datasets):
            concepts = database["concept_dict"]
            rows = {run_name(model, mode): read_json(caption_folder(captions_dir, setting, model, dataset)
                                                     / caption_file(model, mode)) for model, mode in runs(labels)}
            run_labels = {run_name(model, mode): f"{labels[model]} · {mode}" for model, mode in runs(labels)}
            first = next(iter(rows.values()))
            # retrieved once per setting and dataset (the retrieve stage): every row's captions show these references
            retrieval = read_json(retrieval_file(retrieval_dir, setting, dataset))
            retrieved = [q["retrieved"] for q in retrieval["per_query"]]
            body.append(f"<h2>{setting} · {html.escape(dataset)}: {len(first)} queries "
                        f"(retrieval recall@{retrieval['k']} = {retrieval['recall_at_k']:.2f})</h2>")
            for i, row in enumerate(first[:max_queries]):
                image, gt = row[0], row[1]
                refs = "".join(
                    f'<span class="ref"><img src="{thumb(concepts[k]["image"])}" alt="{html.escape(k)}"><br>'
                    f"{html.escape(k)}</span>" for k in gt)
                got = ", ".join(html.escape(k) for k in retrieved[i]) if i < len(retrieved) else "-"
                lines = []
                for run, run_rows in rows.items():
                    caption = html.escape(run_rows[i][2]) or "<i>(empty)</i>"
                    slots = verdicts.get((setting, dataset, run, i))
                    if slots is None:
                        raise RepicError(f"{slots_path}: no verdict for {setting}/{dataset} {run} row {i} "
                                         "(scored from other captions than these?)")
                    lines.append(f'<div class="caption"><span class="run">{html.escape(run_labels[run])}</span> '
                                 f"{caption} · {verdict_chips(slots)}</div>")
                body.append(
                    f'<div class="query"><div class="imgs"><img src="{thumb(image)}" alt="query"> {refs}</div>'
                    f"<div>ground truth: {html.escape(', '.join(gt))} · retrieved: {got}</div>{''.join(lines)}</div>")
        page = ("<!doctype html><html><head><meta charset='utf-8'><title>RePIC report</title>"
                f"<style>{CSS}</style><script>{LOAD_SCRIPT}</script></head><body>"
                + "\n".join(body) + "</body></html>\n")
        (tmp / REPORT_INDEX).write_text(page, encoding="utf-8")


def _metrics_html(metrics: dict[str, Any], labels: dict[str, str]) -> str:
    rows = ["<table><tr><th>setting</th><th>mode</th><th>model</th><th>P</th><th>R</th><th>F1</th></tr>"]
    for group, modes in column_groups(metrics).items():
        for m in MODES:
            for model, cell in modes.get(m, {}).items():
                rows.append(f"<tr><td>{html.escape(group_label(group))}</td><td>{m}</td>"
                            f"<td>{html.escape(labels.get(model, model))}</td>"
                            + "".join(f"<td>{cell[k]:.1f}</td>" for k in ("precision", "recall", "f1")) + "</tr>")
    return "".join(rows) + "</table>"
