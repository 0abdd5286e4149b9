"""How often the paper config's captioning path gives other greedy captions than RePIC's loop (issue 23).

RePIC's caption scripts caption one query at a time: processor on one conversation, `model.generate(use_cache=True,
do_sample=False)`, decode. The paper config captions with `caption.backend: static` (repic/vlm/generation.py) in
left-padded batches of `caption.batch_size` (16). Both are greedy; they can still differ where bf16 arithmetic
differs (padding, kernels, batch shape) and an argmax flips. This script captions the same conversations (RePIC's
conversation, k references + the query, images through repic.vlm.preprocess.fetch_image as the paper config does)
along four paths and compares each with RePIC's loop (`hf_b1`):

- `static_bB`: the paper config's path (static backend, batches of B, sorted by size as `generate_captions` does);
- `hf_bB`: HF `generate` in the same batches (separates batching from the static decoder);
- `static_b1`: the static backend one prompt at a time.

Per path: the fraction of captions whose token ids equal the reference's, the fraction of reference tokens before
the first difference (summed over captions), and the median first-difference position.

    python bench/caption_agreement.py --shape 7b --out bench/out/caption_agreement_7b.json   # GPU, bf16, random weights
    python bench/caption_agreement.py --shape standin --unit-gain --out /tmp/ca.json    # CPU: the rehearsal's stand-in
    python bench/caption_agreement.py --shape tiny --n 6 --batch 3 --new-tokens 8 --out /tmp/ca.json  # CPU smoke
    python bench/caption_agreement.py --model data/models/Qwen2.5-VL-7B-Instruct --out ...    # real weights, if present

Random weights make greedy decoding chaotic (BENCHMARKS.md, "Equality with HF generate"): their agreement is a lower
bound of what real weights, with sharper logits, give.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repic.core.prompts import question_list, repic_caption_messages  # noqa: E402
from repic.vlm.generation import generate_captions, generate_ids  # noqa: E402
from repic.vlm.preprocess import fetch_image  # noqa: E402

SIZES = [(640, 480), (480, 640), (1024, 768), (500, 500), (800, 533), (333, 500)]  # query/reference image sizes
INFO = "A small plush toy with a round face, stitched eyes and a red scarf, often seen on a wooden shelf."


def conversations(n: int, seed: int) -> list[tuple[list[dict], list[Image.Image]]]:
    """n RePIC conversations: k = 2 or 4 references (as single/multi2 and multi4), random images of real sizes
    through fetch_image, RePIC's questions in rotation, the zero-shot instruction on every other one."""
    rng = np.random.RandomState(seed)
    questions = question_list("single", "repic", "released")
    out = []
    for i in range(n):
        k = 2 if i % 3 else 4
        refs = [{"name": f"Concept {i}-{j}", "info": INFO[: 40 + 13 * ((i + j) % 5)]} for j in range(k)]
        msgs = repic_caption_messages(refs, questions[i % len(questions)], "zero_shot" if i % 2 else "plain")
        images = []
        for j in range(k + 1):
            w, h = SIZES[(i + 2 * j) % len(SIZES)]
            images.append(fetch_image(Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))))
        out.append((msgs, images))
    return out


def build(shape: str, model_dir: str | None, device: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    if model_dir:
        from repic.vlm.models import load_model, load_processor

        processor = load_processor(model_dir, max_pixels=1024 * 28 * 28)
        return load_model(model_dir, device=device, dtype={torch.bfloat16: "bfloat16", torch.float32: "float32",
                                                           torch.float16: "float16"}[dtype]), processor, model_dir
    if shape == "standin":  # the rehearsal's stand-in for Qwen2.5-VL-7B (configs/rehearsal.yaml tiny_model, seed 0)
        import yaml

        from repic.synthetic.tiny_model import build_tiny_model
        from repic.vlm.models import load_model, load_processor

        cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/rehearsal.yaml").read_text())
        tiny = cfg["fetch_data"]["tiny_model"]
        out = Path(tempfile.mkdtemp(prefix="caption_agreement_"))
        texts = [m["content"] if isinstance(m["content"], str) else " ".join(b.get("text", "") for b in m["content"])
                 for msgs, _ in conversations(6, 0) for m in msgs]
        build_tiny_model(out, texts, tiny, seed=0)
        processor = load_processor(out, max_pixels=tiny["max_pixels"])  # the rehearsal's caption.max_pixels
        model = load_model(out, device=device, dtype="float32" if dtype == torch.float32 else "bfloat16")
        return model, processor, f"rehearsal stand-in ({tiny})"
    from bench.generation import SHAPES
    from bench.generation import build as build_random

    model, processor = build_random(shape, device, dtype, 896)
    # RePIC's processor cap (1024*28*28), as the paper config's
    from transformers.image_utils import SizeDict

    processor.image_processor.size = SizeDict(shortest_edge=56 * 56, longest_edge=1024 * 28 * 28)
    return model, processor, f"random weights, {shape} shape ({SHAPES[shape]['text']['num_hidden_layers']} layers)"


def reference_loop(model: Any, processor: Any, convs: list, max_new_tokens: int) -> tuple[list[list[int]], float]:
    """RePIC's loop: one conversation at a time, HF generate, greedy, use_cache."""
    device = next(model.parameters()).device
    out, t0 = [], time.perf_counter()
    for msgs, images in convs:
        text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=images, padding=True, return_tensors="pt").to(device)
        ids = model.generate(**inputs, use_cache=True, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        out.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return out, time.perf_counter() - t0


def batched_path(model: Any, processor: Any, convs: list, max_new_tokens: int, backend: str, batch: int
                 ) -> tuple[list[list[int]], float]:
    """Token ids of `generate_captions`' path: prompts sorted by size, left-padded batches, `backend`."""
    device = next(model.parameters()).device
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in convs]
    images = [imgs for _, imgs in convs]
    sizes = [sum(im.width * im.height for im in imgs) + len(t) for t, imgs in zip(texts, images)]
    order = sorted(range(len(texts)), key=lambda i: sizes[i])
    out: list[list[int]] = [[] for _ in texts]
    decoders: dict = {}
    t0 = time.perf_counter()
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        inputs = processor(text=[texts[i] for i in idx], images=[images[i] for i in idx], return_tensors="pt",
                           padding=True, padding_side="left").to(device)
        ids = generate_ids(model, inputs, backend=backend, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=processor.tokenizer.pad_token_id, _decoders=decoders)
        for i, row in zip(idx, ids):
            out[i] = row
    return out, time.perf_counter() - t0


