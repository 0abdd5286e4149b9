"""Issue 28 on one card: GRPO tokens/s per GPU (TRL's default path, ours, ours + each lever) with the step split and
the training phase's TFLOP/s, and captioning at RePIC's 4-concept shape against RePIC's batch-1 loop and the card's
limit. One run, one JSON (saved after every path, so a run cut short keeps what it measured).

Sections, in this order (`--sections`):

- `peak`: the card's bf16 matrix rate (8192³ products) and copy bandwidth (bench/repic_shapes.py's): the ceilings.
- `caption`: bench/repic_shapes.py's captioning cell(s) (`--caption-plan k:B:path,...`), e.g. 4:32 with `ours_cdmr`
  (the default), `ours_cdmrv` (its images encoded in one tower call for the batch) and `hf_b1` (RePIC's loop over
  `--b1-captions` captions); each of our paths with the card's limit: the cell's counted FLOPs (vision tower + LM
  prefill) at the measured bf16 rate, plus its decode steps at the measured copy bandwidth (weights once a step, each
  running row's KV cache), every term in the JSON (`limit`).
- `caption_set`: RePIC's whole 4-concept evaluation (`--caption-set B:path,...`; bench/repic4_workload.json: its 105
  conversations, its images' real sizes, its references recurring across conversations) in `generate`'s order and
  batches through each path (a trailing `f`: the tower's features kept across batches, as `generate` on CUDA),
  against RePIC's loop (`hf_b1`, also at the set's mean caption length) and the card's limit counted two ways
  (every image shown through the tower; each distinct image once).
- `grpo`: TRL 1.16 `GRPOTrainer` steps at RePIC's training-sample shapes (bench/repic_shapes.py's four task types
  in turn: OCT yes/no with 2 images, VLT box with 1, ICT caption with 2, ICT multi caption with 3; images of
  1000-1600 px resized by repic.train.grpo.build_examples, processed at Qwen2.5-VL's default max_pixels; answers end
  at EOS at per-row preset lengths: yes/no 2-4, box 16-24, caption 60-150 tokens), bf16, G =
  `--grpo-generations`. The recipe is `--grpo-recipe`'s `train_grpo_lora` section (default configs/paper.yaml
  merged onto params.yaml, as `make paper` trains): its LoRA built by the training stage's own
  `repic.train.grpo.lora_model` (the paper's `lora_targets: repic`: r64/α128/dropout 0.05 on every non-vision
  nn.Linear, lm_head included), its trainer class from the stage's `recipe_trainer` (rollout dropout;
  log-probabilities through the adapted head where lm_head carries LoRA: TRL 1.16 refuses that adapter, so TRL's
  chunked fused head does not apply), its GRPOConfig fields (top-k 50, temperature 1, β 0.04, loss grpo, group
  scaling, learning rate) and rewards. The batch: `--grpo-per-device` completions a micro-step,
  `--grpo-grad-accum` micro-steps an optimizer step, `--grpo-grouping repic` (each group of G completions from G
  different samples, as RePIC's 8 processes drew them: a sequential sampler without repeats, emulated here) or
  `grpo` (G completions of one prompt, TRL's sampler). Paths (`--grpo-paths`): `hf` = TRL's default (its
  `model.generate` rollouts, gradient checkpointing), `ours` = `rollout_trainer(GRPOTrainer, "static")` as the
  pipeline trains today, and either with `+`-joined levers (repic.train.speed unless said): `nockpt` (no gradient
  checkpointing: GRPOConfig), `vc` (compile_vision), `pp` (preprocess_once: on in the training stage, as are `ac`,
  `ra` and, on CUDA, `vc`, `tp`, `pk`, `cd` and `pkp`, with configs/paper.yaml's 4 DataLoader workers, `nw`:
  `ours+pp+ac+vc+tp+nw+ra+pk+cd+pkp`, STAGE below, is the paper run's path on CUDA), `pr` (rollout
  prefill one prompt at a time, images once: rollout_trainer's prefill_rows / prefill_vision_once), `cd` (compiled
  decode step in the rollouts, LoRA dropout included), `ac` (autocast_lora: LoRA inputs left in bf16 under
  autocast, not cast to the adapters' fp32), `nw` (GRPOConfig's
  `dataloader_num_workers=4`: the DataLoader's worker processes decode the dataset's images (PNG in Arrow) ahead of
  the step, overlapping the GPU; the training stage's rows read their image files there too,
  repic.train.grpo.preloading, with configs/paper.yaml's 4 workers), `tp` (trim_padding: the step's rows split into
  micro-batches by length, not at random, and each log-prob forward's rows cut to their own longest row instead of the
  step's: RePIC's grouping puts a yes/no prompt and a three-image one in one batch), `rx` (the baseline of a default:
  the image features a rollout computes are not kept, so the step's reference forward encodes its images again, as
  before 2026-12-07), `ra` (rollout_trainer's prefill_autocast: the rollout's prefill under bf16 autocast, so LoRA's
  products there are bf16, as the decode step's and RePIC's bf16 model's, not PEFT's fp32), `pk` (packed: the
  log-prob forwards' decoder layers on each row's real positions only, packed into one row, attention per row:
  torch's variable-length flash kernel on CUDA; `pkr`: the same with one causal SDPA product per row), `pkp`
  (rollout_trainer's prefill_packed: the rollout's prefill as one forward of its prompts packed into one row; with
  `pk`'s attention; instead of `pr`'s prefill by rows);
  not a lever, `lm` trains LoRA on the language model's projections only (`lora_targets: language_model`, params.yaml's
  default: no lm_head adapter, TRL's chunked head), to show the recipe's lm_head cost; `~N` trains
  that path with N completions a micro-step (the step's completions unchanged: more or fewer accumulation steps),
  `@S` runs S optimizer steps.
  Per step: wall time (synchronised), its split (rollout, reference forward, policy forward, backward, optimizer
  incl. gradient clipping, rewards, other = the rest: TRL's CPU-side image preprocessing and tokenising, batching,
  logging), tokens (every sequence's prompt, image tokens included, + completion: EasyR1's "tokens per second per
  GPU"), counted FLOPs by phase (below), peak memory. Summary over steps 2..N: tokens/s per GPU, the split, the
  training phase's TFLOP/s (reference + policy forward + backward FLOPs over their time) against the measured peak.
  `--grpo-profile PATH...` adds one profiled step to each (kernel time by class, the same by phase:
  `phase_kernels`, and `HostSampler`: where the host time between phases goes; not in its statistics).

FLOPs counted per forward from the real (unpadded) tokens: 2 × (decoder-layer parameters) per token, causal
attention 2·L²·hidden per layer per sequence, the LM head over completion tokens only (TRL's fused head scores
those), LoRA 2·r·(in + out) per adapted projection per token when the adapter is on (lm_head's: completion
tokens only), and the vision tower where it runs (bench/repic_shapes.py's count). The backward of a policy forward
counts its input gradients through the frozen weights (= the forward's products), twice the attention, and LoRA's
input and weight gradients; with gradient checkpointing the recomputed forward is counted apart (`recompute`:
executed, not useful).

    python bench/perf.py --out perf.json                # the device runs: device_perf.sh, device_recipe.sh
    python bench/perf.py --summarize perf.json          # its compact summary
    python bench/perf.py --model tiny --image-px 112 --caption-plan 2:2:ours_cdmr,ours_cdmrv,hf_b1 \\
        --grpo-paths hf@2 ours ours+pp+nockpt+pr+vc --grpo-steps 2 --grpo-max-new 8 \\
        --grpo-per-device 4 --grpo-generations 4 --out /tmp/perf.json             # a CPU rehearsal
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
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import generation as genbench  # noqa: E402  (bench/generation.py: builder, timers, environment)
import repic_shapes as shapes  # noqa: E402  (bench/repic_shapes.py: captioning cells, forced lengths, FLOPs)

from repic.vlm import generation as gen  # noqa: E402

sync = genbench.sync
# the training stage's path on CUDA (repic.train.grpo.train), the default of --grpo-paths and bench/device_perf.sh
STAGE = "ours+pp+ac+vc+tp+nw+ra+pk+cd+pkp"
LEVERS = ("nockpt", "vc", "pp", "pr", "cd", "ac", "nw", "tp", "rx", "ra", "pk", "pkr", "pkp")
# not a lever: the run's LoRA targets replaced by the language model's projections only (params.yaml's default,
# `lora_targets: language_model`), to show what the recipe's lm_head adapter costs
TARGETS = ("lm",)
# GRPOConfig fields of the recipe this benchmark sets itself (batch, length, steps, precision, checkpointing, G,
# logging, saving); the recipe's others (sampling, beta, loss, advantages, learning rate) are used as they are
BENCH_GRPO_KEYS = ("num_generations", "per_device_train_batch_size", "gradient_accumulation_steps",
                   "max_completion_length", "bf16", "fp16", "gradient_checkpointing", "max_steps",
                   "num_train_epochs", "logging_steps", "seed", "report_to", "save_strategy", "save_steps",
                   "save_total_limit")
ROOT = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "reference_forward", "policy_forward", "backward", "optimizer", "rewards")


# ---------------------------------------------------------------------------------------------------------------
# captioning: the card's limit


def kv_bytes_per_token(model: Any) -> int:
    cfg = model.model.language_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype_bytes = model.model.language_model.embed_tokens.weight.element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype_bytes


def caption_limit(model: Any, row: dict[str, Any], peak: float, bw: float, measured_s: float | None
                  ) -> dict[str, Any]:
    """The cell's time at the card's limit: its counted FLOPs at the measured bf16 rate + its decode steps at the
    measured copy bandwidth (the language model's weights read once a step; each running row's KV cache, prompt +
    tokens so far, read once a step). The first token of each row comes from the prefill."""
    weights = genbench.weight_bytes(model)["read_per_step"]
    kv = kv_bytes_per_token(model)
    lengths, prompts = row["lengths"], row["prompt_tokens"]
    steps = max(lengths) - 1
    kv_read = sum(kv * sum(p + s for s in range(1, n)) for p, n in zip(prompts, lengths))
    flops = (row["vision_tflop"] + row["lm_prefill_tflop"]) * 1e12
    compute_s = flops / peak if peak else None
    decode_s = (weights * steps + kv_read) / bw if bw else None
    limit_s = compute_s + decode_s if compute_s is not None and decode_s is not None else None
    return {"tflop": flops / 1e12, "peak_tflops": peak / 1e12, "compute_s": compute_s, "decode_steps": steps,
            "weight_gb_per_step": weights / 1e9, "kv_bytes_per_token": kv, "kv_gb_read": kv_read / 1e9,
            "copy_tb_s": bw / 1e12, "decode_s": decode_s, "limit_s": limit_s, "measured_s": measured_s,
            "fraction_of_limit": limit_s / measured_s if limit_s and measured_s else None,
            "arithmetic": "limit_s = tflop / peak_tflops + (weight_gb_per_step * decode_steps + kv_gb_read) "
                          "/ (copy_tb_s * 1e3)"}


def section_caption(model: Any, processor: Any, plan: list[str], b1_captions: int, max_new: int, peak: float,
                    bw: float, deadline: float, save: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for entry in plan:
        k, batch, paths = entry.split(":")
        k, batch, paths = int(k), int(batch), paths.split(",")
        if time.perf_counter() > deadline:
            rows.append({"k": k, "batch": batch, "skipped": "deadline"})
            continue
        partial: list = []
        try:
            row = shapes.bench_caption(model, processor, k, batch, paths, b1_captions, max_new, deadline, {},
                                       partial)
        except Exception as exc:  # noqa: BLE001 - reported, the GRPO section still runs
            row = (partial[-1] if partial else {"k": k, "batch": batch}) | {
                "error": repr(exc)[:400], "trace": traceback.format_exc()[-1500:]}
        for path in paths:
            res = row.get(path)
            if isinstance(res, dict) and "s" in res and path in shapes.OURS and "prompt_tokens" in row:
                res["limit"] = caption_limit(model, row, peak, bw, res["s"])
        b1 = row.get("hf_b1", {}).get("captions_s") if isinstance(row.get("hf_b1"), dict) else None
        if b1:
            row["vs_hf_b1"] = {p: row[p]["captions_s"] / b1 for p in paths
                               if p != "hf_b1" and isinstance(row.get(p), dict) and "captions_s" in row[p]}
        rows.append(row)
        save()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# captioning: RePIC's whole 4-concept evaluation (its conversations, its images' sizes, its recurring references)


def repic4_conversations(processor: Any, workload: Path, seed: int = 104
                         ) -> tuple[list[str], list[list[Image.Image]], list[int], list[str]]:
    """RePIC's 105 4-concept conversations (bench/repic4_workload.json: RePIC's query map and database): RePIC's
    captioning conversation (`repic_caption_messages`; display names, filler info of each concept's word count, the
    four questions in turn), one random-pixel PIL image per distinct image at its size after qwen_vl_utils' resize,
    shared by every conversation that shows it (the caption stage's loader gives one object per file), and each
    caption's preset length (40-150 tokens, ending at EOS). Returns texts, images, lengths and each image's id."""
    from repic.core.prompts import CAPTION_QUESTIONS, repic_caption_messages

    doc = json.loads(workload.read_text(encoding="utf-8"))
    rng = np.random.RandomState(seed)
    pixels = {i: Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for i, (w, h) in
              doc["images"].items()}
    texts, images, ids = [], [], []
    for n, prompt in enumerate(doc["prompts"]):
        refs = [{"name": doc["names"][k], "info": " ".join(["word"] * doc["info_words"][k])} for k in prompt[:-1]]
        msgs = repic_caption_messages(refs, CAPTION_QUESTIONS[n % len(CAPTION_QUESTIONS)])
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        images.append([pixels[i] for i in prompt])
        ids.append(prompt)
    lengths = np.random.RandomState(seed + 1).randint(40, 151, len(texts)).tolist()
    return texts, images, lengths, ids


def _set_limit(model: Any, batches: list[dict[str, Any]], vision_tflop: float, peak: float, bw: float,
               measured_s: float | None) -> dict[str, Any]:
    """`caption_limit` over a sequence of batches: counted FLOPs (`vision_tflop` for the tower: every image shown,
    or each distinct image once) at the measured rate + each batch's decode steps at the measured bandwidth."""
    parts = [caption_limit(model, {**b, "vision_tflop": 0.0}, peak, bw, None) for b in batches]
    flops = (vision_tflop + sum(b["lm_prefill_tflop"] for b in batches)) * 1e12
    compute_s = flops / peak if peak else None
    decode_s = sum(p["decode_s"] for p in parts) if bw else None
    limit_s = compute_s + decode_s if compute_s is not None and decode_s is not None else None
    return {"tflop": flops / 1e12, "peak_tflops": peak / 1e12, "compute_s": compute_s,
            "decode_steps": sum(p["decode_steps"] for p in parts), "kv_gb_read": sum(p["kv_gb_read"] for p in parts),
            "weight_gb_per_step": parts[0]["weight_gb_per_step"] if parts else None,
            "copy_tb_s": bw / 1e12, "decode_s": decode_s, "limit_s": limit_s, "measured_s": measured_s,
            "fraction_of_limit": limit_s / measured_s if limit_s and measured_s else None,
            "arithmetic": "limit_s = tflop / peak_tflops + sum over batches of (weight_gb_per_step * "
                          "decode_steps + kv_gb_read) / (copy_tb_s * 1e3)"}


def section_caption_set(model: Any, processor: Any, batch: int, paths: list[str], b1_n: int, max_new: int,
                        peak: float, bw: float, deadline: float, save: Any, workload: Path) -> dict[str, Any]:
    """Every conversation of RePIC's 4-concept evaluation, in `repic.vlm.generation.generate`'s order and batches
    of `batch`, through each of our paths (`ours_cdmr` = the static backend's CUDA defaults; a trailing `f` = the
    same with the tower's features kept across batches, `image_features_once`, as `generate` does on CUDA), each
    path run twice and the second timed (the first compiles and captures); `hf_b1` = RePIC's loop over `b1_n`
    conversations spread over that order. Captions/s of the whole set; the card's limit twice: counting the tower
    over every image shown (what RePIC's loop and the path without `f` compute) and over each distinct image once."""
    from repic.vlm.vision import image_features_once

    texts, images, lengths, ids = repic4_conversations(processor, workload)
    sizes = [sum(img.width * img.height for img in imgs) + len(t) for t, imgs in zip(texts, images)]
    order = sorted(range(len(texts)), key=lambda i: sizes[i])  # generate()'s order
    cfg = model.model.visual.config
    batches = []
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        inputs = shapes.to_device(model, processor, [texts[i] for i in idx], [images[i] for i in idx])
        batches.append({"idx": idx, "inputs": inputs, "lengths": [lengths[i] for i in idx],
                        "prompt_tokens": inputs["attention_mask"].sum(1).tolist(),
                        "lm_prefill_tflop": shapes.lm_prefill_flops(model, inputs["attention_mask"]) / 1e12})
    grids = {}  # image id -> its grid, from the processor's own output
    for b in batches:
        g = b["inputs"]["image_grid_thw"].cpu()
        flat = [i for j in b["idx"] for i in ids[j]]
        grids.update({i: g[n:n + 1] for n, i in enumerate(flat)})
    vision_all = sum(shapes.vision_flops(grids[i], cfg) for j in order for i in ids[j]) / 1e12
    vision_distinct = sum(shapes.vision_flops(g, cfg) for g in grids.values()) / 1e12
    res: dict[str, Any] = {
        "workload": str(workload.name), "conversations": len(texts), "batch": batch,
        "images_shown": sum(map(len, ids)), "images_distinct": len(grids),
        "image_tokens_per_conversation": statistics.mean(
            int((b["inputs"]["input_ids"][r] == model.config.image_token_id).sum()) for b in batches
            for r in range(len(b["idx"]))),
        "prompt_tokens": [t for b in batches for t in b["prompt_tokens"]], "lengths": lengths,
        "tokens": sum(lengths), "vision_tflop_shown": vision_all, "vision_tflop_distinct": vision_distinct,
        "lm_prefill_tflop": sum(b["lm_prefill_tflop"] for b in batches)}
    limit_rows = [{k: b[k] for k in ("lengths", "prompt_tokens", "lm_prefill_tflop")} for b in batches]
    decoders: dict = {}
    got: dict[str, list] = {}
    for path in paths:
        if time.perf_counter() > deadline:
            res[path] = {"skipped": "deadline"}
            continue
        try:
            if path == "hf_b1":
                picks = [order[round(i * (len(order) - 1) / max(1, b1_n - 1))] for i in range(b1_n)]
                total, prefill, out = 0.0, 0.0, []
                for j in picks:
                    one = shapes.to_device(model, processor, texts[j:j + 1], images[j:j + 1])
                    t, split, row_ids = shapes.caption_path(model, one, lengths[j:j + 1], "hf", max_new, decoders)
                    total, prefill, out = total + t, prefill + split.get("prefill_s", 0.0), out + row_ids
                res[path] = {"captions": b1_n, "conversations": picks, "s": total, "captions_s": b1_n / total,
                             "prefill_s": prefill, "decode_s": total - prefill,
                             "mean_length": statistics.mean(lengths[j] for j in picks),
                             "set_mean_length": statistics.mean(lengths)}
                got[path] = [(j, r) for j, r in zip(picks, out)]
                continue
            base, once = (path[:-1], True) if path.endswith("f") and path[:-1] in shapes.OURS else (path, False)
            if base not in shapes.OURS:
                raise ValueError(f"unknown captioning path {path!r}")
            for run in range(2):  # the first compiles the tower and decode step, captures the graphs
                total = prefill = decode = 0.0
                out = []
                with image_features_once(model) if once else contextlib.nullcontext() as cache:
                    for b in batches:
                        t, split, row_ids = shapes.caption_path(model, b["inputs"], b["lengths"], base, max_new,
                                                                decoders)
                        total, prefill, decode = total + t, prefill + split["prefill_s"], decode + split["decode_s"]
                        out += list(zip(b["idx"], row_ids))
                    counts = [cache.requested_images, cache.tower_images] if cache is not None else None
                if run == 0:
                    first = total
            res[path] = {"s": total, "captions_s": len(texts) / total, "tokens_s": sum(lengths) / total,
                         "prefill_s": prefill, "decode_s": decode, "first_call_s": first,
                         "images_requested_vs_encoded": counts,
                         "limit_every_image": _set_limit(model, limit_rows, vision_all, peak, bw, total),
                         "limit_distinct_images": _set_limit(model, limit_rows, vision_distinct, peak, bw, total)}
            got[path] = out
        except Exception as exc:  # noqa: BLE001 - reported, the other paths still run
            res[path] = {"error": repr(exc)[:400], "trace": traceback.format_exc()[-1500:]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        save()
    res["lengths_ok"] = {p: all(len(r) == lengths[j] for j, r in out) for p, out in got.items()}
    ref = next((p for p in got if p != "hf_b1"), None)
    if ref is not None:  # token identity between our paths (bf16: the tower's batch differs with `f`)
        want = dict(got[ref])
        res["same_tokens_as_" + ref] = {p: statistics.mean(float(want[j] == r) for j, r in out)
                                        for p, out in got.items()}
    b1 = res.get("hf_b1", {}).get("captions_s") if isinstance(res.get("hf_b1"), dict) else None
    if b1:
        res["vs_hf_b1"] = {p: res[p]["captions_s"] / b1 for p in paths
                           if p != "hf_b1" and isinstance(res.get(p), dict) and "captions_s" in res[p]}
        # the loop's few captions need not have the set's mean length: its time for the whole set, estimated from
        # its mean prefill per caption and its decode time per token at the set's mean length
        loop = res["hf_b1"]
        per_caption = (loop["prefill_s"] / loop["captions"]
                       + statistics.mean(lengths) * loop["decode_s"] / (loop["mean_length"] * loop["captions"]))
        loop["set_s_estimated"] = per_caption * len(texts)
        res["vs_hf_b1_length_adjusted"] = {p: loop["set_s_estimated"] / res[p]["s"] for p in res["vs_hf_b1"]}
    return res


# ---------------------------------------------------------------------------------------------------------------
# GRPO: inputs


def grpo_samples(work: Path, n: int, scale: float = 1.0) -> list[dict[str, Any]]:
    """`n` RePIC training samples, the four task types in turn, each with its own images (PNG, no compression) of
    RePIC-like sizes (times `scale`: CPU rehearsals only)."""
    rng = np.random.RandomState(7)
    (work / "img").mkdir(parents=True, exist_ok=True)
    originals = [(round(w * scale), round(h * scale)) for w, h in ((1333, 1000), (1000, 1333), (1200, 1200),
                                                                    (1600, 900))]
    base = {size: rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8) for size in originals}
    counter = [0]

    def image() -> str:
        i = counter[0] = counter[0] + 1
        size = originals[i % len(originals)]
        # distinct pixels per image (no two samples share an image), cheaply: a shifted copy of a random field
        pixels = np.roll(base[size], shift=(i * 37) % size[1], axis=0) ^ np.uint8(i % 251)
        name = f"img/{i}.png"
        Image.fromarray(pixels).save(work / name, compress_level=0)
        return "./" + name

    kinds = [
        lambda i: {"image": [image(), image()], "accu_reward_method": "yes_no", "solution": "yes",
                   "problem": f"The first image shows <z{i}>. Is <z{i}> in the second image?"},
        lambda i: {"image": image(), "accu_reward_method": "iou", "solution": [100, 120, 400, 500],
                   "problem": f"Where is <z{i}> in this image? Give its bounding box."},
        lambda i: {"image": [image(), image()], "accu_reward_method": "yes_no_name", "solution": f"<z{i}>",
                   "problem": f"The first image shows <z{i}>. Describe the second image, naming <z{i}>."},
        lambda i: {"image": [image(), image(), image()], "accu_reward_method": "yes_no_name_multi",
                   "solution": json.dumps([f"<z{i}>", f"<y{i}>"]),
                   "problem": f"The images show <z{i}> and <y{i}>. Describe the last image, naming both."},
    ]
    return [kinds[i % 4](i) for i in range(n)]


def rollout_rows(n_calls: int, rows_per_call: int, generations: int, grouping: str) -> list[list[int]]:
    """Sample index of each rollout row, per generation call: TRL's sampler without shuffling (`grpo`: each
    prompt G times in a row) or sequential distinct samples (`repic`)."""
    calls = []
    for c in range(n_calls):
        if grouping == "grpo":
            prompts = rows_per_call // generations
            calls.append([c * prompts + r // generations for r in range(rows_per_call)])
        else:
            calls.append([c * rows_per_call + r for r in range(rows_per_call)])
    return calls


def grouped(trainer_cls: type, grouping: str) -> type:
    """`repic`: each group of G consecutive completions from G different samples (RePIC's 8 processes each drew
    their own sample: repic.train.grpo's `grouping: repic` once the training-fidelity issue lands; emulated here by
    a sampler that repeats no index, so TRL normalises the rewards of G different samples together)."""
    if grouping == "grpo":
        return trainer_cls
    from trl.trainer.utils import RepeatSampler

    class RepicGrouping(trainer_cls):
        def _get_train_sampler(self, dataset=None):
            return RepeatSampler(data_source=dataset if dataset is not None else self.train_dataset,
                                 mini_repeat_count=1, batch_size=self.args.generation_batch_size,
                                 repeat_count=self.num_iterations * self.args.steps_per_generation, shuffle=False)

    return RepicGrouping


# ---------------------------------------------------------------------------------------------------------------
# GRPO: timers and FLOP counts


class Meter:
    """Time and counted FLOPs by phase of the current optimizer step; a record per step."""

    def __init__(self, model: Any, lora_r: int) -> None:
        from repic.vlm.generation import _core

        core = _core(model)
        lm = core.model.language_model
        self.cfg = lm.config
        self.layer_params = sum(p.numel() for n, p in lm.layers.named_parameters() if "lora_" not in n)
        self.head_params = core.lm_head.weight.numel()
        # the projections LoRA adapts (PEFT layers: the frozen `base_layer` beside `lora_A` / `lora_B`)
        self.lora_in_out = sum(m.base_layer.in_features + m.base_layer.out_features for m in lm.modules()
                               if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None),
                                                                       torch.nn.Linear))
        self.lora_r = lora_r
        # an adapter on lm_head (the paper's targets): scored (completion) positions only, as the head itself
        head = core.lm_head
        self.head_lora_in_out = (head.base_layer.in_features + head.base_layer.out_features
                                 if hasattr(head, "lora_A") else 0)
        self.visual_cfg = core.model.visual.config
        self.phase: str | None = None
        self.markers: list[str] | None = None  # the phases entered, while a step is profiled (`mark`)
        self.steps: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.time = dict.fromkeys(PHASES, 0.0)
        self.flops = dict.fromkeys(("rollout_vision", "reference_forward", "policy_forward", "backward",
                                    "recompute"), 0.0)
        self.tokens = 0
        # the positions the decoder layers ran in the log-prob forwards, padding included (rows × width)
        self.executed_tokens = {"reference_forward": 0, "policy_forward": 0}
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def timing(self, phase: str):
        sync()
        t0 = time.perf_counter()
        outer, self.phase = self.phase, phase
        self.mark(phase)
        try:
            yield
        finally:
            sync()
            self.phase = outer
            self.mark(outer or "other")
            if outer is None:  # nested phases (none expected) count once, in the outer one
                self.time[phase] += time.perf_counter() - t0

    def mark(self, phase: str) -> None:
        """In a profiled step, a marker kernel (`torch.cuda._sleep`'s, a few cycles) where the GPU's work enters
        `phase`: `phase_kernels` splits the step's kernels at the markers, in the order they were launched."""
        if self.markers is not None and torch.cuda.is_available():
            self.markers.append(phase)
            torch.cuda._sleep(1)

    def vision(self, grid: torch.Tensor) -> None:
        flops = shapes.vision_flops(grid.cpu(), self.visual_cfg)
        if self.phase == "rollout":
            self.flops["rollout_vision"] += flops
        elif self.phase in ("reference_forward", "policy_forward"):
            self.flops[self.phase] += flops

    def layer_input(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """The first decoder layer's input (a forward pre-hook: a checkpointed layer's recompute runs without it):
        its rows × positions, as padded or packed (`pk`) as they ran."""
        x = args[0] if args else kwargs.get("hidden_states")
        if self.phase in self.executed_tokens and x is not None:
            self.executed_tokens[self.phase] += int(x.shape[0] * x.shape[1])

    def forward(self, attention_mask: torch.Tensor, logits_to_keep: int, adapter: bool, training: bool,
                checkpointing: bool) -> None:
        real = attention_mask.sum(1).double()
        completion = attention_mask[:, -logits_to_keep:].sum()
        tokens = float(real.sum())
        gemm = 2.0 * self.layer_params * tokens
        attn = float(2.0 * (real ** 2).sum() * self.cfg.hidden_size * self.cfg.num_hidden_layers)
        head = 2.0 * self.head_params * float(completion)
        lora = 2.0 * self.lora_r * self.lora_in_out * tokens if adapter else 0.0
        head_lora = 2.0 * self.lora_r * self.head_lora_in_out * float(completion) if adapter else 0.0
        phase = "policy_forward" if training else "reference_forward"
        self.flops[phase] += gemm + attn + head + lora + head_lora
        if training:
            self.tokens += int(tokens)
            self.flops["backward"] += gemm + head + 2 * attn + 2 * (lora + head_lora)
            if checkpointing:  # the decoder layers' forward again (the head is outside them)
                self.flops["recompute"] += gemm + attn + lora

    def end_step(self, completion_mean: float | None) -> None:
        sync()
        wall = time.perf_counter() - self.t0
        other = wall - sum(self.time.values())
        self.steps.append({"wall_s": wall, "tokens": self.tokens, "tokens_s": self.tokens / wall,
                           "executed_tokens": dict(self.executed_tokens),
                           "split_s": {**self.time, "other": other},
                           "tflop": {k: v / 1e12 for k, v in self.flops.items()},
                           "completion_mean_length": completion_mean,
                           # the caching allocator's frees-and-retries so far (a step that nears the card's memory)
                           "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries")
                           if torch.cuda.is_available() else None})
        self.reset()


def timed_trainer(trainer_cls: type, meter: Meter) -> type:
    class Timed(trainer_cls):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            backward = self.accelerator.backward

            def timed_backward(loss, **kw):
                with meter.timing("backward"):
                    return backward(loss, **kw)

            self.accelerator.backward = timed_backward

        def _generate_single_turn(self, *args, **kwargs):
            with meter.timing("rollout"):
                return super()._generate_single_turn(*args, **kwargs)

        def _calculate_rewards(self, *args, **kwargs):
            with meter.timing("rewards"):
                return super()._calculate_rewards(*args, **kwargs)

        def _clip_grad_norm(self, *args, **kwargs):
            with meter.timing("optimizer"):
                return super()._clip_grad_norm(*args, **kwargs)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args,
                                               **kwargs):
            training = torch.is_grad_enabled()
            adapter = any(not getattr(m, "disable_adapters", False) for m in model.modules()
                          if hasattr(m, "lora_A"))
            meter.forward(attention_mask, logits_to_keep, adapter, training,
                          training and bool(getattr(self.args, "gradient_checkpointing", False)))
            with meter.timing("policy_forward" if training else "reference_forward"):
                return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                  *args, **kwargs)

    return Timed


