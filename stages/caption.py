"""Caption one setting's queries (single | multi2 | multi4): {base, trained} x {skip, retrieval}.

Writes RePIC caption files `<model>_<mode>.json`, `captions.parquet` and `retrieval.json` (recall@k).
Example: python -m stages.caption --setting single --queries Q.json --database D.json --root data/world \
    --index data/db --model data/models/base --adapter results/train/adapter --out results/captions/single
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from repic.captioning import SETTINGS, run_setting
from repic.cli import params_of, parser, run
from repic.io import write_json, write_parquet


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--setting", required=True, choices=SETTINGS)
    for name in ("--queries", "--database", "--root", "--index", "--model", "--out"):
        p.add_argument(name, required=True)
    p.add_argument("--adapter", help="LoRA adapter of the trained model (without it: base captions only)")
    args = p.parse_args(argv)
    params = params_of(args)
    rows, retrieval = run_setting(args.setting, args.queries, args.database, args.root, args.index, args.model,
                                  args.adapter, params["caption"], device=params["base"]["device"],
                                  dtype=params["base"]["dtype"])
    out = Path(args.out)
    for name, file_rows in rows.items():
        write_json(out / f"{name}.json", file_rows)
    write_json(out / "retrieval.json", retrieval)
    write_parquet(out / "captions.parquet", pd.DataFrame(
        [{"run": name, "query_image": r[0], "gt_keys": r[1], "caption": r[2], "question": r[3]}
         for name, file_rows in rows.items() for r in file_rows]))


if __name__ == "__main__":
    sys.exit(run(main))
