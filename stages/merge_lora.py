r"""Merge the LoRA adapter into the base, verify the reloaded checkpoint against base+adapter (logits in fp32 and
bf16, greedy captions; RePIC's bf16 merge reported beside ours), write the report; fail, leaving no model, if it
differs (repic/train/merge.py).

Example: python -m stages.merge_lora --model data/models/base --adapter results/train/adapter \
    --root data/world --out results/merged
The fixed inputs are the first `merge_lora.n_inputs` queries of the first dataset of params `base.data.datasets`
(its first setting, single-concept when it has one), with their ground-truth references.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from repic.core.cli import parser, run
from repic.core.io import read_json, write_json
from repic.core.layout import MERGE_REPORT, MERGED_MODEL, eval_datasets
from repic.core.params import params_of
from repic.eval.captioning import build_conversation
from repic.eval.queries import expand_queries
from repic.train.merge import check, merge_and_verify
from repic.vlm.models import check_adapter, use_threads


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="base model: local dir or hub id")
    p.add_argument("--adapter", required=True, help="LoRA adapter folder (train_grpo_lora's <out>/adapter)")
    p.add_argument("--root", required=True, help="data root the query and reference image paths are relative to")
    p.add_argument("--out", required=True, help="output folder: model/ (the merged model), merge_report.json")
    args = p.parse_args(argv)
    params = params_of(args)
    use_threads(params["base"]["threads"])
    cfg = params["merge_lora"]
    check_adapter(args.adapter, args.model)  # an adapter made for another base: one line, before the merge
    dataset = eval_datasets(params["base"]["data"]["datasets"])[0]
    setting = "single" if "single" in dataset["queries"] else next(iter(dataset["queries"]))
    database = read_json(dataset["database"])
    source = dataset["queries"][setting]
    queries = expand_queries(read_json(source), setting, source=source)[: cfg["n_inputs"]]
    for q in queries:
        q.ref_keys = list(q.gt_keys)
    conversations = [build_conversation(q, database, args.root) for q in queries]
    out = Path(args.out)
    report = merge_and_verify(args.model, args.adapter, out / MERGED_MODEL, conversations,
                              tolerance=cfg["tolerance"], max_new_tokens=cfg["max_new_tokens"],
                              device=params["base"]["device"])
    write_json(out / MERGE_REPORT, report)
    check(report)


if __name__ == "__main__":
    sys.exit(run(main))
