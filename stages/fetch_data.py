"""Fetch the pipeline's inputs: data root in RePIC's layout + base model (synthetic world, or declared sources).

Example: python -m stages.fetch_data --out-data data/world --out-model data/models/base
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from repic.core.cli import parser, run
from repic.core.params import params_of
from repic.data.fetch import fetch_real, fetch_synthetic
from repic.data.sources import rerecord_from_env


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--out-data", required=True,
                   help="data root to write, in RePIC's layout (databases, query maps, images, training JSON)")
    p.add_argument("--out-model", required=True, help="folder to write the base model into (from_pretrained)")
    p.add_argument("--re-record", action="append", default=[], metavar="NAME",
                   help="record this 'record: true' source again, replacing its value in the lock file "
                        "(repeatable; 'all': every one). Under dvc repro: REPIC_RERECORD=NAME[,NAME]")
    args = p.parse_args(argv)
    # The DAG's first stage checks the whole params file, GRPOConfig/LoraConfig included: under `dvc repro` a typo
    # in a later stage's section fails here, in seconds, not after the downloads.
    params = params_of(args, libraries=True)
    cfg, base = params["fetch_data"], params["base"]
    if cfg["source"] == "synthetic":
        summary = fetch_synthetic(args.out_data, args.out_model, cfg, seed=base["seed"], threads=base["threads"])
    else:  # real: hub repos, hashed URLs and local folders declared in fetch_data.sources, then validation
        summary = fetch_real(args.out_data, args.out_model, cfg, base["data"], seed=base["seed"],
                             rerecord=[*args.re_record, *rerecord_from_env()])
    print(summary)


if __name__ == "__main__":
    sys.exit(run(main))
