"""RePIC's real shapes on one card (issue 12): captioning with k references, the vision tower, decode, a GRPO step.

Sections (each saved to --out as it finishes; a section that would start past --deadline-s is skipped and says so):

- `peak`: the card's bf16 matrix rate (8192³ products, median of 10) and copy bandwidth: the ceilings used.
- `decode`: the static backend's decode step (a CUDA graph), eager vs compiled and sdpa vs matmul attention, on
  one prefill per shape (`--decode-shapes`: `gen:B` = bench/generation.py's 448-px prompt and 128 tokens, `capK:B`
  = captioning with k references): ms per step, % of the bandwidth roofline (weights + KV cache read a step),
  kernel profiles by class, and a one-layer attention micro-benchmark on the real cache.
- `decode_noise`: one decode step's logits of each variant and of an fp32 copy of the model, same inputs.
- `prefill_profile`: kernel profiles of a whole captioning prefill and of the vision tower alone (the language
  model's share by difference), LM prefill TFLOP/s.
- `vision`: the vision tower alone on one captioning batch (B prompts × (k + 1) images at RePIC's captioning
  `max_pixels = 1024·28²`): transformers' sdpa tower vs repic.vlm.vision (windows bucketed by length), eager and with
  compiled blocks; seconds, TFLOP/s (counted FLOPs below), % of the measured and the datasheet peak, and the bf16
  difference to transformers' output.
- `caption`: query + k reference images (our captioning conversation, repic.core.prompts.caption_messages, RePIC's
  shape), greedy.
  Every path stops each row at the same preset length (drawn from 40-150 tokens, seeded) through a logits
  processor (HF paths: a `LogitsProcessor`; static backend: the same rule inside its captured step), so all paths
  generate the same number of tokens. Paths: `hf_b1` (RePIC's loop: `generate` one prompt at a time), `hf`
  (`generate` batched), `hf_static` (`generate(cache_implementation="static")`, transformers' compiled decode) and
  the static backend + repic.vlm.vision (`OURS`: `ours` eager tower and decode step, `ours_c` compiled tower, `ours_cd`
  and compiled decode step, `ours_cdm` and matmul attention, `ours_cdmr` and a padded batch prefilled one prompt
  at a time; `ours_cdmrv` and the batch's images encoded in one tower call first; `ours_cdmrp` and prompts that
  begin alike prefilled from each other's cache). Captions/s,
  prefill / decode split, vision and LM prefill TFLOP/s.
- `grpo`: one TRL GRPOTrainer step at RePIC's training-sample shape: the four task types in turn (OCT yes/no with
  2 images, VLT box with 1 image, ICT caption with 2 images, ICT multi caption with 3 images), images resized as
  repic.train.grpo does (short side 512 multi-image, 1024 single) and processed at Qwen2.5-VL's default max_pixels;
  completions end at EOS at preset lengths (yes/no 2-4, box 16-24, caption 60-150 tokens, per row); G=8, LoRA
  r64/α128 on the language model, β 0.04, gradient checkpointing, bf16. TRL's default path vs ours
  (`rollout_trainer(GRPOTrainer, "static")`, which also installs repic.vlm.vision), `ours_cd` with the compiled decode.

The model is Qwen2.5-VL-7B's shape with random bf16 weights (bench/generation.py's builder).

    python bench/repic_shapes.py --out shapes.json                    # on the GPU (BENCHMARKS.md has the runs)
    python bench/repic_shapes.py --model tiny --image-px 112 --batches 1 2 --ks 1 2 --grpo-steps 2 \\
        --out /tmp/shapes.json                                         # a CPU rehearsal of every path
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import generation as genbench  # noqa: E402  (bench/generation.py: builder, timers, environment)

from repic.vlm import generation as gen  # noqa: E402
from repic.vlm.vision import fast_vision  # noqa: E402

DATASHEET_BF16 = 989e12  # H100/H200 SXM dense bf16, vendor datasheet
CAPTION_PX = 896  # 896² = 1024·28²: RePIC's captioning max_pixels
# image sizes under RePIC's captioning budget, multiples of 28: ~1,000 image tokens each
CAPTION_SIZES = [(1036, 756), (756, 1036), (896, 896), (1176, 672)]
sync, timed = genbench.sync, genbench.timed
_SAVE: Any = lambda: None  # noqa: E731 - main() sets it: writes the results so far


# ---------------------------------------------------------------------------------------------------------------
# forced stop lengths, identical in every path


class Lengths:
    """The preset output length of each row of the next generation call(s), in tokens (EOS included)."""

    current: list[int] = []
    schedule: list[list[int]] = []  # GRPO: one list per rollout call, consumed in order
    eos: int = 0

    @classmethod
    def next(cls) -> list[int]:
        if cls.schedule:
            cls.current = cls.schedule.pop(0)
        return cls.current


def forced(scores: torch.Tensor, step: torch.Tensor, stop: torch.Tensor, eos_mask: torch.Tensor) -> torch.Tensor:
    """Row r: EOS banned before token stop[r], only EOS at token stop[r] (0-based step == stop[r] - 1)."""
    step = step.reshape(-1, 1)
    stop = stop.reshape(-1, 1)
    scores = scores.masked_fill((step < stop - 1) & eos_mask, float("-inf"))
    return scores.masked_fill((step == stop - 1) & ~eos_mask, float("-inf"))


class ForcedLengths:
    """`generate`'s logits processor for the preset lengths; the first call also marks the end of prefill."""

    def __init__(self, prompt_len: int, lengths: list[int], repeats: int = 1, mark: dict | None = None) -> None:
        self.prompt_len, self.mark = prompt_len, mark
        self.stop = torch.tensor([n for n in lengths for _ in range(repeats)])
        self.eos_mask = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.eos_mask is None:
            self.eos_mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            self.eos_mask[Lengths.eos] = True
            self.stop = self.stop.to(scores.device)
            if self.mark is not None:
                sync()
                self.mark["prefill_end"] = time.perf_counter()
        step = torch.tensor(input_ids.shape[1] - self.prompt_len, device=scores.device)
        return forced(scores, step, self.stop[: scores.shape[0]], self.eos_mask)


