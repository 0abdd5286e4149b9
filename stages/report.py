r"""Write the static visual report: results/report/index.html + PNG plots (open the file, no server needed).

Example: python -m stages.report --captions results/captions --metrics results/score/metrics.json \
    --slots results/score/slots.parquet --retrieval results/retrieval --train-log results/train/log.jsonl \
    --root data/world --out results/report --plots results/plots
(the caption folders and databases of params `base.data.datasets`; each query's retrieved references and recall@k
from the retrieve stages' retrieval.json)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from repic.core.cli import parser, run
from repic.core.layout import layout_of, model_labels
from repic.core.params import params_of
from repic.eval.report import build_report, write_plots_data


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--captions", required=True,
                   help="caption folder of a pipeline run (<setting>/<model>/<dataset>/<model>_<mode>.json)")
    p.add_argument("--metrics", required=True, help="the score stage's metrics.json")
    p.add_argument("--slots", required=True, help="the score stage's slots.parquet (its per-name verdicts)")
    p.add_argument("--retrieval", required=True,
                   help="the retrieve stages' folder (<setting>/<dataset>/retrieval.json: references, recall@k)")
    p.add_argument("--train-log", required=True, help="train_grpo_lora's per-step log.jsonl")
    p.add_argument("--root", required=True, help="data root the query image paths are relative to")
    p.add_argument("--out", required=True, help="output folder: index.html and its PNG plots")
    p.add_argument("--plots", required=True, help="output folder of the data of dvc.yaml's plots (dvc plots show)")
    args = p.parse_args(argv)
    params = params_of(args)
    build_report(args.out, captions_dir=args.captions, metrics_path=args.metrics, slots_path=args.slots,
                 retrieval_dir=args.retrieval, train_log=args.train_log,
                 layout=layout_of(params["base"]["data"]["datasets"]), root=args.root,
                 max_queries=params["report"]["max_queries"], labels=model_labels(params))
    write_plots_data(args.plots, train_log=args.train_log, metrics_path=args.metrics, labels=model_labels(params))


if __name__ == "__main__":
    sys.exit(run(main))
