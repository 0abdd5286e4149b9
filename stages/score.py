"""Score caption files with RePIC's name P/R/F1 protocol: metrics.json, a paper-style table, per-slot Parquet.

Example: python -m stages.score --captions results/captions --database D.json --out results/score
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from repic.cli import params_of, parser, run
from repic.io import read_json, write_json, write_parquet, write_text
from repic.scoring import score_runs
from repic.tables import metrics_table, to_markdown


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    for name in ("--captions", "--database", "--out"):
        p.add_argument(name, required=True)
    args = p.parse_args(argv)
    protocol = params_of(args)["score"]["protocol"]
    metrics, slots = score_runs(args.captions, protocol, read_json(args.database))
    out = Path(args.out)
    write_json(out / "metrics.json", metrics)
    write_text(out / "table.md", f"Name precision / recall / F1 (%), protocol `{protocol}`\n\n"
               + to_markdown(metrics_table(metrics)))
    write_parquet(out / "slots.parquet", pd.DataFrame(slots))


if __name__ == "__main__":
    sys.exit(run(main))
