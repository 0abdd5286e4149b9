r"""Retrieve the reference concepts of one setting's queries (single | multi2 | multi4), once, for every evaluation
dataset that has this setting (`base.data.datasets`): the detector's crops of each query image, embedded as build_db
embedded the database (the index's embedder), against that dataset's index; the top-k concepts (params
`caption.top_k`) per query.

Every model row's caption stage of the setting reads the result (caption_<setting>@<row> --retrieval), so all rows
show the same references and a new row retrieves nothing. dvc.yaml runs one stage per setting (retrieve@<setting>).
Writes, per dataset, `<out>/<dataset>/retrieval.json`: per query the keys retrieved and every hit (rank, key, image,
score, crop, missing), recall@k, `left_out` (query entries left out as invalid, each with why), `n_unlisted_hits`
(hits on images the database does not list, which show no reference), `n_queries_without_references`.
Example: python -m stages.retrieve --setting single --root data/world --index data/db --out results/retrieval/single
One query map: add --queries Q.json --database D.json (--index is then that database's index folder, and
retrieval.json goes straight into --out).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from repic.core.cli import parser, run
from repic.core.io import RepicError, staged_outputs, write_json
from repic.core.layout import DB_MANIFEST, INDEX_META, RETRIEVAL_REPORT, SETTINGS, eval_datasets
from repic.core.params import params_of
from repic.eval.retrieve import retrieve_setting
from repic.vlm.models import use_threads

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--setting", required=True, choices=SETTINGS, help="which query maps to retrieve for")
    p.add_argument("--root", required=True, help="data root the query and database image paths are relative to")
    p.add_argument("--index", required=True,
                   help="build_db's output folder (one <dataset>/ index each); with --queries: that index folder")
    p.add_argument("--out", required=True, help="output folder: <dataset>/retrieval.json per dataset")
    p.add_argument("--queries", help="one query map (with --database) instead of the configured datasets")
    p.add_argument("--database", help="the database_mod.json of --queries (its categories prompt the detector)")
    args = p.parse_args(argv)
    params = params_of(args)
    use_threads(params["base"]["threads"])
    if bool(args.queries) != bool(args.database):
        raise RepicError("--queries and --database go together (one query map and its database)")
    if args.queries:
        jobs = [(args.queries, args.database, Path(args.index), Path(), args.queries)]
    else:
        datasets = eval_datasets(params["base"]["data"]["datasets"], args.setting)
        if not datasets:
            raise RepicError(f"base.data.datasets: no dataset has a '{args.setting}' query map")
        jobs = [(d["queries"][args.setting], d["database"], Path(args.index) / d["name"], Path(d["name"]), d["name"])
                for d in datasets]
    for _, _, index, _, _ in jobs:
        if not (index / INDEX_META).is_file():
            raise RepicError(f"{index}: no retrieval index for this dataset (build_db builds one per dataset; "
                             f"see {index.parent / DB_MANIFEST} for the ones it skipped)")
    cfg = params["caption"]
    options = {"detector": cfg["detector"], "detector_kwargs": cfg["detector_kwargs"], "retrieval": cfg["retrieval"]}
    k = cfg["top_k"][args.setting]
    # All or nothing: every dataset's retrieval.json lands in --out together, when the last one is written.
    with staged_outputs(args.out) as stage:
        for queries, database, index, rel, name in jobs:
            report = retrieve_setting(args.setting, queries, database, args.root, str(index), params=options, k=k,
                                      device=params["base"]["device"])
            write_json(stage / rel / RETRIEVAL_REPORT, report)
            # one line per dataset and setting: `dvc repro` shows retrieval ran once, not once per model row
            log.info("retrieved %s %s: %d queries, recall@%d %.4f (%s)", args.setting, name, report["n_queries"], k,
                     report["recall_at_k"], cfg["detector"])


if __name__ == "__main__":
    sys.exit(run(main))
