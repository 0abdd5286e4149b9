"""The embedded base's warm-up on one CPU thread: today's path against the one before it, in the same process.

`fetch_data`'s warm-up (repic.synthetic.warmup) is most of `make repro` and the critical path of `make test`. This
times the same steps of it, on params.yaml's world, tiny model and warm-up settings (fewer examples and steps), along
two paths, each from the same freshly built model:

- `before`: each batch one padded batch, the patch embedding as the model's Conv3d (the code before 2026-12-06);
- `ours`: each batch split by number of images (`_batches`), the patch embedding as a matrix product
  (`patch_embedding_as_matmul`), each image processed once per batch (`repic.vlm.image_memo`).

Both include tokenising each batch on first use, as the warm-up does. Prints seconds and the last loss of each (the
losses agree to float rounding: tests/test_warmup.py checks loss and gradients) and writes JSON.

    OMP_NUM_THREADS=1 python bench/warmup_cpu.py --out bench/out/warmup_cpu.json   # ~2 min
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--drill-steps", type=int, default=60)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import torch
    import yaml

    from repic.data.fetch import world_texts
    from repic.synthetic import warmup as W
    from repic.synthetic.tiny_model import build_tiny_model
    from repic.synthetic.world import make_world

    torch.set_num_threads(1)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    fd, seed = params["fetch_data"], params["base"]["seed"]
    world, wcfg = fd["world"], fd["warmup"]
    common = dict(seed=seed, n_concepts=world["n_concepts"], n_train_concepts=None)
    rates = dict(n_distractors=world["n_distractors"], image_size=world["image_size"], n_names=wcfg["names"],
                 name_rate=wcfg["name_rate"], name_rate_asked=wcfg["name_rate_asked"])

    def data():  # fresh lists each run: the warm-up releases images once tokenised
        return (W.warmup_examples(**common, **rates, n_examples=80),
                W.warmup_examples(**common, **rates, n_examples=160, kinds=("judge",), tag="judge"),
                W.naming_drills(**common, n=320, n_names=wcfg["names"], n_distractors=world["n_distractors"],
                                image_size=world["image_size"]))

    ours = (W._batches, W.patch_embedding_as_matmul)
    paths = {"before": (lambda processor, examples: [W._batch(processor, examples)], lambda model: None),
             "ours": ours}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        summary = make_world(root / "data", seed=seed, **world)
        keys = [*summary["concepts"], *summary["train_concepts"]]
        names = [*keys, *W.warmup_names(seed, wcfg["names"], avoid=set(keys))]
        examples, _, _ = data()
        texts = [*world_texts(root / "data"), *(json.dumps(e["messages"]) + e["target"] for e in examples),
                 " ".join(names * 30)]
        build_tiny_model(root / "built", texts, fd["tiny_model"], seed=seed, names=names)
        for name, (batches, embedding) in paths.items():
            shutil.copytree(root / "built", root / name)
            examples, judge, drills = data()
            W._batches, W.patch_embedding_as_matmul = batches, embedding
            try:
                start = time.perf_counter()
                losses = W.warmup(root / name, examples, steps=args.steps, batch_size=wcfg["batch_size"],
                                  learning_rate=wcfg["learning_rate"], seed=seed, drills=drills, judge=judge,
                                  drill_batch_size=wcfg["drill_batch_size"], drill_steps=args.drill_steps,
                                  warmup_steps=5, freeze_embeddings=True, threads=1)
                seconds = time.perf_counter() - start
            finally:
                W._batches, W.patch_embedding_as_matmul = ours
            results[name] = {"seconds": round(seconds, 2), "last_loss": losses[-1]}
            print(f"{name}: {seconds:.1f} s for {args.drill_steps} + {args.steps} steps, last loss {losses[-1]:.6f}",
                  flush=True)
    results["speedup"] = round(results["before"]["seconds"] / results["ours"]["seconds"], 3)
    print(f"ours is {results['speedup']:.2f}x the path before")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"drill_steps": args.drill_steps, "steps": args.steps, **results}, indent=1))


if __name__ == "__main__":
    main()
