"""Host work of the training stage's image memo (repic.vlm.image_memo, `preprocess_once`) on one GRPO step's images,
CPU only: RePIC-like samples (bench/perf.py's `grpo_samples`, 1000-1600 px) resized as the paper recipe resizes them
(`build_examples`: short side 512 in a list, 1024 alone), processed by Qwen2.5-VL's PIL image processor at RePIC's
pixel bounds. Times, in one run, the memo's content key of the arrays `_preprocess` receives (channel-first views of
channel-last buffers) as the memo computes it now (`_content_key`: XXH3-128 of the bytes in memory order) against
its two former versions (a contiguous copy, then blake2b or XXH3-128); the join of the step's patches
(`np.concatenate`); and the memoized processor's whole call, cold (every image new) and warm (every image a hit:
TRL's second call of a step).

    python bench/host_memo.py --rows 16 --reps 5 --out bench/results/DATE-cpu-host-memo.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import perf  # noqa: E402


def timed(fn: Any, reps: int) -> float:
    """Median milliseconds of `reps` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16, help="samples in the step (the paper recipe's 16 completions)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import xxhash
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from repic.train.grpo import build_examples
    from repic.vlm import image_memo

    work = Path(tempfile.mkdtemp())
    samples = perf.grpo_samples(work, args.rows)
    images = [im for ex in build_examples(samples, work, seed=0) for im in ex["images"]]
    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)  # RePIC's GRPOScriptArguments
    memo = image_memo.memoize_image_processor(processor)
    seen: list[np.ndarray] = []
    inner = image_memo._memo_preprocess

    def recording(self: Any, arrays: list, *a: Any, **kw: Any) -> Any:
        seen.extend(arrays)
        return inner(self, arrays, *a, **kw)

    type(processor)._preprocess = recording
    t = time.perf_counter()
    out = processor(images, return_tensors="pt")
    cold_ms = (time.perf_counter() - t) * 1e3
    type(processor)._preprocess = inner
    warm_ms = timed(lambda: processor(images, return_tensors="pt"), args.reps)
    parts = [p for p, _ in list(memo.entries.values())[-len(seen):]]

    res: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "rows": args.rows,
        "images": len(images), "image_bytes_mb": sum(a.nbytes for a in seen) / 1e6,
        "patches_mb": float(out["pixel_values"].numel() * 4 / 1e6),
        "key_ms": {
            "copy + blake2b (to 80a9c71)": timed(lambda: [hashlib.blake2b(np.ascontiguousarray(a).data,
                                                                          digest_size=16).digest() for a in seen],
                                                 args.reps),
            "copy + xxh3_128 (6bb913f)": timed(lambda: [xxhash.xxh3_128_digest(np.ascontiguousarray(a).data)
                                                       for a in seen], args.reps),
            "memory order + xxh3_128 (now)": timed(lambda: [image_memo._content_key(a) for a in seen], args.reps)},
        "join_ms": {"np.concatenate": timed(lambda: np.concatenate(parts, axis=0), args.reps)},
        "processor_call_ms": {"cold": cold_ms, "warm": warm_ms},
        "memo": [memo.requested, memo.processed]}
    first, *_, now = res["key_ms"].values()
    res["key_ms"]["speedup_vs_first"] = first / now
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
