"""Captioning's defaults on this machine, end to end through `repic.vlm.generation.generate`: the static backend
as the caption stage calls it (no option given: on CUDA every image's features kept across batches and prompts that
begin alike prefilled once) against HF `generate` (RePIC's path), on the tiny Qwen2.5-VL in fp32 with its language
model re-drawn at unit gain (tests/test_generation.py's `_chaotic`), over conversations whose references recur.
Prints the token agreement, which prefill ran, the images the tower encoded and the tokens the language model ran;
exits 1 where any caption differs.

    python bench/generate_defaults.py            # CUDA when there is one (the device), else CPU
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from repic.core.prompts import caption_messages  # noqa: E402
from repic.synthetic.tiny_model import build_tiny_model  # noqa: E402
from repic.vlm import generation as gen  # noqa: E402
from repic.vlm.models import load_model, load_processor  # noqa: E402

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vision_hidden_size=32, vision_depth=2, vision_heads=2, min_pixels=3136,
            max_pixels=12544)


def conversations(processor, n: int):
    pool = [Image.new("RGB", size, (40 * i, 200 - 30 * i, 90 + 7 * i)) for i, size in
            enumerate([(112, 84), (56, 112), (112, 84), (140, 56), (84, 84)])]
    queries = [Image.new("RGB", (98, 84), (10, 40 * i, 200)) for i in range(4)]
    texts, images = [], []
    for i in range(n):
        refs = [(i // 3 + j) % len(pool) for j in range(1 + i % 3)]
        msgs = caption_messages([{"name": f"<c{r}>", "info": "x" * (3 + 4 * r)} for r in refs], "Caption this.")
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        images.append([pool[r] for r in refs] + [queries[i % len(queries)]])
    return texts, images


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "model", ["This is the query image. Name: <zorp>, Info: a toy."] * 20,
                                  TINY, seed=0)
        model, processor = load_model(folder, device=device, dtype="float32"), load_processor(folder)
    gen_ = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            if p.ndim == 2:
                p.copy_((torch.randn(p.shape, generator=gen_) / p.shape[1] ** 0.5).to(p.device))
    texts, images = conversations(processor, 24)
    counts = {"tower_images": 0, "lm_tokens": 0}
    hooks = [model.model.visual.register_forward_pre_hook(
                 lambda m, a, k: counts.__setitem__("tower_images", counts["tower_images"] + len(k["grid_thw"])),
                 with_kwargs=True),
             model.model.language_model.register_forward_pre_hook(
                 lambda m, a, k: counts.__setitem__("lm_tokens", counts["lm_tokens"] + (  # prefill positions
                     k["inputs_embeds"].shape[0] * k["inputs_embeds"].shape[1] if k["inputs_embeds"].shape[1] > 1
                     else 0)), with_kwargs=True)]
    modes = []
    original = gen._prefill
    gen._prefill = lambda core, inputs, positions, mode="batch": modes.append(mode) or original(core, inputs,
                                                                                                 positions, mode)
    out = {"device": device, "torch": torch.__version__}
    try:
        runs = {}
        for name, kw in (("hf", dict(backend="hf")), ("static_defaults", dict(backend="static")),
                         ("static_plain", dict(backend="static", features_once=False, prefill_prefix=False))):
            counts.update(tower_images=0, lm_tokens=0)
            modes.clear()
            runs[name] = gen.generate(model, processor, texts, images, max_new_tokens=24, batch_size=8, **kw)
            out[name] = {**counts, "prefill_modes": sorted(set(modes))}
    finally:
        gen._prefill = original
        for h in hooks:
            h.remove()
    out["captions"] = len(texts)
    out["distinct_captions"] = len(set(runs["hf"]))
    out["same_as_hf"] = {k: sum(a == b for a, b in zip(v, runs["hf"])) for k, v in runs.items()}
    print(json.dumps(out, indent=1))
    return 0 if all(v == len(texts) for v in out["same_as_hf"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