def patch_static_decoder() -> None:
    """The same rule inside the static backend's decode step (a device-side buffer, so it is captured too)."""
    cls = gen._Decoder
    if getattr(cls, "_forced_patch", False):
        return
    init, load, choose = cls.__init__, cls.load, cls.choose

    def __init__(self, core, batch, cache_len, max_new, cfg, eos, device, *options):
        self._stop_at = torch.full((batch,), 10**9, dtype=torch.long, device=device)
        self._eos_mask = torch.zeros(core.lm_head.out_features, dtype=torch.bool, device=device)
        self._eos_mask[Lengths.eos] = True
        init(self, core, batch, cache_len, max_new, cfg, eos, device, *options)

    def load_(self, cache, logits, inputs, positions, rows):
        lengths = Lengths.next()
        per_row = len(rows) // max(len(lengths), 1)
        self._stop_at.copy_(torch.tensor([n for n in lengths for _ in range(per_row)])[: self.batch])
        load(self, cache, logits, inputs, positions, rows)

    def choose_(self, logits):
        return choose(self, forced(logits, self.col, self._stop_at, self._eos_mask))

    cls.__init__, cls.load, cls.choose, cls._forced_patch = __init__, load_, choose_, True


def patch_hf_generate(model_cls: type) -> None:
    """GRPO: TRL's default rollouts call `model.generate`; give them the preset lengths of each call."""
    original = model_cls.generate
    if getattr(original, "_forced_patch", False):
        return

    def generate(self, *args, **kwargs):
        from transformers import LogitsProcessorList

        ids = kwargs.get("input_ids", args[0] if args else None)
        lengths = Lengths.next()
        repeats = max(1, ids.shape[0] // len(lengths))
        procs = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        procs.append(ForcedLengths(ids.shape[1], lengths, repeats))
        return original(self, *args, logits_processor=procs, **kwargs)

    generate._forced_patch = True
    model_cls.generate = generate


# ---------------------------------------------------------------------------------------------------------------
# FLOP counts


def vision_flops(grid: torch.Tensor, cfg: Any) -> float:
    """Matrix FLOPs of one tower forward: patch embedding, per block qkv/proj/MLP and attention (windows of
    window_size/patch_size patches, or the whole image in full-attention blocks), merger."""
    d, inner, depth = cfg.hidden_size, cfg.intermediate_size, cfg.depth
    unit = cfg.spatial_merge_size ** 2
    win = cfg.window_size // cfg.patch_size  # window side in patches
    patch_in = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    total = 0.0
    for t, h, w in grid.tolist():
        n = t * h * w
        dense = 2 * n * (d * 3 * d + d * d + 3 * d * inner)
        # window attention: sum over windows of 4·L²·d (QKᵀ and PV)
        m = cfg.spatial_merge_size
        wh, ww = win // m, win // m  # window side in merge units
        gh, gw = h // m, w // m
        win_attn = 0.0
        for i in range(0, gh, wh):
            for j in range(0, gw, ww):
                L = min(wh, gh - i) * min(ww, gw - j) * unit
                win_attn += 4 * L * L * d
        full_attn = 4 * (h * w) ** 2 * d * t
        n_full = len(cfg.fullatt_block_indexes)
        total += depth * dense + (depth - n_full) * win_attn * t + n_full * full_attn
        total += 2 * n * patch_in * d + 2 * (n / unit) * (unit * d * unit * d + unit * d * cfg.out_hidden_size)
    return total


def lm_prefill_flops(model: Any, mask: torch.Tensor) -> float:
    """Language-model prefill FLOPs: 2·params per token (embedding and lm_head excluded; one logit row per
    prompt) + causal attention 2·L²·hidden per layer per row."""
    lm = model.model.language_model
    params = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    cfg = lm.config
    lengths = mask.sum(1).tolist()
    tokens = sum(lengths)
    return 2 * params * tokens + sum(2 * L * L * cfg.hidden_size * cfg.num_hidden_layers for L in lengths) \
        + 2 * model.lm_head.weight.numel() * len(lengths)


# ---------------------------------------------------------------------------------------------------------------
# inputs


def caption_batch(processor: Any, n: int, k: int, seed: int) -> tuple[list[str], list[list[Image.Image]], list[int]]:
    """n RePIC captioning prompts with k references each (+ the query image), and each row's preset length."""
    from repic.core.prompts import CAPTION_QUESTIONS, caption_messages

    rng = np.random.RandomState(seed)
    texts, images = [], []
    for i in range(n):
        refs = [{"name": f"<c{j}>", "info": "a small red toy with a round face" * (1 + (i + j) % 2)}
                for j in range(k)]
        msgs = caption_messages(refs, CAPTION_QUESTIONS[i % len(CAPTION_QUESTIONS)])
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        row = []
        for j in range(k + 1):
            w, h = CAPTION_SIZES[(i + j) % len(CAPTION_SIZES)]
            row.append(Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)))
        images.append(row)
    lengths = np.random.RandomState(seed + 1).randint(40, 151, n).tolist()
    return texts, images, lengths


def to_device(model: Any, processor: Any, texts: list, images: list) -> Any:
    device = next(model.parameters()).device
    return processor(text=texts, images=images, return_tensors="pt", padding=True,
                     padding_side="left").to(device)


# ---------------------------------------------------------------------------------------------------------------
# sections


def measure_peak() -> dict[str, float]:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return {"bf16_matmul_tflops": 2 * 8192 ** 3 / statistics.median(times) / 1e12,
            "copy_tb_s": genbench.copy_bandwidth() / 1e12}


