"""Pairwise LLM judge of every model row vs the reference row (params `judge_llm.reference`; protocol both_orders:
both orders, ties; repic: RePIC's request, one order; cached): verdicts + win rates, one entry per row.

Example: python -m stages.judge_llm --captions results/captions --root data/world --out results/judge
(the caption folders and databases of params `base.data.datasets`, the rows of params `models`)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from repic.core.cli import parser, run
from repic.core.io import staged_outputs, write_json, write_parquet
from repic.core.layout import JUDGE_CACHE, MODES, SETTINGS, VERDICTS, WIN_RATES, layout_of, model_labels
from repic.core.params import params_of
from repic.eval.judge import AnswerCache, build_pairs, judge_pairs, local_judge, openai_judge, win_rates


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--captions", required=True,
                   help="caption folder of a pipeline run (<setting>/<model>/<dataset>/<model>_<mode>.json)")
    p.add_argument("--root", required=True, help="data root the query and reference image paths are relative to")
    p.add_argument("--out", required=True,
                   help="output folder: win_rates.json, verdicts.parquet, cache.jsonl (answers, kept across runs)")
    args = p.parse_args(argv)
    params = params_of(args)
    cfg, base = params["judge_llm"], params["base"]
    if cfg["backend"] == "local":
        from repic.vlm.models import use_threads  # torch only for the local judge

        use_threads(base["threads"])
    out = Path(args.out)
    if cfg["backend"] == "none":
        with staged_outputs(out) as stage:
            write_json(stage / WIN_RATES, {"status": "not run", "reason": "judge_llm.backend is 'none'"})
            write_parquet(stage / VERDICTS, pd.DataFrame(columns=["setting", "dataset", "mode", "query_image",
                                                                  "reference", "model"]))
        return
    # ---- judge backend
    if cfg["backend"] == "local":
        backend_id, ask = local_judge(cfg["model"], device=base["device"], dtype=base["dtype"],
                                     max_new_tokens=cfg["max_new_tokens"])
    else:
        backend_id, ask = openai_judge(**cfg["openai"], max_new_tokens=cfg["max_new_tokens"])
    # ---- pairs, verdicts, win rates
    labels, reference = model_labels(params), cfg["reference"]
    pairs = build_pairs(args.captions, layout_of(base["data"]["datasets"]), args.root, cfg["max_pairs"], reference,
                        list(labels))
    cache = AnswerCache(out / JUDGE_CACHE)
    # Each answer is appended to cache.jsonl as it comes: a failure or a kill keeps what was paid for.
    records = judge_pairs(pairs, backend_id, ask, cache, max_requests=cfg["max_requests"], protocol=cfg["protocol"])
    frame = pd.DataFrame(records)
    seed = base["seed"]

    def rates(model: str) -> dict:
        mine = [r for r in records if r["model"] == model]
        return {"label": labels[model], "overall": win_rates(mine, seed=seed),
                **{f"{s}_{m}": win_rates([r for r in mine if r["setting"] == s and r["mode"] == m], seed=seed)
                   for s in SETTINGS for m in MODES}}

    summary = {"status": "ok", "backend": backend_id.split(":")[0], "protocol": cfg["protocol"], "asked": cache.asked,
               "pairs_left_out_by_budget": len(pairs) - len(records),
               "reference": reference, "reference_label": labels[reference],
               # one entry per model row, in params order: the reference's win rate against it, both orders asked
               "versus": {m: rates(m) for m in labels if m != reference}}
    with staged_outputs(out) as stage:  # both or neither (cache.jsonl, appended as answers come, stays)
        write_json(stage / WIN_RATES, summary)
        write_parquet(stage / VERDICTS, frame)


if __name__ == "__main__":
    sys.exit(run(main))
