r"""GRPO + LoRA post-training with RePIC's rewards: adapter, per-step log and a training summary.

Example: python -m stages.train_grpo_lora --model data/models/base --train data/subset/train_subset.json \
    --heldout data/subset/heldout.json --root data/world --out results/train
summary.json: the per-step log's first vs last quarter, and (`heldout_eval` > 0) base vs trained rewards of greedy
answers on a seeded, reward-type-stratified draw of held-out samples.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from repic.core.cli import parser, run
from repic.core.io import atomic_dir, read_json, write_json, write_text
from repic.core.layout import TRAIN_ADAPTER, TRAIN_CHECKPOINTS, TRAIN_LOG, TRAIN_SUMMARY
from repic.core.params import params_of
from repic.core.progress import training_callback
from repic.data.subset import stratified_subset
from repic.data.validate import validate_training
from repic.train.grpo import heldout_rewards, summarize_log, train
from repic.vlm.models import use_threads


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="base model: local dir or hub id")
    p.add_argument("--train", required=True, help="training JSON (RePIC schema)")
    p.add_argument("--heldout", help="training-format samples not trained on (base vs trained rewards)")
    p.add_argument("--root", required=True, help="data root the training image paths are relative to")
    p.add_argument("--out", required=True,
                   help="output folder: adapter/, log.jsonl, summary.json, checkpoints/ (kept for resuming)")
    args = p.parse_args(argv)
    # Everything that can be checked is checked before any output (or resume checkpoint) is touched: the params,
    # GRPOConfig and LoraConfig included, then the data.
    params = params_of(args, libraries=True)
    base = params["base"]
    use_threads(base["threads"])
    samples = validate_training(read_json(args.train), args.train)
    n_eval = params["train_grpo_lora"]["heldout_eval"]
    heldout = validate_training(read_json(args.heldout), args.heldout) if n_eval and args.heldout else []
    out = Path(args.out)
    # Under `accelerate launch` every process (of every node) runs this stage; the first alone writes the
    # outputs. train() saves the adapter from that process only: another's atomic_dir would put an empty
    # folder in place of the adapter, whichever finished last.
    main_process = int(os.environ.get("RANK", "0")) == 0
    # ---- train
    with atomic_dir(out / TRAIN_ADAPTER) if main_process else tempfile.TemporaryDirectory() as adapter_dir:
        log = train(args.model, samples, args.root, adapter_dir, params["train_grpo_lora"],
                    checkpoint_dir=out / TRAIN_CHECKPOINTS, seed=base["seed"], device=base["device"],
                    dtype=base["dtype"], callbacks=[cb for cb in [training_callback()] if cb is not None])
    if not main_process:
        return
    # ---- save the log
    frame = pd.DataFrame(log)
    write_text(out / TRAIN_LOG, frame.to_json(orient="records", lines=True))
    summary = summarize_log(log)
    if heldout:
        chosen, _ = stratified_subset(heldout, n_eval, base["seed"])
        summary["heldout"] = heldout_rewards(args.model, out / TRAIN_ADAPTER, [heldout[i] for i in chosen],
                                             args.root, params["train_grpo_lora"], seed=base["seed"],
                                             device=base["device"], dtype=base["dtype"])
    write_json(out / TRAIN_SUMMARY, summary)


if __name__ == "__main__":
    sys.exit(run(main))
