"""Score caption files with RePIC's name P/R/F1 protocol.

Pipeline mode (the folder of runs, `<setting>/<model>/<dataset>/<model>_<mode>.json` for the datasets of params
`base.data.datasets` and the model rows of params `models`): metrics.json (RePIC's protocol,
`{setting: {dataset: {mode: {model: P/R/F1}}}}`), metrics_strict.json (the corrected one), table.md, per-slot
Parquet, and the paper's Tables 1 and 2 in markdown, CSV and LaTeX for both protocols, one row per model row
(its label, in params order); recall.json, the retrieval recall@k of every setting and dataset, taken from the
retrieve stages' retrieval.json (`--retrieval`; also in table.md).
    python -m stages.score --captions results/captions --retrieval results/retrieval --out results/score \
        --tables results/tables
One file (ours or one written by the original RePIC scripts): prints one JSON object.
    python -m stages.score --captions FILE --setting single|multi2|multi4 --protocol repic|strict [--database D]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from repic.core.cli import parser, run
from repic.core.io import RepicError, read_json, write_json, write_parquet, write_text
from repic.core.layout import (
    METRICS_FILES,
    PROTOCOL_DEFAULT,
    PROTOCOLS,
    RECALL_FILE,
    SCORE_TABLE,
    SETTINGS,
    SLOTS,
    Layout,
    layout_of,
    model_labels,
    paper_table_file,
    retrieval_file,
)
from repic.core.params import params_of
from repic.data.validate import load_caption_rows
from repic.eval.metrics import score_captions
from repic.eval.scoring import score_runs
from repic.eval.tables import column_groups, metrics_table, paper_tables, to_markdown


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--captions", required=True, help="a caption file, or the folder of a pipeline run")
    p.add_argument("--database", help="one-file mode: database_mod.json (display names for --protocol strict)")
    p.add_argument("--setting", choices=SETTINGS, help="one-file mode: the file's setting")
    p.add_argument("--protocol", choices=PROTOCOLS, help="default: params.yaml score.protocol")
    p.add_argument("--out", help="pipeline mode: output folder (metrics, per-slot Parquet)")
    p.add_argument("--tables", help="pipeline mode: folder of the paper tables (md, csv, tex)")
    p.add_argument("--retrieval", help="pipeline mode: the retrieve stages' folder (<setting>/<dataset>/"
                   "retrieval.json): recall@k")
    args = p.parse_args(argv)
    database = read_json(args.database) if args.database else None
    if not Path(args.captions).exists():
        raise RepicError(f"--captions {args.captions}: not found (expected a caption file or a folder of runs)")
    if Path(args.captions).is_file():
        if not args.setting:
            raise RepicError("--setting is required when --captions is a file")
        summary, _ = score_captions(load_caption_rows(args.captions), args.setting, args.protocol or PROTOCOL_DEFAULT,
                                    database, source=args.captions)
        print(json.dumps({k: summary[k] for k in ("precision", "recall", "f1", "n_slots")}))
        return
    if not args.out or not args.tables or not args.retrieval:
        raise RepicError("--out, --tables and --retrieval are required when --captions is a folder of runs")
    # Both protocols are always scored, under fixed names: metrics.json is RePIC's protocol (comparable with the
    # paper), metrics_strict.json the corrected one beside it. The protocol param picks the headline table.md.
    params = params_of(args)
    primary = args.protocol or params["score"]["protocol"]
    layout = layout_of(params["base"]["data"]["datasets"])  # each dataset's own database (display names for strict)
    out, tables = Path(args.out), Path(args.tables)
    labels = model_labels(params)
    recall = retrieval_recall(args.retrieval, layout)
    write_json(out / RECALL_FILE, recall)
    frames = []
    for protocol, name in METRICS_FILES.items():
        metrics, slots = score_runs(args.captions, protocol, layout, list(labels))
        write_json(out / name, metrics)
        frames.append(pd.DataFrame(slots).assign(protocol=protocol))
        for table, files in paper_tables(metrics, protocol, labels).items():
            for ext, text in files.items():
                write_text(tables / paper_table_file(table, protocol, ext), text)
        if protocol == primary:
            write_text(out / SCORE_TABLE, f"Name precision / recall / F1 (%), protocol `{protocol}`\n\n"
                       + to_markdown(metrics_table(column_groups(metrics), labels))
                       + "\nRetrieval recall@k (%), once per setting and dataset (the retrieve stages)\n\n"
                       + to_markdown(recall_table(recall)))
    write_parquet(out / SLOTS, pd.concat(frames, ignore_index=True))


def retrieval_recall(retrieval_dir: str, layout: Layout) -> dict[str, dict[str, dict[str, float]]]:
    """`{setting: {dataset: {"k", "recall_at_k", "n_queries"}}}` from each retrieve stage's retrieval.json."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for setting, datasets in layout.items():
        for dataset, _ in datasets:
            report = read_json(retrieval_file(retrieval_dir, setting, dataset))
            out.setdefault(setting, {})[dataset] = {key: report[key] for key in ("k", "recall_at_k", "n_queries")}
    return out


def recall_table(recall: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """One line per setting and dataset: k, recall@k in %, the number of queries."""
    rows = [{"setting": f"{SETTINGS[s].label} {d}", "k": cell["k"], "recall@k": 100.0 * cell["recall_at_k"],
             "queries": cell["n_queries"]} for s, datasets in recall.items() for d, cell in datasets.items()]
    return pd.DataFrame(rows).set_index("setting")


if __name__ == "__main__":
    sys.exit(run(main))
