"""Pairwise LLM judge of trained vs base captions (both orders, ties, cached): verdicts + win rates.

Example: python -m stages.judge_llm --captions results/captions --root data/world --out results/judge
(the caption folders and databases of params `base.data.datasets`)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from repic.core.cli import params_of, parser, run
from repic.core.io import write_json, write_parquet
from repic.core.layout import JUDGE_CACHE, MODES, SETTINGS, VERDICTS, WIN_RATES, layout_of
from repic.eval.judge import AnswerCache, build_pairs, judge_pairs, local_judge, openai_judge, win_rates


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--captions", required=True,
                   help="caption folder of a pipeline run (<setting>/<dataset>/<model>_<mode>.json)")
    p.add_argument("--root", required=True, help="data root the query and reference image paths are relative to")
    p.add_argument("--out", required=True,
                   help="output folder: win_rates.json, verdicts.parquet, cache.jsonl (answers, kept across runs)")
    args = p.parse_args(argv)
    params = params_of(args)
    cfg, base = params["judge_llm"], params["base"]
    out = Path(args.out)
    if cfg["backend"] == "none":
        write_json(out / WIN_RATES, {"status": "not run", "reason": "judge_llm.backend is 'none'"})
        write_parquet(out / VERDICTS, pd.DataFrame(columns=["setting", "dataset", "mode", "query_image"]))
        return
    # ---- judge backend
    if cfg["backend"] == "local":
        backend_id, ask = local_judge(cfg["model"], device=base["device"], dtype=base["dtype"],
                                     max_new_tokens=cfg["max_new_tokens"])
    else:
        backend_id, ask = openai_judge(**cfg["openai"], max_new_tokens=cfg["max_new_tokens"])
    # ---- pairs, verdicts, win rates
    pairs = build_pairs(args.captions, layout_of(base["data"]["datasets"]), args.root, cfg["max_pairs"])
    cache = AnswerCache(out / JUDGE_CACHE)
    # Each answer is appended to cache.jsonl as it comes: a failure or a kill keeps what was paid for.
    records = judge_pairs(pairs, backend_id, ask, cache, max_requests=cfg["max_requests"])
    frame = pd.DataFrame(records)
    seed = base["seed"]
    summary = {"status": "ok", "backend": backend_id.split(":")[0], "asked": cache.asked,
               "pairs_left_out_by_budget": len(pairs) - len(records),
               "overall": win_rates(records, seed=seed),
               **{f"{s}_{m}": win_rates([r for r in records if r["setting"] == s and r["mode"] == m], seed=seed)
                  for s in SETTINGS for m in MODES}}
    write_json(out / WIN_RATES, summary)
    write_parquet(out / VERDICTS, frame)


if __name__ == "__main__":
    sys.exit(run(main))
