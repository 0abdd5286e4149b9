"""Write the static visual report: results/report/index.html + PNG plots (open the file, no server needed).

Example: python -m stages.report --captions results/captions --metrics results/score/metrics.json \
    --train-log results/train/log.jsonl --database D.json --root data/world --out results/report
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from repic.cli import params_of, parser, run
from repic.report import build_report


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    for name in ("--captions", "--metrics", "--train-log", "--database", "--root", "--out"):
        p.add_argument(name, required=True)
    args = p.parse_args(argv)
    build_report(args.out, captions_dir=args.captions, metrics_path=args.metrics, train_log=args.train_log,
                 database_path=args.database, root=args.root, max_queries=params_of(args)["report"]["max_queries"])


if __name__ == "__main__":
    sys.exit(run(main))