def bench_vision(model: Any, processor: Any, batch: int, k: int, peak: float, compile_too: bool,
                 deadline: float, only_compiled: bool = False) -> dict[str, Any]:
    texts, images, _ = caption_batch(processor, batch, k, seed=0)
    inputs = to_device(model, processor, texts, images)
    visual = model.model.visual
    pixels = inputs["pixel_values"].type(visual.dtype)
    grid = inputs["image_grid_thw"]
    flops = vision_flops(grid.cpu(), visual.config)
    out: dict[str, Any] = {"batch": batch, "k": k, "images": len(grid), "patches": int(grid.prod(-1).sum()),
                           "tflop": flops / 1e12}

    def run(label: str, repeats: int, fast: bool = False, **fv: Any) -> torch.Tensor:
        times = []
        for _ in range(repeats + 1):
            if fast:
                with fast_vision(model, **fv):
                    res, t = timed(lambda: visual(pixels, grid_thw=grid).pooler_output)
            else:
                res, t = timed(lambda: visual(pixels, grid_thw=grid).pooler_output)
            times.append(t)
        s = statistics.median(times[1:])
        out[label] = {"s": s, "first_s": times[0], "all_s": times[1:], "tflops": flops / s / 1e12,
                      "pct_measured_peak": 100 * flops / s / peak if peak else None,
                      "pct_datasheet_peak": 100 * flops / s / DATASHEET_BF16}
        return res

    with torch.inference_mode():
        ref = run("hf", 1)
        if only_compiled:
            comp = run("ours_compiled", 3, fast=True, compile=True)
            out["ours_compiled"]["rel_diff_vs_hf"] = float((comp.float() - ref.float()).norm() / ref.float().norm())
            return out
        ours = run("ours", 3, fast=True, compile=False)
        out["ours"]["rel_diff_vs_hf"] = float((ours.float() - ref.float()).norm() / ref.float().norm())
        out["ours"]["max_abs_diff_vs_hf"] = float((ours.float() - ref.float()).abs().max())
        out["ours"]["bitwise_equal_hf"] = bool(torch.equal(ours, ref))
        if compile_too and time.perf_counter() < deadline:
            try:
                comp = run("ours_compiled", 3, fast=True, compile=True)
                out["ours_compiled"]["rel_diff_vs_hf"] = float((comp.float() - ref.float()).norm()
                                                               / ref.float().norm())
            except Exception as exc:  # noqa: BLE001 - reported
                out["ours_compiled"] = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-1500:]}
        if torch.cuda.is_available() and time.perf_counter() < deadline:
            out["profile_ours"] = profile_vision(model, visual, pixels, grid)
    return out


def vision_noise_floor(model: Any, processor: Any, batch: int, k: int) -> dict[str, Any]:
    """bf16 tolerance, measured: each bf16 tower's relative difference to an fp32 copy of the same weights."""
    import copy

    texts, images, _ = caption_batch(processor, batch, k, seed=0)
    inputs = to_device(model, processor, texts, images)
    visual = model.model.visual
    grid = inputs["image_grid_thw"]
    fp32 = copy.deepcopy(visual).float()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict[str, Any] = {"batch": batch, "k": k, "images": len(grid)}
    with torch.inference_mode():
        ref = fp32(inputs["pixel_values"].float(), grid_thw=grid).pooler_output
        torch.backends.cuda.matmul.allow_tf32 = prev
        del fp32
        pixels = inputs["pixel_values"].type(visual.dtype)

        def rel(x: torch.Tensor) -> float:
            return float((x.float() - ref).norm() / ref.norm())

        out["hf_bf16_vs_fp32"] = rel(visual(pixels, grid_thw=grid).pooler_output)
        with fast_vision(model, compile=False):
            out["ours_bf16_vs_fp32"] = rel(visual(pixels, grid_thw=grid).pooler_output)
        with fast_vision(model, compile=True):
            out["ours_compiled_bf16_vs_fp32"] = rel(visual(pixels, grid_thw=grid).pooler_output)
    return out


def profile_vision(model: Any, visual: Any, pixels: torch.Tensor, grid: torch.Tensor) -> list[dict[str, Any]]:
    """Where the bucketed tower's GPU time goes: the top CUDA kernels of one forward (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with fast_vision(model), profile(activities=[ProfilerActivity.CUDA]) as prof:
        visual(pixels, grid_thw=grid)
        sync()
    rows = []
    for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:25]:
        rows.append({"name": ev.key[:120], "calls": ev.count, "cuda_ms": ev.device_time_total / 1e3})
    return rows


# our paths: (vision blocks compiled, decode step compiled, decode attention, padded batch prefilled by rows,
# those rows' images encoded in one tower call for the batch)
# path -> (compiled tower, compiled decode step, decode attention, prefill by rows, rows' images in one tower call,
#          rows' shared prefixes prefilled once)
_F = False
OURS = {"ours": (_F, _F, "sdpa", _F, _F, _F), "ours_c": (True, _F, "sdpa", _F, _F, _F),
        "ours_cd": (True, True, "sdpa", _F, _F, _F), "ours_cdm": (True, True, "matmul", _F, _F, _F),
        "ours_cdmr": (True, True, "matmul", True, _F, _F), "ours_cdmrv": (True, True, "matmul", True, True, _F),
        "ours_cdmrp": (True, True, "matmul", True, _F, True)}


def caption_path(model: Any, inputs: Any, lengths: list[int], path: str, max_new: int, decoders: dict
                 ) -> tuple[float, dict[str, Any], list[list[int]]]:
    """One timed call of one path; returns seconds, its split, and the token ids."""
    prompt_len = inputs["input_ids"].shape[1]
    Lengths.current = lengths
    split: dict[str, Any] = {}
    if path in OURS:
        vision_c, decode_c, attention, by_rows, vision_once, prefix = OURS[path]
        stats: dict[str, Any] = {}
        with fast_vision(model, compile=vision_c):
            ids, t = timed(lambda: gen.generate_ids(model, inputs, backend="static", max_new_tokens=max_new,
                                                    do_sample=False, stats=stats, _decoders=decoders,
                                                    decode_compile=decode_c, decode_attention=attention,
                                                    prefill_rows=by_rows, prefill_vision_once=vision_once,
                                                    prefill_prefix=prefix))
        split = {"prefill_s": stats["prefill_s"], "decode_s": stats["decode_s"], "capture_s": stats["capture_s"],
                 "decode_steps": stats["decode_steps"], "graph": stats["graph"], "compiled": stats["compiled"],
                 "compile_error": stats["compile_error"]}
        return t, split, ids
    mark: dict[str, float] = {}
    kw = {"cache_implementation": "static"} if path == "hf_static" else {}
    sync()
    t0 = time.perf_counter()
    ids = gen.generate_ids(model, inputs, backend="hf", max_new_tokens=max_new, do_sample=False,
                           logits_processor=[ForcedLengths(prompt_len, lengths, mark=mark)], **kw)
    sync()
    t = time.perf_counter() - t0
    if "prefill_end" in mark:
        split = {"prefill_s": mark["prefill_end"] - t0, "decode_s": t0 + t - mark["prefill_end"]}
    return t, split, ids


# ---------------------------------------------------------------------------------------------------------------
# decode step (issue 12 item 4) and the language model's prefill: timings, roofline, kernel profiles


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(t in n for t in ("fmha", "flash", "attention", "attn", "sdpa")):
        return "attention"
    if any(t in n for t in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "sm90_", "splitk", "cublas")):
        return "matmul"
    if n.startswith("triton"):
        return "inductor (fused elementwise)"
    if any(t in n for t in ("copy", "memcpy", "memset", "index", "cat", "fill")):
        return "copies/index"
    return "elementwise/other (eager)"


def profile_kernels(fn: Any, per: int = 1, top: int = 30) -> dict[str, Any]:
    """GPU kernel time of `fn()` by kernel and by class (torch.profiler; CUDA graph replays included where the
    profiler sees their kernels), divided by `per` (steps)."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    classes: dict[str, float] = {}
    for e in events:
        classes[kernel_class(e.key)] = classes.get(kernel_class(e.key), 0.0) + e.device_time_total / 1e3 / per
    return {"kernel_ms": sum(classes.values()), "kernels": sum(e.count for e in events) / per,
            "by_class_ms": dict(sorted(classes.items(), key=lambda kv: -kv[1])),
            "top": [{"name": e.key[:110], "calls": e.count / per, "ms": e.device_time_total / 1e3 / per}
                    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]]}