class HostSampler:
    """Where the host's time goes during one step: a thread reads the main thread's Python stack every `every_s`
    and files it under the meter's phase at that moment (`None`: "other", the host work between phases). Summary:
    samples by phase, and for "other" the innermost frames and the deepest frames of TRL / transformers' trainer /
    this project / datasets / PIL (who asked for the time)."""

    OWNERS = ("trl/", "transformers/trainer", "datasets/", "PIL/", "accelerate/", "/repic/", "/bench/")

    def __init__(self, meter: Meter, every_s: float = 0.005) -> None:
        import threading

        self.meter, self.every_s = meter, every_s
        self.main = threading.main_thread().ident
        self.samples: list[tuple[str | None, list[str]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            frame = sys._current_frames().get(self.main)
            stack = []
            while frame is not None and len(stack) < 80:
                code = frame.f_code
                name = code.co_filename
                cut = name.rfind("site-packages/")
                name = name[cut + 14:] if cut >= 0 else name.replace(str(ROOT), "")
                stack.append(f"{name}:{frame.f_lineno} {code.co_name}")
                frame = frame.f_back
            self.samples.append((self.meter.phase, stack))

    def __enter__(self) -> HostSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self, top: int = 20) -> dict[str, Any]:
        from collections import Counter

        phases = Counter(str(p) for p, _ in self.samples)
        other = [stack for p, stack in self.samples if p is None]
        leaf = Counter(stack[0] for stack in other if stack)
        owner = Counter(next((f for f in stack if f.startswith(self.OWNERS)), stack[-1] if stack else "?")
                        for stack in other)
        by_phase = {str(ph): Counter(stack[0] for p, stack in self.samples if p == ph and stack).most_common(8)
                    for ph in ("reference_forward", "policy_forward", "backward")}
        return {"every_s": self.every_s, "samples_by_phase": dict(phases),
                "leaf_by_phase": {ph: [[f, n] for f, n in rows] for ph, rows in by_phase.items()},
                "other_s_estimate": len(other) * self.every_s,
                "other_by_leaf": [[f, n] for f, n in leaf.most_common(top)],
                "other_by_owner": [[f, n] for f, n in owner.most_common(top)]}


def step_callbacks(meter: Meter, deadline: float, min_steps: int, profile: dict | None) -> list:
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        # a step's wall time runs from the previous step's end (the first: the start of training) to its own end,
        # so batch fetching and logging between steps count too
        def on_train_begin(self, args, state, control, **kwargs):
            meter.reset()

        def on_step_begin(self, args, state, control, **kwargs):
            if profile is not None and state.global_step == profile["at"]:
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as torch_profile

                activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
                profile["prof"] = torch_profile(activities=activities)
                profile["prof"].__enter__()
                meter.markers = ["other"]
                profile["host"] = HostSampler(meter).__enter__()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            sync()
            self.t = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            sync()
            meter.time["optimizer"] += time.perf_counter() - self.t

        def on_step_end(self, args, state, control, **kwargs):
            logs = [r for r in state.log_history if "completions/mean_length" in r]
            if profile is not None and "prof" in profile and "rows" not in profile:
                sync()
                host = profile.pop("host")
                host.__exit__(None, None, None)
                profile["prof"].__exit__(None, None, None)
                prof = profile.pop("prof")
                profile["rows"] = kernel_classes(prof)
                markers, meter.markers = meter.markers, None
                try:
                    profile["rows"]["by_phase"] = phase_kernels(prof, markers)
                except Exception:  # noqa: BLE001 - the step's other figures stand
                    profile["rows"]["by_phase_error"] = traceback.format_exc()[-1500:]
                profile["rows"]["host"] = host.summary()
                meter.reset()
                return
            meter.end_step(None)  # and resets the meter: the next step starts now
            meter.steps[-1]["logged"] = len(logs)
            if time.perf_counter() > deadline and state.global_step >= min_steps:
                control.should_training_stop = True

    return [Steps()]


def kernel_classes(prof: Any) -> dict[str, Any]:
    events = [e for e in prof.key_averages() if e.device_time_total > 0] or list(prof.key_averages())
    total = "device_time_total" if any(e.device_time_total > 0 for e in events) else "cpu_time_total"
    classes: dict[str, float] = {}
    for e in events:
        key = shapes.kernel_class(e.key)
        classes[key] = classes.get(key, 0.0) + getattr(e, total) / 1e3
    return {"time": total, "ms": sum(classes.values()), "by_class_ms": dict(sorted(classes.items(),
                                                                                 key=lambda kv: -kv[1])),
            "top": [{"name": e.key[:110], "calls": e.count, "ms": getattr(e, total) / 1e3}
                    for e in sorted(events, key=lambda e: -getattr(e, total))[:25]]}


def phase_kernels(prof: Any, markers: list[str], top: int = 15) -> dict[str, Any]:
    """The profiled step's GPU work by phase, split at the meter's marker kernels (`Meter.mark`: one where the work
    enters each phase, launched after a synchronisation, so the GPU runs the phase's kernels between its marker and
    the next): per phase the GPU time from its marker to the next (`window_ms`, summed over the phase's spans),
    its kernel time, the time at least one kernel ran (`busy_ms`; the rest of the window the GPU waited on the
    host), kernel time by class, and the top kernels."""
    from torch.autograd import DeviceType

    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == DeviceType.CUDA)
    spins = [i for i, k in enumerate(kernels) if "spin_kernel" in k[2] or "sleep" in k[2].lower()]
    if len(spins) != len(markers) - 1:  # markers[0] is the state before the first marker
        raise ValueError(f"{len(spins)} marker kernels for {len(markers) - 1} phase changes")
    cuts = [0, *spins, len(kernels)]
    starts = [kernels[0][0] if kernels else 0.0, *(kernels[i][0] for i in spins)]
    out: dict[str, dict[str, Any]] = {}
    for n, phase in enumerate(markers):
        span = kernels[cuts[n] + (n > 0):cuts[n + 1]]
        row = out.setdefault(phase, {"window_ms": 0.0, "kernel_ms": 0.0, "busy_ms": 0.0, "by_class_ms": {},
                                     "kernels": {}})
        end = starts[n + 1] if n + 1 < len(starts) else max((k[1] for k in span), default=starts[n])
        row["window_ms"] += (end - starts[n]) / 1e3
        reach = None
        for start, stop, name in span:
            ms = (stop - start) / 1e3
            row["kernel_ms"] += ms
            cls = shapes.kernel_class(name)
            row["by_class_ms"][cls] = row["by_class_ms"].get(cls, 0.0) + ms
            calls, total = row["kernels"].get(name[:110], (0, 0.0))
            row["kernels"][name[:110]] = (calls + 1, total + ms)
            if reach is None or start >= reach:
                row["busy_ms"] += ms
                reach = stop
            elif stop > reach:
                row["busy_ms"] += (stop - reach) / 1e3
                reach = stop
    for row in out.values():
        row["kernels"] = [{"name": k, "calls": c, "ms": ms}
                          for k, (c, ms) in sorted(row["kernels"].items(), key=lambda kv: -kv[1][1])[:top]]
        row["by_class_ms"] = dict(sorted(row["by_class_ms"].items(), key=lambda kv: -kv[1]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# GRPO: one path


def parse_path(spec: str, default_steps: int) -> tuple[str, set[str], int, int | None]:
    """`base+lever+...~N@S` -> (base, levers, steps S, completions per micro-step N or None: the run's)."""
    name, _, steps = spec.partition("@")
    name, _, micro = name.partition("~")
    base, *levers = name.split("+")
    unknown = [x for x in levers if x not in LEVERS + TARGETS]
    if base not in ("hf", "ours") or unknown or not (steps.isdigit() or not steps) \
            or not (micro.isdigit() or not micro):
        raise SystemExit(f"--grpo-paths: bad path {spec!r} (hf|ours, then +{'|+'.join(LEVERS + TARGETS)}, "
                         "optional ~N "
                         "completions per micro-step, optional @steps)")
    if base == "hf" and {"pr", "cd", "ra"} & set(levers):
        raise SystemExit(f"--grpo-paths: {spec!r}: pr, cd and ra are levers of the static rollouts (ours)")
    return base, set(levers), int(steps) if steps else default_steps, int(micro) if micro else None


def path_of(key: str) -> str:
    """The path spec of a results key: a path given twice keeps its second run as `<spec> #2`."""
    return key.split(" #")[0]


def forget_rollout_features(cache: Any) -> None:
    """`rx`: the feature cache keeps nothing computed under inference mode (a rollout), as before 2026-12-07."""
    add = cache.add

    def add_unless_inference(key: tuple, pixels: torch.Tensor, features: torch.Tensor) -> None:
        if not torch.is_inference_mode_enabled():
            add(key, pixels, features)
    cache.add = add_unless_inference


def packed_attention_check(lengths: tuple[int, ...] = (915, 1224, 1830, 2553), heads: int = 28, kv_heads: int = 4,
                           dim: int = 128, reps: int = 5) -> dict[str, Any]:
    """`pk`'s attention on the card: torch's variable-length flash kernel against one causal SDPA product per row
    (bf16, RePIC's row lengths, Qwen2.5-VL-7B's heads), forward outputs and input gradients, and each kernel's time
    (forward + backward)."""
    from repic.train.speed import PACKED_ATTENTION, _varlen_attn, packed_attention

    if _varlen_attn() is None:
        return {"varlen_attn": None}
    g = torch.Generator(device="cuda").manual_seed(0)
    total = sum(lengths)
    q0, k0, v0 = (torch.randn(1, h, total, dim, device="cuda", dtype=torch.bfloat16, generator=g)
                  for h in (heads, kv_heads, kv_heads))
    bounds = torch.tensor([0, *np.cumsum(lengths)], device="cuda", dtype=torch.int32)
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    out: dict[str, Any] = {"lengths": list(lengths)}
    grads = {}
    for kernel in ("varlen", "rows"):
        PACKED_ATTENTION["kernel"] = kernel
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))

        def run(q=q, k=k, v=v):
            o, _ = packed_attention(module, q, k, v, None, scaling=dim ** -0.5, dropout=0.0,
                                    cu_seq_lens_q=bounds, max_length_q=max(lengths))
            o.float().square().sum().backward()
            return o
        try:
            o = run()
            grads[kernel] = (o.detach(), q.grad.clone(), k.grad.clone())
            sync()
            t = time.perf_counter()
            for _ in range(reps):
                q.grad = k.grad = v.grad = None
                run()
            sync()
            out[f"{kernel}_ms"] = (time.perf_counter() - t) / reps * 1e3
        except Exception as exc:  # noqa: BLE001 - reported
            out[f"{kernel}_error"] = repr(exc)[:300]
    PACKED_ATTENTION["kernel"] = "auto"
    if len(grads) == 2:
        for i, name in enumerate(("output", "grad_q", "grad_k")):
            a, b = grads["varlen"][i].float(), grads["rows"][i].float()
            out[f"{name}_max_abs_diff"] = float((a - b).abs().max())
            out[f"{name}_max_abs"] = float(b.abs().max())
    return out