def compare(ref: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    prefix = []
    for a, b in zip(ref, got):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix.append(n)
    exact = [a == b for a, b in zip(ref, got)]
    firsts = [p for p, e in zip(prefix, exact) if not e]
    return {"captions_identical": sum(exact) / len(ref),
            "tokens_before_first_difference": sum(prefix) / max(1, sum(len(a) for a in ref)),
            "median_first_difference": statistics.median(firsts) if firsts else None,
            "n_captions": len(ref)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["7b", "tiny", "standin"], default="7b")
    p.add_argument("--model", help="a real Qwen2.5-VL folder instead of random weights (overrides --shape)")
    p.add_argument("--device", default=None, help="default: cuda for 7b/--model, cpu otherwise")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--n", type=int, default=64, help="conversations")
    p.add_argument("--batch", type=int, default=16, help="the paper config's caption.batch_size")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unit-gain", action="store_true",
                   help="re-draw the language model's matrices at unit gain (tests/test_generation.py's _chaotic): the "
                        "stand-in's 0.02-std init repeats one token whatever the prompt, which agrees trivially")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    device = a.device or ("cuda" if a.shape == "7b" or a.model else "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype or ("bfloat16" if device.startswith("cuda")
                                                                               else "float32")]
    torch.manual_seed(a.seed)
    model, processor, what = build(a.shape, a.model, device, dtype)
    if a.unit_gain:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for w in model.model.language_model.parameters():
                if w.ndim == 2:
                    w.copy_((torch.randn(w.shape, generator=gen) / w.shape[1] ** 0.5).to(w.dtype))
        what += ", language model re-drawn at unit gain"
    convs = conversations(a.n, a.seed)
    ref, ref_s = reference_loop(model, processor, convs, a.new_tokens)
    result: dict[str, Any] = {"model": what, "device": torch.cuda.get_device_name() if device.startswith("cuda")
                              else "cpu", "dtype": str(dtype).removeprefix("torch."), "n": a.n,
                              "new_tokens": a.new_tokens, "reference": {
                                  "path": "hf_b1 (RePIC's loop)", "s": ref_s,
                                  "mean_tokens": sum(map(len, ref)) / len(ref),
                                  "share_at_max_new_tokens": sum(len(r) >= a.new_tokens for r in ref) / len(ref),
                                  # a degenerate model repeats one token: agreement would then mean little
                                  "mean_distinct_tokens": sum(len(set(r)) for r in ref) / len(ref),
                                  "distinct_captions": len({tuple(r) for r in ref})},
                              "paths": {}}
    for name, backend, batch in ((f"static_b{a.batch}", "static", a.batch), (f"hf_b{a.batch}", "hf", a.batch),
                                 ("static_b1", "static", 1)):
        got, s = batched_path(model, processor, convs, a.new_tokens, backend, batch)
        result["paths"][name] = {**compare(ref, got), "s": s}
        print(name, json.dumps(result["paths"][name]), flush=True)
    # the captions as text too (paper path vs reference), a check that the comparison above is of the same thing
    texts = generate_captions(model, processor, convs, batch_size=a.batch, max_new_tokens=a.new_tokens,
                              backend="static")
    result["paper_path_captions_equal_decoded_ids"] = texts == [
        processor.tokenizer.decode(r, skip_special_tokens=True).strip()
        for r in batched_path(model, processor, convs, a.new_tokens, "static", a.batch)[0]]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
