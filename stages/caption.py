r"""Caption one setting's queries (single | multi2 | multi4) with one model row x {skip, retrieval}, for every
evaluation dataset that has this setting (`base.data.datasets`), with that dataset's database and the references
the retrieve stage found for its queries (`--retrieval`: retrieve@<setting>'s folder; no detector or embedder runs
here, so every row shows the same references).

The row's weights: a model folder (--model), or a LoRA adapter (--adapter) applied to --base-model. dvc.yaml runs
one stage per row of params `models` (caption_<setting>@<row>).
Writes, per dataset, `<out>/<dataset>/`: RePIC caption files `<row>_<mode>.json`, `captions.parquet` and
`caption_report.json` (captions cut at `max_new_tokens`, per run file; the retrieval.json read, with its sha256).
Example: python -m stages.caption --setting single --root data/world --retrieval results/retrieval/single \
    --base-model data/models/base --row trained --adapter results/train/adapter --out results/captions/single/trained
One query map: add --queries Q.json --database D.json (--retrieval is then the folder holding that query map's
retrieval.json, and the files go straight into --out).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from repic.core.cli import parser, run
from repic.core.io import RepicError, file_sha256, read_json, staged_outputs, write_json, write_parquet
from repic.core.layout import (
    CAPTION_REPORT,
    CAPTIONS_PARQUET,
    RETRIEVAL_REPORT,
    SETTINGS,
    eval_datasets,
    run_file,
)
from repic.core.params import params_of
from repic.eval.captioning import find_adapter, run_setting
from repic.vlm.models import check_adapter, use_threads


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--setting", required=True, choices=SETTINGS, help="which query maps to caption")
    p.add_argument("--root", required=True, help="data root the query and database image paths are relative to")
    p.add_argument("--retrieval", required=True,
                   help="the retrieve stage's output folder (one <dataset>/retrieval.json each); with --queries: the "
                   "folder holding that query map's retrieval.json")
    p.add_argument("--row", required=True, help="the model row's name (caption files <row>_<mode>.json)")
    p.add_argument("--base-model", help="the base model folder: what --adapter applies to; its processor is used "
                   "when --model has none")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--model", help="the row's weights: a model folder (from_pretrained)")
    weights.add_argument("--adapter", help="the row's weights: a PEFT LoRA adapter folder (or a folder holding one, "
                         "as an unpacked checkpoint zip), applied to --base-model")
    p.add_argument("--out", required=True,
                   help="output folder: <dataset>/ per dataset (caption files, captions.parquet, caption_report.json)")
    p.add_argument("--queries", help="one query map (with --database) instead of the configured datasets")
    p.add_argument("--database", help="the database_mod.json of --queries (concept names, info, images)")
    args = p.parse_args(argv)
    params = params_of(args)
    use_threads(params["base"]["threads"])
    if args.adapter and not args.base_model:
        raise RepicError("--adapter needs --base-model (the model the LoRA adapter applies to)")
    if bool(args.queries) != bool(args.database):
        raise RepicError("--queries and --database go together (one query map and its database)")
    if args.adapter:  # an adapter made for another base fails here, in one line, not after the first dataset
        check_adapter(find_adapter(args.adapter), args.base_model)
    if args.queries:
        jobs = [(args.queries, args.database, Path(args.retrieval) / RETRIEVAL_REPORT, Path())]
    else:
        datasets = eval_datasets(params["base"]["data"]["datasets"], args.setting)
        if not datasets:
            raise RepicError(f"base.data.datasets: no dataset has a '{args.setting}' query map")
        jobs = [(d["queries"][args.setting], d["database"], Path(args.retrieval) / d["name"] / RETRIEVAL_REPORT,
                 Path(d["name"])) for d in datasets]
    for _, _, retrieval, _ in jobs:
        if not retrieval.is_file():
            raise RepicError(f"{retrieval}: no retrieval for this dataset (the retrieve stage of setting "
                             f"{args.setting} writes one per dataset: dvc repro retrieve@{args.setting})")
    cfg = params["caption"]
    options = {"batch_size": cfg["batch_size"], "max_new_tokens": cfg["max_new_tokens"], "backend": cfg["backend"],
               "conversation": cfg["conversation"], "question_list": cfg["question_list"],
               "preprocess": cfg["preprocess"], "max_pixels": cfg["max_pixels"]}
    prompt = cfg["prompts"].get(args.row, "plain")
    # All or nothing: every file of every dataset lands in --out together, when the last one is written.
    with staged_outputs(args.out) as stage:
        for queries, database, retrieval, rel in jobs:
            caption_dataset(args, params, options, prompt, queries, database, retrieval, stage / rel)


def caption_dataset(args: argparse.Namespace, params: dict, options: dict, prompt: str, queries: str, database: str,
                    retrieval: Path, out: Path) -> None:
    """One query map's caption files, caption report and Parquet table, written into `out`."""
    rows, report = run_setting(args.setting, queries, database, args.root, read_json(retrieval), args.row,
                               model=args.model, adapter=args.adapter, base_model=args.base_model, params=options,
                               device=params["base"]["device"], dtype=params["base"]["dtype"], prompt=prompt,
                               retrieval_source=str(retrieval))
    for name, file_rows in rows.items():
        write_json(out / run_file(name), file_rows)
    write_json(out / CAPTION_REPORT, {**report, "retrieval": {"file": str(retrieval),
                                                              "sha256": file_sha256(retrieval)}})
    write_parquet(out / CAPTIONS_PARQUET, pd.DataFrame(
        [{"run": name, "query_image": r[0], "gt_keys": r[1], "caption": r[2], "question": r[3]}
         for name, file_rows in rows.items() for r in file_rows]))


if __name__ == "__main__":
    sys.exit(run(main))