def attention_micro(dec: Any, bw: float, reps: int = 20) -> dict[str, Any]:
    """One layer's attention over the decoder's real cache (state right after `load`), each way of computing it;
    GB/s counts the keys and values read once."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, kvh, s_len, hd = dec.keys[0].shape
    q = torch.randn(b, kvh, dec.n_rep, hd, device="cuda", dtype=dec.keys[0].dtype)
    keys, values = dec.keys[0], dec.values[0]
    mask = (dec.prompt_mask | (dec.is_new & (dec.arange <= dec.slot)))[:, None, None, :]
    scale = hd ** -0.5
    nbytes = 2 * keys.numel() * keys.element_size()
    compiled = torch.compile(gen._attend_matmul, fullgraph=True)
    ways = {
        "sdpa (as the step calls it)": lambda: gen._attend_sdpa(q, keys, values, mask, scale),
        "sdpa, mem-efficient kernel": lambda: _with(sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION),
                                                    lambda: gen._attend_sdpa(q, keys, values, mask, scale)),
        "sdpa, cuDNN kernel": lambda: _with(sdpa_kernel(SDPBackend.CUDNN_ATTENTION),
                                           lambda: gen._attend_sdpa(q, keys, values, mask, scale)),
        "matmul, eager": lambda: gen._attend_matmul(q, keys, values, mask, scale),
        "matmul, compiled": lambda: compiled(q, keys, values, mask, scale),
        "flash, NO mask (not our semantics: a bound)": lambda: _with(
            sdpa_kernel(SDPBackend.FLASH_ATTENTION),
            lambda: torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=scale)),
    }
    out: dict[str, Any] = {"shape_q": list(q.shape), "shape_kv": list(keys.shape), "bytes_per_layer": nbytes,
                           "roofline_ms_per_layer": nbytes / bw * 1e3}
    ref = ways["sdpa (as the step calls it)"]()
    for name, fn in ways.items():
        try:
            for _ in range(3):
                res = fn()
            times = []
            for _ in range(reps):
                s_, e_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s_.record()
                fn()
                e_.record()
                e_.synchronize()
                times.append(s_.elapsed_time(e_))
            ms = statistics.median(times)
            out[name] = {"ms": ms, "gb_s": nbytes / ms / 1e6, "pct_bw": 100 * nbytes / bw / (ms / 1e3),
                         "max_abs_diff_vs_sdpa": float((res.float() - ref.float()).abs().max())}
        except Exception as exc:  # noqa: BLE001 - a backend that refuses this shape: reported
            out[name] = {"error": repr(exc)[:300]}
    return out


def _with(ctx: Any, fn: Any) -> Any:
    with ctx:
        return fn()


def decode_inputs(model: Any, processor: Any, shape: str) -> tuple[Any, list[int], int]:
    """`gen:B`: bench/generation.py's workload (one 448-px image, 128 new tokens); `capK:B`: RePIC captioning
    with k references (preset lengths 40-150)."""
    kind, batch = shape.split(":")
    batch = int(batch)
    if kind == "gen":
        texts, images = genbench.prompts(processor, batch, 448)
        return to_device(model, processor, texts, images), [128] * batch, 128
    texts, images, lengths = caption_batch(processor, batch, int(kind[3:]), seed=100 + int(kind[3:]))
    return to_device(model, processor, texts, images), lengths, 160


def bench_decode(model: Any, processor: Any, shapes: list[str], variants: list[str], bw: float, deadline: float,
                 micro: bool) -> list[dict[str, Any]]:
    """The static decode step, eager vs compiled (and attention variants), on one prefill per shape: ms per step
    (median of 3 decodes after the one that compiles and captures), % of the bandwidth roofline, kernel profiles
    of 4 replayed steps and of 4 steps run without the graph, tokens vs the first variant."""
    results = []
    for shape in shapes:
        if time.perf_counter() > deadline:
            results.append({"shape": shape, "skipped": "deadline"})
            continue
        results.append({"shape": shape})
        decode_shape(model, processor, shape, variants, bw, deadline, micro, results[-1])
        torch.cuda.empty_cache()
        _SAVE()
    return results


VARIANTS = {"eager": (False, "sdpa"), "compiled": (True, "sdpa"), "compiled_matmul": (True, "matmul"),
            "eager_matmul": (False, "matmul")}


def decode_noise(model: Any, processor: Any, shape: str, variants: list[str]) -> dict[str, Any]:
    """bf16 tolerance of the decode step, measured: one step's logits from each variant and from an fp32 copy of
    the model (TF32 off), on the same prompts and the same first token (the fp32 model's); relative L2 difference
    to the fp32 logits and the rows whose greedy choice equals fp32's."""
    import copy

    inputs, lengths, max_new = decode_inputs(model, processor, shape)
    batch = len(lengths)
    cfg = gen._generation_config(model, max_new, {"do_sample": False})
    eos = gen._eos_ids(cfg)
    device = inputs["input_ids"].device
    fp32 = copy.deepcopy(model).float()
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    logits: dict[str, torch.Tensor] = {}
    first = None
    rows = torch.arange(batch, device=device)
    try:
        with torch.inference_mode():
            for name, m in [("fp32", fp32), ("bf16", model)]:
                positions = gen._prompt_positions(m, inputs)
                prefilled = m(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
                prompt_len = inputs["input_ids"].shape[1]
                cache_len = -(-(prompt_len + max_new) // gen.CACHE_ALIGN) * gen.CACHE_ALIGN
                for variant in (["eager"] if name == "fp32" else variants):
                    dec = gen._Decoder(m, batch, cache_len, max_new, cfg, eos, device, *VARIANTS[variant])
                    Lengths.current = lengths
                    dec.load(prefilled.cache, prefilled.logits[:, -1].float(), inputs, positions, rows)
                    if first is None:
                        first = dec.tokens[:, 0].clone()
                    dec.tokens[:, 0] = first
                    choose = dec.choose

                    def stash(lg: torch.Tensor, key: str = f"{name}_{variant}", choose: Any = choose) -> Any:
                        logits[key] = lg.float().clone()
                        return choose(lg)

                    dec.choose = stash
                    dec._step(dec.parts)
                    dec = None
                del prefilled
                if name == "fp32":
                    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
                    fp32 = None
                    torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    ref = logits.pop("fp32_eager")
    return {"shape": shape, "batch": batch, **{
        key: {"rel_l2_vs_fp32": float((lg - ref).norm() / ref.norm()),
              "argmax_equal_fp32": float((lg.argmax(-1) == ref.argmax(-1)).float().mean())}
        for key, lg in logits.items()}}


def decode_shape(model: Any, processor: Any, shape: str, variants: list[str], bw: float, deadline: float,
                 micro: bool, row: dict[str, Any]) -> None:
    lm = model.model.language_model
    weights = genbench.weight_bytes(model)
    inputs, lengths, max_new = decode_inputs(model, processor, shape)
    batch = len(lengths)
    cfg = gen._generation_config(model, max_new, {"do_sample": False})
    eos = gen._eos_ids(cfg)
    with torch.inference_mode():
        positions = gen._prompt_positions(model, inputs)
        with fast_vision(model, compile=torch.cuda.is_available()):
            prefilled = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    prompt_len = inputs["input_ids"].shape[1]
    cache_len = -(-(prompt_len + max_new) // gen.CACHE_ALIGN) * gen.CACHE_ALIGN
    kv_bytes = 2 * lm.config.num_hidden_layers * batch * lm.config.num_key_value_heads * cache_len \
        * (lm.config.hidden_size // lm.config.num_attention_heads) * 2
    step_bytes = weights["read_per_step"] + kv_bytes
    row.update({"batch": batch, "prompt_len": prompt_len, "cache_len": cache_len, "lengths": lengths,
                "weights_read_gb": weights["read_per_step"] / 1e9, "kv_cache_gb": kv_bytes / 1e9,
                "copy_tb_s": bw / 1e12, "roofline_ms_per_step": step_bytes / bw * 1e3,
                "roofline_weights_only_ms": weights["lm_all"] / bw * 1e3})
    rows = torch.arange(batch, device=inputs["input_ids"].device)
    logits = prefilled.logits[:, -1].float()

    def load(dec: Any) -> None:
        Lengths.current = lengths
        dec.load(prefilled.cache, logits, inputs, positions, rows)

    tokens_ref = None
    for variant in variants:
        if time.perf_counter() > deadline:
            row[variant] = {"skipped": "deadline"}
            continue
        compile_, attention = VARIANTS[variant]
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                dec = gen._Decoder(model, batch, cache_len, max_new, cfg, eos, inputs["input_ids"].device, compile_,
                                   attention)
                res = {"build_and_capture_s": time.perf_counter() - t0}
                row[variant] = res
                res.update(decode_variant(dec, load, row, lengths))
                if tokens_ref is None:
                    tokens_ref = res.pop("tokens")
                else:
                    res["tokens_equal_first_variant"] = float((res.pop("tokens") == tokens_ref).float().mean())
                if micro and variant == variants[0]:
                    load(dec)
                    row["attention_one_layer"] = attention_micro(dec, bw)
        except Exception as exc:  # noqa: BLE001 - reported, the other variants still run
            row[variant] = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-2000:]}
        dec = None
        torch.cuda.empty_cache()
        _SAVE()


def decode_variant(dec: Any, load: Any, row: dict[str, Any], lengths: list[int]) -> dict[str, Any]:
    batch = len(lengths)
    times, steps = [], 0
    for _ in range(3):
        load(dec)
        sync()
        t0 = time.perf_counter()
        steps = dec.run()
        sync()
        times.append(time.perf_counter() - t0)
    tokens = dec.tokens[:, :steps + 1].cpu()
    ms = statistics.median(times) / steps * 1e3
    got = [r.index(Lengths.eos) + 1 if Lengths.eos in r else -1 for r in tokens.tolist()]
    res: dict[str, Any] = {
        "graph": dec.graph is not None, "compiled": dec.parts is not None, "compile_error": dec.compile_error,
        "capture_error": dec.capture_error, "steps": steps, "decode_s": times, "ms_per_step": ms,
        "tokens_s": batch * steps / statistics.median(times), "pct_roofline": 100 * row["roofline_ms_per_step"] / ms,
        "pct_roofline_weights_only": 100 * row["roofline_weights_only_ms"] / ms, "lengths_ok": got == lengths,
        "tokens": tokens}
    if not torch.cuda.is_available():
        return res
    if dec.graph is not None:
        load(dec)
        res["profile_graph_4_steps"] = profile_kernels(lambda: [dec.graph.replay() for _ in range(4)], per=4)
    load(dec)
    res["profile_no_graph_4_steps"] = profile_kernels(lambda: [dec.step() for _ in range(4)], per=4)
    return res


def lm_prefill_profile(model: Any, processor: Any, k: int, batch: int) -> dict[str, Any]:
    """Where the prefill's GPU time goes at the captioning shape: kernel profiles of the whole prefill (compiled
    vision tower) and of the tower alone; the language model's share is their difference, by kernel class."""
    texts, images, _ = caption_batch(processor, batch, k, seed=100 + k)
    inputs = to_device(model, processor, texts, images)
    visual = model.model.visual
    pixels, grid = inputs["pixel_values"].type(visual.dtype), inputs["image_grid_thw"]
    out: dict[str, Any] = {"k": k, "batch": batch, "prompt_len": int(inputs["input_ids"].shape[1]),
                           "lm_prefill_tflop": lm_prefill_flops(model, inputs["attention_mask"]) / 1e12,
                           "padding_tokens": int((inputs["attention_mask"] == 0).sum())}
    cuda = torch.cuda.is_available()
    with torch.inference_mode(), fast_vision(model, compile=cuda):
        positions = gen._prompt_positions(model, inputs)

        def prefill() -> Any:
            return model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)

        prefill()  # compiles the tower for these sizes
        _, out["prefill_s"] = timed(prefill)
        _, out["vision_s"] = timed(lambda: visual(pixels, grid_thw=grid))
        out["lm_prefill_s"] = out["prefill_s"] - out["vision_s"]
        out["lm_prefill_tflops"] = out["lm_prefill_tflop"] / out["lm_prefill_s"]
        if not cuda:
            return out
        out["profile_prefill"] = profile_kernels(prefill, top=25)
        out["profile_vision"] = profile_kernels(lambda: visual(pixels, grid_thw=grid), top=10)
    whole, vis = out["profile_prefill"]["by_class_ms"], out["profile_vision"]["by_class_ms"]
    out["lm_by_class_ms"] = {c: whole.get(c, 0.0) - vis.get(c, 0.0) for c in whole}
    return out



def split_prefill(model: Any, inputs: Any, row: dict[str, Any], res: dict[str, Any], fast: bool,
                  compile: bool = False) -> dict[str, Any]:
    """The vision tower's share of a path's prefill (timed alone on the same images) and the rest's rate."""
    visual = model.model.visual
    pixels, grid = inputs["pixel_values"].type(visual.dtype), inputs["image_grid_thw"]
    with torch.inference_mode(), (fast_vision(model, compile=compile) if fast else contextlib.nullcontext()):
        _, vision_s = timed(lambda: visual(pixels, grid_thw=grid))
    lm_s = res["prefill_s"] - vision_s
    return {"vision_s": vision_s, "vision_tflops": row["vision_tflop"] / vision_s,
            "lm_prefill_s": lm_s, "lm_prefill_tflops": row["lm_prefill_tflop"] / lm_s if lm_s > 0 else None}


def bench_caption(model: Any, processor: Any, k: int, batch: int, paths: list[str], b1_n: int, max_new: int,
                  deadline: float, decoders: dict, partial: list) -> dict[str, Any]:
    texts, images, lengths = caption_batch(processor, batch, k, seed=100 + k)
    inputs = to_device(model, processor, texts, images)
    row: dict[str, Any] = {"k": k, "batch": batch, "prompt_len": int(inputs["input_ids"].shape[1]),
                           "image_tokens_per_row": int((inputs["input_ids"] == model.config.image_token_id
                                                        ).sum(1).float().mean()),
                           "lengths": lengths, "tokens": sum(lengths),
                           "prompt_tokens": inputs["attention_mask"].sum(1).tolist(),
                           "lm_prefill_tflop": lm_prefill_flops(model, inputs["attention_mask"]) / 1e12,
                           "vision_tflop": vision_flops(inputs["image_grid_thw"].cpu(),
                                                        model.model.visual.config) / 1e12}
    ids_by_path = {}
    partial.append(row)  # saved after every path, so a call cut short keeps what it measured
    for path in paths:
        if time.perf_counter() > deadline:
            row[path] = {"skipped": "deadline"}
            continue
        try:
            if path == "hf_b1":
                n = min(b1_n, batch)
                total, prefill = 0.0, 0.0
                ids = []
                for i in range(n):
                    one = to_device(model, processor, texts[i:i + 1], images[i:i + 1])
                    t, split, got = caption_path(model, one, lengths[i:i + 1], "hf", max_new, decoders)
                    total += t
                    prefill += split.get("prefill_s", 0.0)
                    ids += got
                row[path] = {"captions": n, "s": total, "captions_s": n / total, "prefill_s": prefill,
                             "decode_s": total - prefill}
                ids_by_path[path] = ids
                continue
            runs = []
            repeats = 2 if path in OURS or path == "hf_static" else 1  # first call: graph capture / compilation
            for _ in range(repeats):
                runs.append(caption_path(model, inputs, lengths, path, max_new, decoders))
            t, split, ids = runs[-1]
            row[path] = {"s": t, "captions_s": batch / t, "tokens_s": sum(lengths) / t, **split,
                         "first_call_s": runs[0][0] if repeats > 1 else None}
            if "prefill_s" in split:
                row[path]["lm_prefill_tflops_incl_vision"] = row["lm_prefill_tflop"] / split["prefill_s"]
            ids_by_path[path] = ids
            if path in OURS or (path == "hf" and batch <= 8):
                row[path].update(split_prefill(model, inputs, row, row[path], fast=path != "hf",
                                               compile=OURS.get(path, (False,))[0]))
        except Exception as exc:  # noqa: BLE001 - reported, the other paths still run
            row[path] = {"error": repr(exc)[:400], "trace": traceback.format_exc()[-1500:]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        partial[-1] = row
        _SAVE()
    # every path must have produced the preset lengths (EOS at the preset step)
    row["lengths_ok"] = {p: [len(r) for r in ids] == lengths[:len(ids)] for p, ids in ids_by_path.items()}
    return row


def grpo_samples(work: Path, n_rounds: int) -> list[dict[str, Any]]:
    """RePIC training samples of the four task types in turn, with images written to `work`."""
    rng = np.random.RandomState(7)
    (work / "img").mkdir(parents=True, exist_ok=True)
    originals = [(1333, 1000), (1000, 1333), (1200, 1200), (1600, 900)]
    counter = [0]

    def image() -> str:
        w, h = originals[counter[0] % len(originals)]
        counter[0] += 1
        name = f"img/{counter[0]}.png"
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(work / name)
        return "./" + name

    samples = []
    for i in range(n_rounds):
        samples += [
            {"image": [image(), image()], "accu_reward_method": "yes_no", "solution": "yes",
             "problem": f"The first image shows <z{i}>. Is <z{i}> in the second image?"},
            {"image": image(), "accu_reward_method": "iou", "solution": [100, 120, 400, 500],
             "problem": f"Where is <z{i}> in this image? Give its bounding box."},
            {"image": [image(), image()], "accu_reward_method": "yes_no_name", "solution": f"<z{i}>",
             "problem": f"The first image shows <z{i}>. Describe the second image, naming <z{i}>."},
            {"image": [image(), image(), image()], "accu_reward_method": "yes_no_name_multi",
             "solution": json.dumps([f"<z{i}>", f"<y{i}>"]),
             "problem": f"The images show <z{i}> and <y{i}>. Describe the last image, naming both."},
        ]
    return samples


GRPO_LENGTHS = {"yes_no": (2, 5), "iou": (16, 25), "yes_no_name": (60, 151), "yes_no_name_multi": (60, 151)}


def bench_grpo(model: Any, processor: Any, steps: int, generations: int, paths: list[str], max_new: int,
               deadline: float) -> dict[str, Any]:
    from datasets import Dataset
    from peft import get_peft_model
    from trl import GRPOTrainer

    from repic.train.grpo import build_examples, grpo_config, lora_config, reward_functions

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp())
    samples = grpo_samples(work, -(-steps // 4))[:steps]
    examples = build_examples(samples, work, seed=0)
    dataset = Dataset.from_list(examples)
    rng = np.random.RandomState(11)
    schedule = [rng.randint(*GRPO_LENGTHS[s["accu_reward_method"]], generations).tolist() for s in samples]
    patch_hf_generate(type(gen._core(model)))
    lora = lora_config({"r": 64, "lora_alpha": 128, "lora_dropout": 0.05})
    out: dict[str, Any] = {"steps": steps, "generations": generations, "tasks": [s["accu_reward_method"]
                                                                                   for s in samples],
                           "lengths": schedule, "processor_size": dict(processor.image_processor.size)}
    for path in paths:
        if time.perf_counter() > deadline:
            out[path] = {"skipped": "deadline"}
            continue
        timer = genbench.StepTimer()
        grpo = dict(num_generations=generations, per_device_train_batch_size=generations,
                    gradient_accumulation_steps=1, max_completion_length=max_new, temperature=1.0, beta=0.04,
                    loss_type="grpo", scale_rewards="group", learning_rate=1e-5, bf16=cuda,
                    gradient_checkpointing=cuda, max_steps=steps, logging_steps=1, seed=0, shuffle_dataset=False)
        args = grpo_config(grpo, tempfile.mkdtemp(), use_cpu=not cuda)
        Lengths.schedule = [list(x) for x in schedule]
        torch.manual_seed(0)
        peft_model = get_peft_model(model.train(), lora)
        trainer_cls = gen.rollout_trainer(GRPOTrainer, "static") if path in ("ours", "ours_cd") else GRPOTrainer
        if path == "ours_cd":  # the compiled decode step (sdpa attention, as in the eager step) in the rollouts
            trainer_cls = type("CompiledDecode" + trainer_cls.__name__, (trainer_cls,), {"decode_compile": True})
        genbench.peak_reset()
        try:
            trainer = trainer_cls(model=peft_model, reward_funcs=reward_functions(
                ["object_consistency", "visual_localization", "identity_consistency"], "repic"), args=args,
                train_dataset=dataset, processing_class=processor, callbacks=[timer.callback])
            trainer.train()
            logs = [r for r in trainer.state.log_history if "completions/mean_length" in r]
            out[path] = {"step_s": timer.times, "mean_completion_len": [r["completions/mean_length"] for r in logs],
                         "total_s": sum(timer.times), "peak_gib": genbench.peak_gib()}
            feature_cache = getattr(trainer, "image_feature_cache", None)
            if feature_cache is not None:
                out[path]["images_requested_vs_encoded"] = [feature_cache.requested_images,
                                                            feature_cache.tower_images]
        except Exception as exc:  # noqa: BLE001 - reported, the other path still runs
            out[path] = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-2500:]}
        trainer = None
        from repic.vlm.vision import disable_fast_vision, disable_image_feature_cache

        disable_fast_vision(peft_model)
        disable_image_feature_cache(peft_model)
        model = peft_model.unload()
        if cuda:
            torch.cuda.empty_cache()
    ok = [p for p in paths if "step_s" in out.get(p, {})]
    if len(ok) == 2:
        out["speedup_total"] = out[ok[0]]["total_s"] / out[ok[1]]["total_s"]
        # step 1 includes one-time setup (graph capture, cuBLAS); the rest compare like with like
        rest = [sum(out[p]["step_s"][1:]) for p in ok]
        out["speedup_steps_2_on"] = rest[0] / rest[1] if rest[1] else None
    return out


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(genbench.SHAPES), default="7b")
    ap.add_argument("--image-px", type=int, default=CAPTION_PX, help="captioning max_pixels = this²")
    ap.add_argument("--sections", nargs="+", default=["peak", "decode", "prefill_profile", "caption", "vision",
                                                      "vision_compiled", "noise", "grpo"],
                    help="run in this order: peak decode decode_noise prefill_profile caption vision vision_compiled "
                    "noise grpo")
    ap.add_argument("--decode-shapes", nargs="+", default=["gen:32", "cap4:32"],
                    help="decode section: gen:B (bench/generation.py's 448-px prompt, 128 tokens) or capK:B")
    ap.add_argument("--decode-variants", nargs="+", default=["eager", "compiled", "compiled_matmul"],
                    choices=["eager", "compiled", "compiled_matmul", "eager_matmul"])
    ap.add_argument("--prefill-profile", default="4:8", help="k:batch of the prefill profile")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 2, 1])
    ap.add_argument("--plan", nargs="*", default=[],
                    help="captioning runs as k:batch:path,path,... (replaces --ks x --batches x --paths)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 1])
    ap.add_argument("--paths", nargs="+", default=["ours", "hf", "hf_b1", "hf_static"])
    ap.add_argument("--hf-static-batches", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--b1-captions", type=int, default=3, help="captions timed in the batch-1 loop")
    ap.add_argument("--vision-batch", type=int, default=8)
    ap.add_argument("--compiled-batches", type=int, nargs="*", default=[32],
                    help="batch sizes of the ours_c path (static backend + compiled vision blocks)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--grpo-steps", type=int, default=4)
    ap.add_argument("--grpo-paths", nargs="+", default=["hf", "ours"])
    ap.add_argument("--grpo-max-new", type=int, default=256)
    ap.add_argument("--deadline-s", type=float, default=1e9)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    deadline = t0 + args.deadline_s
    cuda = torch.cuda.is_available()
    res: dict[str, Any] = {"date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
                           "env": genbench.environment(), "datasheet_bf16_tflops": DATASHEET_BF16 / 1e12}
    out = Path(args.out)

    def save() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        tmp.replace(out)

    global _SAVE
    _SAVE = save

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    if "peak" in args.sections and cuda:
        res["peak"] = measure_peak()
        log(f"peak {res['peak']}")
    save()
    model, processor = genbench.build(args.model, "cuda" if cuda else "cpu",
                                      torch.bfloat16 if cuda else torch.float32, args.image_px)
    Lengths.eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = Lengths.eos
    patch_static_decoder()
    res["build_s"] = time.perf_counter() - t0
    log("built")
    peak = res.get("peak", {}).get("bf16_matmul_tflops", 0) * 1e12
    # warm-up: cuBLAS / attention initialisation out of every timed call
    with torch.inference_mode():
        texts, images, lengths = caption_batch(processor, 1, 1, seed=0)
        warm = to_device(model, processor, texts, images)
        Lengths.current = [3]
        gen.generate_ids(model, warm, backend="hf", max_new_tokens=4, do_sample=False,
                         logits_processor=[ForcedLengths(warm["input_ids"].shape[1], [3])])
    def section_vision() -> None:
        try:
            res["vision"] = bench_vision(model, processor, args.vision_batch, max(args.ks), peak, False, deadline)
        except Exception as exc:  # noqa: BLE001
            res["vision"] = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-2000:]}
        save()
        log(f"vision {json.dumps({k: v for k, v in res['vision'].items() if k != 'profile_ours'}, default=str)}")

    def section_caption() -> None:
        res.setdefault("caption", [])
        decoders: dict = {}
        plan = [(int(k), int(b), ps.split(",")) for k, b, ps in (e.split(":") for e in args.plan)] if args.plan \
            else [(k, b, args.paths) for k in args.ks for b in args.batches]
        for k, batch, plan_paths in plan:
            if time.perf_counter() > deadline:
                res["caption"].append({"k": k, "batch": batch, "skipped": "deadline"})
                continue
            paths = plan_paths if args.plan else [p for p in plan_paths if not (p == "hf_b1" and batch != 1)
                and not (p == "hf" and batch == 1 and "hf_b1" in args.paths)
                and not (p == "hf_static" and batch not in args.hf_static_batches)
                and not (p == "ours_c" and batch not in args.compiled_batches)]
            try:
                row = bench_caption(model, processor, k, batch, paths, args.b1_captions, args.max_new_tokens,
                                    deadline, decoders, res["caption"])
            except Exception as exc:  # noqa: BLE001
                row = {"k": k, "batch": batch, "error": repr(exc)[:400], "trace": traceback.format_exc()[-1500:]}
                res["caption"].append(row)
            decoders.clear()
            save()
            log("caption " + json.dumps({p: row.get(p, {}).get("captions_s") if isinstance(row.get(p), dict)
                                         else None for p in plan_paths} | {"k": k, "batch": batch}))

    def section_vision_compiled() -> None:
        try:
            res["vision_compiled"] = bench_vision(model, processor, args.vision_batch, max(args.ks), peak,
                                                  True, deadline + 1e9, only_compiled=True)
        except Exception as exc:  # noqa: BLE001
            res["vision_compiled"] = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-2000:]}
        save()
        log(f"vision compiled {json.dumps(res['vision_compiled'], default=str)[:1500]}")

    def section_noise() -> None:
        try:
            res["vision_noise_floor"] = vision_noise_floor(model, processor, 2, max(args.ks))
        except Exception as exc:  # noqa: BLE001
            res["vision_noise_floor"] = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-2000:]}
        save()
        log(f"noise floor {json.dumps(res['vision_noise_floor'], default=str)[:800]}")

    def section_grpo() -> None:
        # RePIC's trainer: the processor at Qwen2.5-VL's default pixel budget (images pre-resized)
        budget = dict(processor.image_processor.size)
        processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 12845056}
        restore = type(model).generate
        try:
            res["grpo"] = bench_grpo(model, processor, args.grpo_steps, 8 if cuda else 2, args.grpo_paths,
                                     args.grpo_max_new, deadline)
        except Exception as exc:  # noqa: BLE001
            res["grpo"] = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-2500:]}
        finally:
            processor.image_processor.size = budget
            type(model).generate = restore
            model.eval()
        save()
        log("grpo " + json.dumps({k: v for k, v in res["grpo"].items() if k not in ("lengths",)}, default=str))

    def section_decode() -> None:
        bw = res.get("peak", {}).get("copy_tb_s", 0.1) * 1e12
        res["decode"] = []
        try:
            res["decode"] = bench_decode(model, processor, args.decode_shapes, args.decode_variants, bw, deadline,
                                         micro=cuda)
        except Exception as exc:  # noqa: BLE001
            res["decode"].append({"error": repr(exc)[:500], "trace": traceback.format_exc()[-2000:]})
        save()
        for row in res["decode"]:
            log("decode " + json.dumps({"shape": row.get("shape"), "roofline_ms": row.get("roofline_ms_per_step")}
                                       | {v: {k: row[v].get(k) for k in ("ms_per_step", "pct_roofline", "compiled",
                                                                        "tokens_equal_first_variant", "error")}
                                          for v in args.decode_variants if isinstance(row.get(v), dict)}))

    def section_decode_noise() -> None:
        try:
            res["decode_noise"] = decode_noise(model, processor, args.decode_shapes[0], args.decode_variants)
        except Exception as exc:  # noqa: BLE001
            res["decode_noise"] = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-2000:]}
        save()
        log("decode noise " + json.dumps(res["decode_noise"], default=str)[:1500])

    def section_prefill_profile() -> None:
        k, batch = (int(x) for x in args.prefill_profile.split(":"))
        try:
            res["prefill_profile"] = lm_prefill_profile(model, processor, k, batch)
        except Exception as exc:  # noqa: BLE001
            res["prefill_profile"] = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-2000:]}
        save()
        log("prefill profile " + json.dumps({k: v for k, v in res["prefill_profile"].items()
                                              if not k.startswith("profile")}, default=str)[:1500])

    sections = {"vision": section_vision, "caption": section_caption, "vision_compiled": section_vision_compiled,
                "noise": section_noise, "grpo": section_grpo, "decode": section_decode,
                "prefill_profile": section_prefill_profile, "decode_noise": section_decode_noise}
    for name in args.sections:
        if name == "peak":
            continue
        if time.perf_counter() > deadline:
            res.setdefault("skipped", []).append(name)
            log(f"{name}: skipped (deadline)")
            continue
        sections[name]()
    res["wall_s"] = time.perf_counter() - t0
    save()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
