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
- `grpo`: TRL 1.16 `GRPOTrainer` steps at RePIC's training-sample shapes (bench/repic_shapes.py's four task types
  in turn: OCT yes/no with 2 images, VLT box with 1, ICT caption with 2, ICT multi caption with 3; images of
  1000-1600 px resized by repic.train.grpo.build_examples, processed at Qwen2.5-VL's default max_pixels; answers end
  at EOS at per-row preset lengths: yes/no 2-4, box 16-24, caption 60-150 tokens), LoRA r64/α128/dropout 0.05,
  G = `--grpo-generations`, β 0.04, loss grpo, bf16. The batch: `--grpo-per-device` completions a micro-step,
  `--grpo-grad-accum` micro-steps an optimizer step, `--grpo-grouping repic` (each group of G completions from G
  different samples, as RePIC's 8 processes drew them: a sequential sampler without repeats, emulated here) or
  `grpo` (G completions of one prompt, TRL's sampler). Paths (`--grpo-paths`): `hf` = TRL's default (its
  `model.generate` rollouts, gradient checkpointing), `ours` = `rollout_trainer(GRPOTrainer, "static")` as the
  pipeline trains today, and either with `+`-joined levers (repic.train.speed unless said): `nockpt` (no gradient
  checkpointing: GRPOConfig), `compile` (compile_layers), `vc` (compile_vision), `pp` (preprocess_once: on in the
  training stage, so `ours+pp` is the pipeline's path), `pr` (rollout prefill one prompt at a time, images once:
  rollout_trainer's prefill_rows / prefill_vision_once), `cd` (compiled decode step in the rollouts); `~N` trains
  that path with N completions a micro-step (the step's completions unchanged: more or fewer accumulation steps),
  `@S` runs S optimizer steps.
  Per step: wall time (synchronised), its split (rollout, reference forward, policy forward, backward, optimizer
  incl. gradient clipping, rewards, other = the rest: TRL's CPU-side image preprocessing and tokenising, batching,
  logging), tokens (every sequence's prompt, image tokens included, + completion: EasyR1's "tokens per second per
  GPU"), counted FLOPs by phase (below), peak memory. Summary over steps 2..N: tokens/s per GPU, the split, the
  training phase's TFLOP/s (reference + policy forward + backward FLOPs over their time) against the measured peak.
  `--grpo-profile PATH` adds one profiled step to that path (kernel time by class; not in its statistics).

FLOPs counted per forward from the real (unpadded) tokens: 2 × (decoder-layer parameters) per token, causal
attention 2·L²·hidden per layer per sequence, the LM head over completion tokens only (TRL's fused head scores
those), LoRA 2·r·(in + out) per adapted projection per token when the adapter is on, and the vision tower where it
runs (bench/repic_shapes.py's count). The backward of a policy forward counts its input gradients through the frozen
weights (= the forward's products), twice the attention, and LoRA's input and weight gradients; with gradient
checkpointing the recomputed forward is counted apart (`recompute`: executed, not useful).

    python bench/perf.py --out perf.json                                          # the device run: device_perf.sh
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
LEVERS = ("nockpt", "compile", "vc", "pp", "pr", "cd")
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
        self.visual_cfg = core.model.visual.config
        self.phase: str | None = None
        self.steps: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.time = dict.fromkeys(PHASES, 0.0)
        self.flops = dict.fromkeys(("rollout_vision", "reference_forward", "policy_forward", "backward",
                                    "recompute"), 0.0)
        self.tokens = 0
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def timing(self, phase: str):
        sync()
        t0 = time.perf_counter()
        outer, self.phase = self.phase, phase
        try:
            yield
        finally:
            sync()
            self.phase = outer
            if outer is None:  # nested phases (none expected) count once, in the outer one
                self.time[phase] += time.perf_counter() - t0

    def vision(self, grid: torch.Tensor) -> None:
        flops = shapes.vision_flops(grid.cpu(), self.visual_cfg)
        if self.phase == "rollout":
            self.flops["rollout_vision"] += flops
        elif self.phase in ("reference_forward", "policy_forward"):
            self.flops[self.phase] += flops

    def forward(self, attention_mask: torch.Tensor, logits_to_keep: int, adapter: bool, training: bool,
                checkpointing: bool) -> None:
        real = attention_mask.sum(1).double()
        completion = attention_mask[:, -logits_to_keep:].sum()
        tokens = float(real.sum())
        gemm = 2.0 * self.layer_params * tokens
        attn = float(2.0 * (real ** 2).sum() * self.cfg.hidden_size * self.cfg.num_hidden_layers)
        head = 2.0 * self.head_params * float(completion)
        lora = 2.0 * self.lora_r * self.lora_in_out * tokens if adapter else 0.0
        phase = "policy_forward" if training else "reference_forward"
        self.flops[phase] += gemm + attn + head + lora
        if training:
            self.tokens += int(tokens)
            self.flops["backward"] += gemm + head + 2 * attn + 2 * lora
            if checkpointing:
                self.flops["recompute"] += gemm + attn + lora

    def end_step(self, completion_mean: float | None) -> None:
        sync()
        wall = time.perf_counter() - self.t0
        other = wall - sum(self.time.values())
        self.steps.append({"wall_s": wall, "tokens": self.tokens, "tokens_s": self.tokens / wall,
                           "split_s": {**self.time, "other": other},
                           "tflop": {k: v / 1e12 for k, v in self.flops.items()},
                           "completion_mean_length": completion_mean})
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
                profile["prof"].__exit__(None, None, None)
                profile["rows"] = kernel_classes(profile.pop("prof"))
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


# ---------------------------------------------------------------------------------------------------------------
# GRPO: one path


def parse_path(spec: str, default_steps: int) -> tuple[str, set[str], int, int | None]:
    """`base+lever+...~N@S` -> (base, levers, steps S, completions per micro-step N or None: the run's)."""
    name, _, steps = spec.partition("@")
    name, _, micro = name.partition("~")
    base, *levers = name.split("+")
    unknown = [x for x in levers if x not in LEVERS]
    if base not in ("hf", "ours") or unknown or not (steps.isdigit() or not steps) \
            or not (micro.isdigit() or not micro):
        raise SystemExit(f"--grpo-paths: bad path {spec!r} (hf|ours, then +{'|+'.join(LEVERS)}, optional ~N "
                         "completions per micro-step, optional @steps)")
    if base == "hf" and {"pr", "cd"} & set(levers):
        raise SystemExit(f"--grpo-paths: {spec!r}: pr and cd are levers of the static rollouts (ours)")
    return base, set(levers), int(steps) if steps else default_steps, int(micro) if micro else None


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
    if peak and train_s:
        out["training_pct_of_peak_useful"] = 100 * useful * 1e12 / train_s / peak
        out["training_pct_of_peak_executed"] = 100 * executed * 1e12 / train_s / peak
    return out


def run_path(model: Any, processor: Any, dataset: Any, spec: str, args: Any, schedule: list[list[int]],
             peak: float, deadline: float) -> tuple[dict[str, Any], Any]:
    from peft import get_peft_model
    from trl import GRPOTrainer

    from repic.train.grpo import grpo_config, lora_config, reward_functions
    from repic.train.speed import fast_trainer, uncompile_language_layers, unmemoize_image_processor
    from repic.vlm.vision import disable_fast_vision, disable_image_feature_cache

    cuda = torch.cuda.is_available()
    base, levers, steps, micro = parse_path(spec, args.grpo_steps)
    profile = {"at": steps} if spec == args.grpo_profile else None  # one more step, profiled, not counted
    per_step = args.grpo_per_device * args.grpo_grad_accum  # completions an optimizer step, in one rollout call
    micro = micro or args.grpo_per_device
    if per_step % micro:
        raise ValueError(f"{spec}: {micro} completions a micro-step do not divide {per_step} a step")
    grpo = dict(num_generations=args.grpo_generations, per_device_train_batch_size=micro,
                gradient_accumulation_steps=per_step // micro, max_completion_length=args.grpo_max_new,
                temperature=1.0, beta=0.04, loss_type="grpo", scale_rewards="group", learning_rate=1e-5,
                bf16=cuda, gradient_checkpointing=cuda and "nockpt" not in levers,
                max_steps=steps + (1 if profile else 0), logging_steps=1, seed=0, shuffle_dataset=False)
    targs = grpo_config(grpo, tempfile.mkdtemp(), use_cpu=not cuda)
    cls = GRPOTrainer if base == "hf" else gen.rollout_trainer(GRPOTrainer, "static")
    if base == "ours":
        cls = type("Levers" + cls.__name__, (cls,), {"decode_compile": "cd" in levers,
                                                      "prefill_rows": "pr" in levers,
                                                      "prefill_vision_once": "pr" in levers})
    cls = fast_trainer(grouped(cls, args.grpo_grouping),
                       compile_layers="compile" in levers, compile_vision="vc" in levers,
                       preprocess_once="pp" in levers)
    torch.manual_seed(0)
    peft_model = get_peft_model(model.train(), lora_config({"r": 64, "lora_alpha": 128, "lora_dropout": 0.05}))
    meter = Meter(peft_model, 64)
    visual = peft_model.get_base_model().model.visual
    hook = visual.register_forward_pre_hook(lambda m, a, k: meter.vision(k.get("grid_thw", a[1] if len(a) > 1
                                                                              else None)), with_kwargs=True)
    shapes.Lengths.schedule = [list(x) for x in schedule]
    out: dict[str, Any] = {"path": spec, "levers": sorted(levers), "per_device_train_batch_size": micro,
                           "gradient_accumulation_steps": per_step // micro,
                           "gradient_checkpointing": grpo["gradient_checkpointing"]}
    trainer = None
    genbench.peak_reset()
    start = time.perf_counter()
    try:
        trainer = timed_trainer(cls, meter)(
            model=peft_model, args=targs, train_dataset=dataset, processing_class=processor,
            reward_funcs=reward_functions(["object_consistency", "visual_localization", "identity_consistency"],
                                          "repic"),
            callbacks=step_callbacks(meter, deadline, 2, profile))
        trainer.train()
        logs = [r for r in trainer.state.log_history if "completions/mean_length" in r]
        for step, rec in zip(meter.steps, logs):
            step["completion_mean_length"] = rec["completions/mean_length"]
        out.update(steps=meter.steps, summary=summarize(meter.steps, peak), peak_gib=genbench.peak_gib(),
                   wall_s=time.perf_counter() - start)
        if profile is not None and "rows" in profile:
            out["profile_last_step"] = profile["rows"]
        cache = getattr(trainer, "image_feature_cache", None)
        if cache is not None:
            out["images_requested_vs_encoded"] = [cache.requested_images, cache.tower_images]
    except Exception as exc:  # noqa: BLE001 - reported, the other paths still run
        out.update(error=repr(exc)[:500], trace=traceback.format_exc()[-2500:], steps=meter.steps,
                   summary=summarize(meter.steps, peak))
    hook.remove()
    trainer = None
    disable_fast_vision(peft_model)
    disable_image_feature_cache(peft_model)
    uncompile_language_layers(peft_model)
    unmemoize_image_processor(processor.image_processor)
    model = peft_model.unload()
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
    dataset = Dataset.from_list(build_examples(samples, work, seed=0))
    rng = np.random.RandomState(11)
    schedule = [[min(int(rng.randint(*shapes.GRPO_LENGTHS[samples[i]["accu_reward_method"]])), args.grpo_max_new)
                 for i in call] for call in calls]
    results.update(grouping=args.grpo_grouping, generations=G, per_device_completions=per_device,
                   grad_accum=accum, completions_per_step=rows_per_call,
                   prompts_per_step=rows_per_call // G if args.grpo_grouping == "grpo" else rows_per_call,
                   samples=n_samples, build_examples_s=time.perf_counter() - t0,
                   tasks_per_call=[[samples[i]["accu_reward_method"] for i in c] for c in calls],
                   lengths_per_call=schedule, processor_size=dict(processor.image_processor.size), paths={})
    shapes.patch_hf_generate(type(gen._core(model)))
    for spec in args.grpo_paths:
        if time.perf_counter() > deadline:
            results["paths"][spec] = {"skipped": "deadline"}
            continue
        results["paths"][spec], model = run_path(model, processor, dataset, spec, args, schedule, peak, deadline)
        save()
        s = results["paths"][spec].get("summary") or {}
        print(f"[grpo] {spec}: tokens/s/GPU {s.get('tokens_s_per_gpu')}, step {s.get('step_s_median')}, "
              f"training TFLOP/s {s.get('training_tflops_useful')}, "
              f"error {results['paths'][spec].get('error')}", flush=True)
    ok = {p: r["summary"]["tokens_s_per_gpu"] for p, r in results["paths"].items()
          if (r.get("summary") or {}).get("tokens_s_per_gpu")}
    for ref in ("hf", "ours"):
        base = next((v for p, v in ok.items() if parse_path(p, 1)[:2] == (ref, set()) and parse_path(p, 1)[3]
                     is None), None)
        if base:
            results[f"tokens_s_vs_{ref}"] = {p: v / base for p, v in ok.items()}
    return model


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(genbench.SHAPES), default="7b")
    ap.add_argument("--image-px", type=int, default=shapes.CAPTION_PX, help="captioning max_pixels = this²")
    ap.add_argument("--sections", nargs="+", default=["peak", "caption", "grpo"], choices=["peak", "caption", "grpo"])
    ap.add_argument("--caption-plan", nargs="*", default=["4:32:ours_cdmr,ours_cdmrv,hf_b1"],
                    help="captioning cells as k:batch:path,path,... (bench/repic_shapes.py's paths)")
    ap.add_argument("--b1-captions", type=int, default=2, help="captions timed in RePIC's batch-1 loop")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="captioning")
    ap.add_argument("--grpo-paths", nargs="+", default=["ours+pp", "ours", "hf@2", "ours+pp+vc",
                                                        "ours+pp+nockpt", "ours+pp+compile"])
    ap.add_argument("--grpo-steps", type=int, default=3, help="optimizer steps per path (the first is warm-up)")
    ap.add_argument("--grpo-per-device", type=int, default=8, help="completions per micro-step "
                    "(per_device_train_batch_size)")
    ap.add_argument("--grpo-grad-accum", type=int, default=2, help="gradient_accumulation_steps")
    ap.add_argument("--grpo-generations", type=int, default=8, help="G (num_generations)")
    ap.add_argument("--grpo-grouping", choices=["repic", "grpo"], default="repic")
    ap.add_argument("--grpo-max-new", type=int, default=256)
    ap.add_argument("--grpo-profile", default=None, help="a path of --grpo-paths to profile one extra step of")
    ap.add_argument("--grpo-max-pixels", type=int, default=12845056, help="the processor's (Qwen2.5-VL's default)")
    ap.add_argument("--grpo-image-scale", type=float, default=1.0, help="original image sizes x this (CPU only)")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="no new section, path or step after this")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    for p in args.grpo_paths:
        parse_path(p, 1)
    if args.grpo_profile and args.grpo_profile not in args.grpo_paths:
        raise SystemExit(f"--grpo-profile {args.grpo_profile!r} is not one of --grpo-paths")

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
