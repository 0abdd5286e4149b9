"""Merge the LoRA adapter into the base, verify it (logits fp32/bf16, identical captions), write the report.

Example: python -m stages.merge_lora --model data/models/base --adapter results/train/adapter \
    --queries Q.json --database D.json --root data/world --out results/merged
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from repic.captioning import build_conversation, expand_queries
from repic.cli import params_of, parser, run
from repic.io import read_json, write_json
from repic.merge import check, merge_and_verify


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    for name in ("--model", "--adapter", "--queries", "--database", "--root", "--out"):
        p.add_argument(name, required=True)
    args = p.parse_args(argv)
    cfg = params_of(args)["merge_lora"]
    database = read_json(args.database)
    queries = expand_queries(read_json(args.queries), "single", source=args.queries)[: cfg["n_inputs"]]
    for q in queries:
        q.ref_keys = list(q.gt_keys)
    conversations = [build_conversation(q, database, args.root) for q in queries]
    out = Path(args.out)
    report = merge_and_verify(args.model, args.adapter, out / "model", conversations,
                              tolerance=cfg["tolerance"], max_new_tokens=cfg["max_new_tokens"])
    write_json(out / "merge_report.json", report)
    check(report)


if __name__ == "__main__":
    sys.exit(run(main))
