"""Write the seeded, reward-stratified training subset + its manifest (and a Parquet copy).

Example: python -m stages.subset_2k --train-json data/world/data/training/train.json --out data/subset
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from repic.core.cli import parser, run
from repic.core.io import read_json, write_json, write_parquet
from repic.core.layout import SUBSET_HELDOUT, SUBSET_MANIFEST, SUBSET_PARQUET, SUBSET_TRAIN
from repic.core.params import params_of
from repic.data.subset import stratified_subset
from repic.data.validate import validate_training


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--train-json", required=True, help="RePIC's training JSON to draw the subset from")
    p.add_argument("--out", required=True,
                   help="output folder: train_subset.json, heldout.json, manifest.json, .parquet")
    args = p.parse_args(argv)
    params = params_of(args)
    samples = validate_training(read_json(args.train_json), args.train_json)
    chosen, manifest = stratified_subset(samples, params["subset_2k"]["n_samples"], params["base"]["seed"])
    subset = [samples[i] for i in chosen]
    out = Path(args.out)
    write_json(out / SUBSET_TRAIN, subset)
    write_json(out / SUBSET_MANIFEST, {**manifest, "source": args.train_json, "indices": chosen})
    # the rest of the JSON, never trained on: train_grpo_lora compares base and trained rewards on part of it
    taken = set(chosen)
    write_json(out / SUBSET_HELDOUT, [s for i, s in enumerate(samples) if i not in taken])
    frame = pd.DataFrame({"source_index": chosen, **{k: [json.dumps(s[k]) if not isinstance(s[k], str) else s[k]
                                                        for s in subset] for k in subset[0]}})
    write_parquet(out / SUBSET_PARQUET, frame)


if __name__ == "__main__":
    sys.exit(run(main))