def graph_dropout_check(p: float = 0.05, shape: tuple[int, int, int] = (16, 1, 3584), replays: int = 3
                        ) -> dict[str, Any]:
    """`cd` with LoRA dropout on the card: the compiled decode step draws its masks with inductor's generator inside a
    CUDA graph. A compiled dropout captured by the decoder's own capture (`generation.capture_graph`), replayed:
    does each replay draw new masks, at rate p?"""
    import torch.nn.functional as F

    fn = torch.compile(lambda x: F.dropout(x, p, training=True), fullgraph=True)
    x = torch.ones(shape, device="cuda", dtype=torch.bfloat16)
    out: dict[str, torch.Tensor] = {}
    graph = gen.capture_graph(lambda: out.update(y=fn(x)))
    masks = []
    for _ in range(replays):
        graph.replay()
        masks.append(out["y"] == 0)
    sync()
    return {"p": p, "replays": replays, "dropped_fraction": [float(m.float().mean()) for m in masks],
            "replays_differ": all(not torch.equal(a, b) for a, b in zip(masks, masks[1:]))}


def dropout_check(p: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """On the card: LoRA's dropout of a bf16 input cast to fp32 (PEFT's path; autocast rounds it to bf16 for the
    product) against the dropout of the bf16 input itself (`ac`), same seed, at a projection input's shape: the
    same masks? the same bf16 values and input gradients where both masks keep (the kernel computes in fp32 and
    rounds once)?"""
    x = torch.randn(8 * 1400, 3584, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    drop = torch.nn.Dropout(p).train()
    out = []
    for cast in (True, False):
        xi = x.clone().requires_grad_()
        torch.manual_seed(seed)
        y = drop(xi.float()).to(torch.bfloat16) if cast else drop(xi)
        y.backward(g)
        out.append((y.detach(), xi.grad))
    (a, ga), (b, gb) = out
    both = (a != 0) & (b != 0)  # kept by both masks: the kernels' arithmetic compared where the draws agree
    return {"elements": x.numel(), "same_mask": bool(torch.equal(a == 0, b == 0)),
            "same_values": bool(torch.equal(a, b)), "same_input_gradients": bool(torch.equal(ga, gb)),
            "kept_by_both": int(both.sum()), "same_values_where_both_keep": bool(torch.equal(a[both], b[both])),
            "same_gradients_where_both_keep": bool(torch.equal(ga[both], gb[both])),
            "dropped_fraction": float((b == 0).float().mean()),
            "dropped_fraction_cast_path": float((a == 0).float().mean())}


def summarize(steps: list[dict[str, Any]], peak: float) -> dict[str, Any]:
    """Steps 2..N (the first includes warm-up: graph capture, compilation, allocator growth)."""
    warm = steps[1:] or steps
    if not warm:
        return {}
    wall = sum(s["wall_s"] for s in warm)
    tokens = sum(s["tokens"] for s in warm)
    split = {k: sum(s["split_s"][k] for s in warm) / len(warm) for k in warm[0]["split_s"]}
    train_s = sum(s["split_s"]["reference_forward"] + s["split_s"]["policy_forward"] + s["split_s"]["backward"]
                  for s in warm)
    tf = {k: sum(s["tflop"][k] for s in warm) for k in warm[0]["tflop"]}
    useful = tf["reference_forward"] + tf["policy_forward"] + tf["backward"]
    executed = useful + tf["recompute"]
    out = {"steps_counted": len(warm), "step_s_median": statistics.median(s["wall_s"] for s in warm),
           "tokens_per_step": tokens / len(warm), "tokens_s_per_gpu": tokens / wall, "split_s_mean": split,
           "split_share": {k: v / (wall / len(warm)) for k, v in split.items()},
           "training_phase_s_mean": train_s / len(warm), "training_tflop_per_step": useful / len(warm),
           "training_tflops_useful": useful / train_s if train_s else None,
           "training_tflops_executed": executed / train_s if train_s else None}
    executed_tokens = [s.get("executed_tokens") or {} for s in warm]
    if all(executed_tokens) and tokens:
        # the log-prob forwards' input positions (padding included) over their real tokens: 1.0 = no padding
        out["forward_positions_over_tokens"] = {
            k: sum(e[k] for e in executed_tokens) / tokens for k in ("reference_forward", "policy_forward")}
    if peak and train_s:
        out["training_pct_of_peak_useful"] = 100 * useful * 1e12 / train_s / peak
        out["training_pct_of_peak_executed"] = 100 * executed * 1e12 / train_s / peak
    return out


def run_path(model: Any, processor: Any, dataset: Any, spec: str, args: Any, schedule: list[list[int]],
             peak: float, deadline: float) -> tuple[dict[str, Any], Any]:
    from trl import GRPOTrainer

    from repic.train import speed
    from repic.train.grpo import grpo_config, lora_model, recipe_trainer, reward_functions
    from repic.train.speed import disable_packing, fast_trainer, lora_inputs_cast
    from repic.vlm.image_memo import unmemoize_image_processor
    from repic.vlm.vision import disable_fast_vision, disable_image_feature_cache

    cuda = torch.cuda.is_available()
    base, levers, steps, micro = parse_path(spec, args.grpo_steps)
    profile = {"at": steps} if spec in args.grpo_profile else None  # one more step, profiled, not counted
    per_step = args.grpo_per_device * args.grpo_grad_accum  # completions an optimizer step, in one rollout call
    micro = micro or args.grpo_per_device
    if per_step % micro:
        raise ValueError(f"{spec}: {micro} completions a micro-step do not divide {per_step} a step")
    # the recipe's section (`--grpo-recipe`), as the training stage reads it: its GRPOConfig fields (sampling, β,
    # loss, advantages, learning rate) and its LoRA, rollout dropout and lm_head log-probs; the batch, length,
    # steps, precision, checkpointing and G are this benchmark's
    recipe = dict(args.recipe, rollout_backend="hf" if base == "hf" else "static")
    if "lm" in levers:
        recipe["lora_targets"] = "language_model"
    grpo = {k: v for k, v in recipe["grpo"].items() if k not in BENCH_GRPO_KEYS}
    grpo.update(num_generations=args.grpo_generations, per_device_train_batch_size=micro,
                gradient_accumulation_steps=per_step // micro, max_completion_length=args.grpo_max_new,
                bf16=cuda, gradient_checkpointing=cuda and "nockpt" not in levers,
                dataloader_num_workers=4 if "nw" in levers else 0,
                max_steps=steps + (1 if profile else 0), logging_steps=1, seed=0, shuffle_dataset=False,
                report_to="none", save_strategy="no")
    targs = grpo_config(grpo, tempfile.mkdtemp(), use_cpu=not cuda)
    cls = recipe_trainer(GRPOTrainer, recipe)
    if base == "ours":
        cls = type("Levers" + cls.__name__, (cls,), {"decode_compile": "cd" in levers,
                                                      "prefill_rows": "pr" in levers,
                                                      "prefill_vision_once": "pr" in levers,
                                                      "prefill_autocast": "ra" in levers,
                                                      "prefill_packed": "pkp" in levers})
    cls = fast_trainer(grouped(cls, args.grpo_grouping), compile_vision="vc" in levers,
                       preprocess_once="pp" in levers, autocast_lora="ac" in levers,
                       trim_padding="tp" in levers, packed=bool({"pk", "pkr", "pkp"} & levers))
    speed.PACKED_ATTENTION["kernel"] = "rows" if "pkr" in levers else "auto"
    torch.manual_seed(0)
    peft_model = lora_model(model.train(), recipe)
    meter = Meter(peft_model, recipe["lora"]["r"])
    visual = peft_model.get_base_model().model.visual
    hook = visual.register_forward_pre_hook(lambda m, a, k: meter.vision(k.get("grid_thw", a[1] if len(a) > 1
                                                                              else None)), with_kwargs=True)
    lm_hook = peft_model.get_base_model().model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: meter.layer_input(a, k), with_kwargs=True)
    shapes.Lengths.schedule = [list(x) for x in schedule]
    head = gen._core(peft_model).lm_head
    out: dict[str, Any] = {"path": spec, "levers": sorted(levers - set(TARGETS)),
                           "lora_targets": recipe.get("lora_targets", "language_model"),
                           "lora_modules": len(peft_model.targeted_module_names),
                           "lm_head_adapter": hasattr(head, "lora_A"),
                           # TRL's chunked head (no full-vocabulary logits) unless the head carries LoRA: TRL 1.16
                           # refuses that adapter, the training stage's lora_head_trainer scores it unchunked
                           "log_probs": "lora_head_trainer (unchunked)" if hasattr(head, "lora_A")
                           else "TRL fused chunked head",
                           "rollout_dropout": recipe.get("rollout_dropout"),
                           "grpo_config": {k: v for k, v in grpo.items() if k not in ("report_to", "save_strategy")},
                           "per_device_train_batch_size": micro,
                           "gradient_accumulation_steps": per_step // micro,
                           "gradient_checkpointing": grpo["gradient_checkpointing"]}
    trainer = None
    genbench.peak_reset()
    start = time.perf_counter()
    try:
        trainer = timed_trainer(cls, meter)(
            model=peft_model, args=targs, train_dataset=dataset, processing_class=processor,
            reward_funcs=reward_functions(recipe["rewards"], recipe["protocol"]),
            callbacks=step_callbacks(meter, deadline, 2, profile))
        if "rx" in levers and getattr(trainer, "image_feature_cache", None) is not None:
            forget_rollout_features(trainer.image_feature_cache)
        trainer.train()
        logs = [r for r in trainer.state.log_history if "completions/mean_length" in r]
        for step, rec in zip(meter.steps, logs):
            step["completion_mean_length"] = rec["completions/mean_length"]
        out.update(steps=meter.steps, summary=summarize(meter.steps, peak), peak_gib=genbench.peak_gib(),
                   wall_s=time.perf_counter() - start,
                   checkpointed_layers=sum(bool(getattr(m, "gradient_checkpointing", False))
                                           for m in peft_model.modules()))
        if profile is not None and "rows" in profile:
            out["profile_last_step"] = profile["rows"]
        cache = getattr(trainer, "image_feature_cache", None)
        if cache is not None:
            out["images_requested_vs_encoded"] = [cache.requested_images, cache.tower_images]
        if getattr(trainer, "rollout_stats", None):  # the static backend's last rollout: decode compiled, graphed
            out["last_rollout"] = dict(trainer.rollout_stats)
    except Exception as exc:  # noqa: BLE001 - reported, the other paths still run
        out.update(error=repr(exc)[:500], trace=traceback.format_exc()[-2500:], steps=meter.steps,
                   summary=summarize(meter.steps, peak))
    hook.remove()
    lm_hook.remove()
    trainer = None
    disable_fast_vision(peft_model)
    disable_image_feature_cache(peft_model)
    disable_packing(peft_model)
    lora_inputs_cast(peft_model)
    unmemoize_image_processor(processor.image_processor)
    model = peft_model.unload()
    # the trainer turned on gradient checkpointing and TRL's input-gradient hook on the shared base model: off again,
    # so that the next path's arguments decide (a `nockpt` path after a checkpointed one was checkpointed before
    # 2026-12-07)
    model.activation_checkpointing_disable()
    model.disable_input_require_grads()
    # the fused-head forwards TRL (add_fused_lm_head) and lora_head_trainer set on the instance: the next path's
    # trainer sets its own on the model's class forward
    vars(gen._core(model)).pop("forward", None)
    if cuda:
        torch.cuda.empty_cache()
    return out, model


def section_grpo(model: Any, processor: Any, args: Any, peak: float, deadline: float, save: Any,
                 results: dict[str, Any]) -> Any:
    from datasets import Dataset

    from repic.train.grpo import build_examples

    G, per_device, accum = args.grpo_generations, args.grpo_per_device, args.grpo_grad_accum
    rows_per_call = per_device * accum  # TRL generates a whole optimizer step's completions in one call
    max_steps = max(parse_path(p, args.grpo_steps)[2] for p in args.grpo_paths) + 1
    calls = rollout_rows(max_steps, rows_per_call, G, args.grpo_grouping)
    n_samples = max(i for c in calls for i in c) + 1
    work = Path(tempfile.mkdtemp())
    samples = grpo_samples(work, n_samples, args.grpo_image_scale)
    t0 = time.perf_counter()
    dataset = Dataset.from_list(build_examples(samples, work, seed=0, **args.recipe.get("resize", {})))
    rng = np.random.RandomState(11)
    schedule = [[min(int(rng.randint(*shapes.GRPO_LENGTHS[samples[i]["accu_reward_method"]])), args.grpo_max_new)
                 for i in call] for call in calls]
    results.update(recipe=args.grpo_recipe, recipe_section=args.recipe, grouping=args.grpo_grouping,
                   generations=G, per_device_completions=per_device, grad_accum=accum,
                   completions_per_step=rows_per_call,
                   prompts_per_step=rows_per_call // G if args.grpo_grouping == "grpo" else rows_per_call,
                   samples=n_samples, build_examples_s=time.perf_counter() - t0,
                   tasks_per_call=[[samples[i]["accu_reward_method"] for i in c] for c in calls],
                   lengths_per_call=schedule, processor_size=dict(processor.image_processor.size), paths={})
    shapes.patch_hf_generate(type(gen._core(model)))
    for spec in args.grpo_paths:
        # a path given twice (the process's first path is slow, so a baseline is often run again last) keeps both
        # results: the second under `<spec> #2`
        runs = sum(path_of(k) == spec for k in results["paths"])
        key = f"{spec} #{runs + 1}" if runs else spec
        if time.perf_counter() > deadline:
            results["paths"][key] = {"skipped": "deadline"}
            continue
        results["paths"][key], model = run_path(model, processor, dataset, spec, args, schedule, peak, deadline)
        save()
        s = results["paths"][key].get("summary") or {}
        print(f"[grpo] {key}: tokens/s/GPU {s.get('tokens_s_per_gpu')}, step {s.get('step_s_median')}, "
              f"training TFLOP/s {s.get('training_tflops_useful')}, "
              f"error {results['paths'][key].get('error')}", flush=True)
    ok = {p: r["summary"]["tokens_s_per_gpu"] for p, r in results["paths"].items()
          if (r.get("summary") or {}).get("tokens_s_per_gpu")}
    for ref in ("hf", "ours"):
        base = next((v for p, v in ok.items() if parse_path(path_of(p), 1)[:2] == (ref, set())
                     and parse_path(path_of(p), 1)[3] is None), None)
        if base:
            results[f"tokens_s_vs_{ref}"] = {p: v / base for p, v in ok.items()}
    return model


# ---------------------------------------------------------------------------------------------------------------


def summary_lines(res: dict[str, Any]) -> list[str]:
    """A compact table of a perf.json (complete or cut short): the peak, each GRPO path's tokens/s per GPU, its
    ratio to TRL's default path and to `ours+pp` (same run), step, training TFLOP/s and % of the measured peak,
    the split, peak memory, LoRA targets and log-prob path; the profile's kernel classes; the captioning cells."""
    lines = [f"peak: {res.get('peak')}  build_s: {res.get('build_s')}  wall_s: {res.get('wall_s')}"]
    for row in res.get("caption") or []:
        lines.append("caption " + json.dumps({k: (v.get("captions_s"), (v.get("limit") or {}).get("fraction_of_limit"))
                                              if isinstance(v, dict) else v for k, v in row.items()
                                              if k not in ("lengths", "prompt_tokens", "trace")}, default=str)[:600])
    cs = res.get("caption_set") or {}
    if cs:
        lines.append(f"caption_set: {cs.get('conversations')} conversations in batches of {cs.get('batch')}, images "
                     f"shown {cs.get('images_shown')} / distinct {cs.get('images_distinct')}, "
                     f"{cs.get('image_tokens_per_conversation')} image tokens a conversation; vs_hf_b1 "
                     f"{cs.get('vs_hf_b1')} (length-adjusted {cs.get('vs_hf_b1_length_adjusted')}); "
                     f"lengths_ok {cs.get('lengths_ok')}; {cs.get('error') or ''}")
        lines.append("path | captions/s | s | prefill s | decode s | first run s | images requested/encoded | "
                     "limit s (every image) → fraction | limit s (distinct images) → fraction")
        for p, v in cs.items():
            if isinstance(v, dict) and ("captions_s" in v or "error" in v or "skipped" in v):
                if "captions_s" not in v:
                    lines.append(f"{p} | {v.get('skipped') or v.get('error')}")
                    continue
                le, ld = v.get("limit_every_image") or {}, v.get("limit_distinct_images") or {}
                lines.append(" | ".join([p, f"{v['captions_s']:.3f}", f"{v['s']:.2f}", f"{v['prefill_s']:.2f}",
                                         f"{v['decode_s']:.2f}", f"{v.get('first_call_s') or 0:.2f}",
                                         str(v.get("images_requested_vs_encoded")),
                                         f"{le.get('limit_s') or 0:.2f} → {le.get('fraction_of_limit') or 0:.3f}",
                                         f"{ld.get('limit_s') or 0:.2f} → {ld.get('fraction_of_limit') or 0:.3f}"]))
    grpo = res.get("grpo") or {}
    paths = grpo.get("paths") or {}
    ok = {p: r["summary"]["tokens_s_per_gpu"] for p, r in paths.items() if (r.get("summary") or {}).get(
        "tokens_s_per_gpu")}
    hf = next((v for p, v in ok.items() if p.split("@")[0] == "hf"), None)
    pp = ok.get("ours+pp")
    lines.append(f"grpo: recipe {grpo.get('recipe')}, {grpo.get('completions_per_step')} completions a step "
                 f"({grpo.get('per_device_completions')} x {grpo.get('grad_accum')}), grouping {grpo.get('grouping')}")
    lines.append("path | tok/s/GPU | x hf | x ours+pp | step s | train TFLOP/s | % peak | "
                 "rollout/ref/policy/backward/optimizer/other s | GiB | targets (modules) | log-probs | steps")
    for p, r in paths.items():
        s = r.get("summary") or {}
        if not s:
            lines.append(f"{p} | {r.get('skipped') or (r.get('error') or 'no step')[:200]}")
            continue
        split = s["split_s_mean"]
        tok = s["tokens_s_per_gpu"]
        lines.append(" | ".join([
            p, f"{tok:,.0f}", f"{tok / hf:.3f}" if hf else "-", f"{tok / pp:.3f}" if pp else "-",
            f"{s['step_s_median']:.2f}", f"{s.get('training_tflops_useful') or 0:.1f}",
            f"{s.get('training_pct_of_peak_useful') or 0:.1f}",
            " / ".join(f"{split.get(k, 0):.2f}" for k in ("rollout", "reference_forward", "policy_forward",
                                                           "backward", "optimizer", "other")),
            f"{r.get('peak_gib') or 0:.1f}", f"{r.get('lora_targets')} ({r.get('lora_modules')})",
            str(r.get("log_probs")), f"{[round(x['wall_s'], 1) for x in r.get('steps', [])]}"
            + (f" ERROR {r['error'][:200]}" if r.get("error") else "")]))
        prof = r.get("profile_last_step")
        if prof:
            lines.append(f"  profile of {p} ({prof['time']}, {prof['ms']:.0f} ms): "
                         + ", ".join(f"{k} {v:.0f}" for k, v in prof["by_class_ms"].items()))
            lines.extend(f"    {t['ms']:8.1f} ms {t['calls']:6d}x {t['name']}" for t in prof["top"][:12])
            for phase, row in (prof.get("by_phase") or {}).items():
                lines.append(f"  phase {phase}: GPU window {row['window_ms']:.0f} ms, kernels {row['kernel_ms']:.0f} "
                             f"ms, busy {row['busy_ms']:.0f} ms: "
                             + ", ".join(f"{k} {v:.0f}" for k, v in row["by_class_ms"].items()))
                lines.extend(f"    {t['ms']:8.1f} ms {t['calls']:6d}x {t['name']}" for t in row["kernels"][:8])
            if prof.get("by_phase_error"):
                lines.append(f"  by phase: {prof['by_phase_error'][-300:]}")
        if s.get("forward_positions_over_tokens"):
            lines.append(f"  forward positions / tokens: {s['forward_positions_over_tokens']}")
    if grpo.get("error"):
        lines.append(f"grpo error: {grpo['error'][:300]}")
    return lines


def load_recipe(overlay: str) -> dict[str, Any]:
    """The `train_grpo_lora` section the training stage reads under `overlay` (a params overlay, e.g.
    configs/paper.yaml, merged onto the repository's params.yaml as `make paper` merges it; `-`: params.yaml
    alone)."""
    import yaml

    from repic.core.params import deep_merge, read_overlay

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    if overlay != "-":
        path = Path(overlay)
        params = deep_merge(params, read_overlay(path if path.is_absolute() or path.exists() else ROOT / path))
    return params["train_grpo_lora"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(genbench.SHAPES), default="7b")
    ap.add_argument("--image-px", type=int, default=shapes.CAPTION_PX, help="captioning max_pixels = this²")
    ap.add_argument("--sections", nargs="+", default=["peak", "caption", "grpo"],
                    choices=["peak", "caption", "caption_set", "grpo"])
    ap.add_argument("--caption-plan", nargs="*", default=["4:32:ours_cdmr,ours_cdmrv,hf_b1"],
                    help="captioning cells as k:batch:path,path,... (bench/repic_shapes.py's paths)")
    ap.add_argument("--b1-captions", type=int, default=2, help="captions timed in RePIC's batch-1 loop")
    ap.add_argument("--caption-set", default=None, metavar="B:path,path,...",
                    help="section caption_set: RePIC's whole 4-concept evaluation in batches of B through these "
                         "paths (bench/repic4_workload.json)")
    ap.add_argument("--caption-set-workload", default=str(ROOT / "bench/repic4_workload.json"))
    ap.add_argument("--max-new-tokens", type=int, default=160, help="captioning")
    ap.add_argument("--grpo-paths", nargs="+", default=[f"{STAGE}@2", STAGE, "hf@2"],
                    help="GRPO paths (module docstring); default: the training stage's on CUDA twice, TRL's")
    ap.add_argument("--grpo-steps", type=int, default=3, help="optimizer steps per path (the first is warm-up)")
    ap.add_argument("--grpo-per-device", type=int, default=8, help="completions per micro-step "
                    "(per_device_train_batch_size)")
    ap.add_argument("--grpo-grad-accum", type=int, default=2, help="gradient_accumulation_steps")
    ap.add_argument("--grpo-generations", type=int, default=8, help="G (num_generations)")
    ap.add_argument("--grpo-grouping", choices=["repic", "grpo"], default="repic")
    ap.add_argument("--grpo-recipe", default="configs/paper.yaml",
                    help="the params overlay whose train_grpo_lora section is trained (its LoRA, lm_head adapter, "
                         "rollout dropout, sampling, loss; '-': params.yaml's own)")
    ap.add_argument("--grpo-max-new", type=int, default=256)
    ap.add_argument("--grpo-profile", nargs="*", default=[],
                    help="paths of --grpo-paths to profile one extra step of")
    ap.add_argument("--grpo-max-pixels", type=int, default=12845056, help="the processor's (Qwen2.5-VL's default)")
    ap.add_argument("--grpo-image-scale", type=float, default=1.0, help="original image sizes x this (CPU only)")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="no new section, path or step after this")
    ap.add_argument("--out", help="the JSON written (saved after every path)")
    ap.add_argument("--summarize", metavar="JSON", help="print the compact summary of a perf.json and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        print("\n".join(summary_lines(json.loads(Path(args.summarize).read_text()))))
        return 0
    if not args.out:
        ap.error("--out is required")
    for p in args.grpo_paths:
        parse_path(p, 1)
    if set(args.grpo_profile) - set(args.grpo_paths):
        raise SystemExit(f"--grpo-profile {args.grpo_profile!r}: not all of them are --grpo-paths")
    args.recipe = load_recipe(args.grpo_recipe)

    t0 = time.perf_counter()
    deadline = t0 + args.deadline_s
    cuda = torch.cuda.is_available()
    res: dict[str, Any] = {"date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
                           "env": genbench.environment(), "datasheet_bf16_tflops": shapes.DATASHEET_BF16 / 1e12}
    out = Path(args.out)

    def save() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        tmp.replace(out)

    shapes._SAVE = save

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    if "peak" in args.sections and cuda:
        res["peak"] = shapes.measure_peak()
        res["lora_dropout_bf16"] = dropout_check()
        try:
            res["graph_dropout"] = graph_dropout_check()
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            res["graph_dropout"] = {"error": repr(exc)[:500]}
        log(f"compiled dropout in a CUDA graph {res['graph_dropout']}")
        try:
            res["packed_attention"] = packed_attention_check()
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            res["packed_attention"] = {"error": repr(exc)[:500]}
        log(f"packed attention {res['packed_attention']}")
        log(f"peak {res['peak']}")
    save()
    peak = res.get("peak", {}).get("bf16_matmul_tflops", 0) * 1e12
    bw = res.get("peak", {}).get("copy_tb_s", 0) * 1e12
    model, processor = genbench.build(args.model, "cuda" if cuda else "cpu",
                                      torch.bfloat16 if cuda else torch.float32, args.image_px)
    shapes.Lengths.eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = shapes.Lengths.eos
    shapes.patch_static_decoder()
    res["build_s"] = time.perf_counter() - t0
    log("built")
    with torch.inference_mode():  # cuBLAS / attention initialisation out of every timed call
        texts, images, _ = shapes.caption_batch(processor, 1, 1, seed=0)
        warm = shapes.to_device(model, processor, texts, images)
        shapes.Lengths.current = [3]
        gen.generate_ids(model, warm, backend="hf", max_new_tokens=4, do_sample=False,
                         logits_processor=[shapes.ForcedLengths(warm["input_ids"].shape[1], [3])])
    if "caption" in args.sections:
        res["caption"] = []
        try:
            res["caption"] = section_caption(model, processor, args.caption_plan, args.b1_captions,
                                             args.max_new_tokens, peak, bw, deadline, save)
        except Exception as exc:  # noqa: BLE001
            res["caption"].append({"error": repr(exc)[:500], "trace": traceback.format_exc()[-2000:]})
        save()
        for row in res["caption"]:
            log("caption " + json.dumps({k: (v.get("captions_s"), (v.get("limit") or {}).get("fraction_of_limit"))
                                         if isinstance(v, dict) else v for k, v in row.items()
                                         if k not in ("lengths", "prompt_tokens", "trace")}, default=str)[:1500])
    if "caption_set" in args.sections:
        batch, paths = (args.caption_set or "32:ours_cdmr,ours_cdmrf,hf_b1").split(":")
        try:
            res["caption_set"] = section_caption_set(model, processor, int(batch), paths.split(","),
                                                     args.b1_captions, args.max_new_tokens, peak, bw, deadline,
                                                     save, Path(args.caption_set_workload))
        except Exception as exc:  # noqa: BLE001
            res["caption_set"] = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-2000:]}
        save()
        cs = res["caption_set"]
        log("caption_set " + json.dumps({p: (v.get("captions_s"), v.get("images_requested_vs_encoded"),
                                             (v.get("limit_every_image") or {}).get("fraction_of_limit"),
                                             (v.get("limit_distinct_images") or {}).get("fraction_of_limit"))
                                         for p, v in cs.items() if isinstance(v, dict) and "captions_s" in v}
                                        | {k: cs.get(k) for k in ("vs_hf_b1", "lengths_ok", "error")},
                                        default=str)[:1500])
    if "grpo" in args.sections:
        if time.perf_counter() > deadline:
            res["grpo"] = {"skipped": "deadline"}
        else:
            res["grpo"] = {}
            # RePIC's trainer: the processor at Qwen2.5-VL's default pixel budget (images pre-resized)
            budget = dict(processor.image_processor.size)
            processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": args.grpo_max_pixels}
            restore = type(model).generate
            try:
                model = section_grpo(model, processor, args, peak, deadline, save, res["grpo"])
            except Exception as exc:  # noqa: BLE001
                res["grpo"].update(error=repr(exc)[:500], trace=traceback.format_exc()[-2500:])
            finally:
                processor.image_processor.size = budget
                type(model).generate = restore
        save()
        log("grpo " + json.dumps({k: v for k, v in res["grpo"].items() if k.startswith("tokens_s_vs")},
                                 default=str))
    res["wall_s"] = time.perf_counter() - t0
    save()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
