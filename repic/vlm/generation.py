"""Generation backends for captioning and GRPO rollouts: HF `generate` (the reference) and a static fast path.

`hf`: `model.generate` on left-padded batches; the reference, and what RePIC's original code does.

`static`: the prefill is the model's own forward (vision tower, 3-D mrope positions from its `get_rope_index`), each
prompt prefilled once however many samples it gets (with `prefill_rows`, on by default on CUDA, a padded batch one
prompt at a time without its padding, so attention needs no mask); decoding then runs a hand-written step over a
preallocated KV cache (`_Decoder`). Every tensor that step touches lives at a fixed address and the step holds no
host synchronisation (stop flags, the next position and the output column all advance on the device), so on CUDA one
decode step of the whole language model, logits processors and sampling included, is captured once as a CUDA graph
and replayed per token; the host looks at the stop flags every `SYNC_EVERY` steps. On CPU the same step runs
eagerly. The step calls the model's own modules (norms, projections, MLPs, rotary embedding), so PEFT LoRA layers
apply as in `generate`; attention over the cache is scaled-dot-product attention with the query heads of one
key/value head stacked, as transformers' sdpa path decodes. With `decode_compile` the parts of each layer around the
attention (norm, q/k/v projections, rotary; output projection, residuals, norm, MLP) run instead as two
`torch.compile` functions of plain tensors (one graph for all layers), compiled before the CUDA graph is captured,
so the graph replays inductor's fused kernels; `decode_attention="matmul"` attends with transformers' eager formula
(two batched matrix products around a masked fp32 softmax) instead of sdpa. Defaults: `_decode_options`. Greedy
output equals `generate`'s token for token in fp32 (tests/test_generation.py); `bench/generation.py` measures
agreement in bf16 on a GPU.

`rollout_trainer(GRPOTrainer)` routes TRL's default rollouts (no vLLM, no continuous batching, no tools)
through the static backend: the G samples of a prompt share one prefill. Both the static prefill and the
trainer's forwards run the vision tower through repic.vlm.vision (windows bucketed by length).
"""

from __future__ import annotations

import contextlib
import copy
import time
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from repic.core.io import RepicError

BACKENDS = ("hf", "static")
SYNC_EVERY = 16  # decode steps between two host checks of "every row has stopped"
DECODE_ATTENTION = ("sdpa", "matmul")
CACHE_ALIGN = 64  # KV cache length rounded up to this: fewer distinct graphs, aligned attention masks

# Generation options the static backend implements; any other option set away from its default is refused
# rather than silently ignored (use backend "hf" for those).
_REFUSED = {
    "num_beams": (None, 1), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "min_new_tokens": (None, 0), "min_length": (None, 0), "sequence_bias": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "begin_suppress_tokens": (None,), "exponential_decay_length_penalty": (None,),
    "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "min_p": (None,),
    "encoder_repetition_penalty": (None, 1.0), "guidance_scale": (None, 1.0), "watermarking_config": (None,),
    "stop_strings": (None,), "num_return_sequences": (None, 1),
}


# ----------------------------------------------------------------------------------------------------------------
# public API


@torch.inference_mode()
def generate(model: Any, processor: Any, texts: Sequence[str], images: Sequence[Sequence[Any]], *,
             backend: str = "hf", max_new_tokens: int, batch_size: int, hit_limit: list[bool] | None = None,
             on_batch: Any = None, features_once: bool | None = None, **generation_kwargs: Any) -> list[str]:
    """Greedy completions of chat-templated `texts` (each with its list of PIL `images`), in input order.

    Batches hold prompts of similar size (sorted by image area + text length), left padded; each batch's images
    are preprocessed once. `generation_kwargs` go to `generate` (hf) or are honoured alike (static), e.g.
    `repetition_penalty`; the model's `generation_config` supplies the rest, as in `generate`. `hit_limit`, when
    given, receives per text whether it stopped at `max_new_tokens` without an EOS (a cut-off caption);
    `on_batch(n)`, when given, is called after each batch of `n` texts (progress). `features_once`: the vision
    tower encodes each distinct image once over all batches (`repic.vlm.vision.image_features_once`; a database's
    reference images recur across conversations); default on for the static backend on CUDA. The hf backend is
    RePIC's path (every image encoded in every conversation): refused there.
    """
    check_backend(backend)
    sizes = [sum(img.width * img.height for img in imgs) + len(t) for t, imgs in zip(texts, images)]
    order = sorted(range(len(texts)), key=lambda i: sizes[i])
    device = next(model.parameters()).device
    if features_once is None:
        features_once = backend == "static" and device.type == "cuda"
    if features_once and backend != "static":
        raise RepicError(f"features_once needs backend 'static', not {backend!r} (hf is RePIC's own path)")
    with contextlib.ExitStack() as stack:
        if features_once and images:
            from repic.vlm.vision import image_features_once

            stack.enter_context(image_features_once(model))
        return _generate_batches(model, processor, texts, images, order, device, backend=backend,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, hit_limit=hit_limit,
                                 on_batch=on_batch, generation_kwargs=generation_kwargs)


def _generate_batches(model: Any, processor: Any, texts: Sequence[str], images: Sequence[Sequence[Any]],
                      order: list[int], device: torch.device, *, backend: str, max_new_tokens: int, batch_size: int,
                      hit_limit: list[bool] | None, on_batch: Any, generation_kwargs: dict[str, Any]) -> list[str]:
    pad = processor.tokenizer.pad_token_id
    out: list[str] = [""] * len(texts)
    cut = [False] * len(texts)
    decoders: dict = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        inputs = processor(text=[texts[i] for i in idx], images=[images[i] for i in idx] if images else None,
                           return_tensors="pt", padding=True, padding_side="left").to(device)
        ids = generate_ids(model, inputs, backend=backend, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=pad, _decoders=decoders, **generation_kwargs)
        for i, text in zip(idx, processor.batch_decode(ids, skip_special_tokens=True)):
            out[i] = text.strip()
        if hit_limit is not None:
            eos = set(_eos_ids(_generation_config(model, max_new_tokens, generation_kwargs)))
            for i, row in zip(idx, ids):
                cut[i] = len(row) >= max_new_tokens and (not row or row[-1] not in eos)
        if on_batch is not None:
            on_batch(len(idx))
    if hit_limit is not None:
        hit_limit[:] = cut
    return out


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise RepicError(f"generation backend: expected one of {'|'.join(BACKENDS)}, got {backend!r}")
    return backend


@torch.inference_mode()
def generate_ids(model: Any, inputs: Mapping[str, torch.Tensor], *, backend: str, max_new_tokens: int,
                 repeats: int = 1, stats: dict[str, float] | None = None, _decoders: dict | None = None,
                 decode_compile: bool | None = None, decode_attention: str | None = None,
                 prefill_rows: bool | None = None, prefill_vision_once: bool = False,
                 prefill_prefix: bool | None = None, keep_mode: bool = False, prefill_autocast: bool = False,
                 prefill_packed: bool = False, **generation_kwargs: Any) -> list[list[int]]:
    """New token ids for each prompt row of `inputs` (a left-padded processor batch on the model's device).

    Row `i * repeats + j` of the result is sample `j` of prompt `i`; each row ends at its first EOS (kept).
    `generation_kwargs`: `generate`'s own (`do_sample`, `temperature`, `top_k`, `eos_token_id`, `pad_token_id`,
    `repetition_penalty`, `suppress_tokens`, ...). `stats`, when given, receives timings of the static path
    (`prefill`: its mode, `prefill_s`, `decode_s`, `decode_steps`, `capture_s`, `graph`: whether the step ran as a
    CUDA graph, `compiled`: whether it ran inductor's kernels). `decode_compile`, `decode_attention`: the static
    decode step's options (module docstring); None takes `_decode_options`' defaults. `prefill_rows`: prefill a padded
    batch one prompt at a time, unpadded (`_prefill`); None: on CUDA (as measured for captioning), off elsewhere.
    `prefill_vision_once`: with `prefill_rows`, the images of the whole batch go through the vision tower in one call
    and each prompt's forward takes its features (transformers' `mm_encoder_outputs`) instead of encoding its own.
    `prefill_prefix`: with `prefill_rows`, prompts that begin alike share the prefill of their common beginning
    (`_prefill_shared_prefixes`); None: on CUDA (BENCHMARKS.md: +16 % captions/s over RePIC's 4-concept evaluation
    at B = 16 on an H200), off elsewhere. Not with `prefill_vision_once`.
    `keep_mode`: the static path runs the model in its current mode (training: LoRA dropout active, as TRL's `hf`
    rollouts and RePIC's) instead of eval mode.
    `prefill_autocast`: the static path's prefill runs under autocast to the language model's dtype (bf16), so a
    PEFT LoRA layer's adapter products (fp32 adapters, PEFT's default) are computed in that dtype, as the decode
    step computes them (its low-rank copies in the model's dtype) and as RePIC's all-bf16 model (DeepSpeed bf16)
    does; without it the prefill multiplies and adds in fp32. Nothing changes for a model in fp32.
    `prefill_packed`: a padded batch prefilled in one forward of its prompts' real tokens packed into one row, each
    attending to its own (the model prepared by repic.train.speed's `enable_packing`); not with
    `prefill_vision_once` or `prefill_prefix`.
    """
    check_backend(backend)
    cfg = _generation_config(model, max_new_tokens, generation_kwargs)
    eos = _eos_ids(cfg)
    if backend == "hf":
        if repeats > 1:
            inputs = select_rows(inputs, [i for i in range(len(inputs["input_ids"])) for _ in range(repeats)],
                                 _core(model).config)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **generation_kwargs)
        rows = out[:, inputs["input_ids"].shape[1]:].tolist()
    else:
        _check_static_supported(cfg)
        device = inputs["input_ids"].device
        options = _decode_options(device, decode_compile, decode_attention)
        by_rows = device.type == "cuda" if prefill_rows is None else prefill_rows
        if prefill_prefix and prefill_vision_once:
            raise RepicError("generation: prefill_prefix and prefill_vision_once exclude each other")
        if prefill_packed and (prefill_vision_once or prefill_prefix):
            raise RepicError("generation: prefill_packed excludes prefill_vision_once and prefill_prefix")
        prefix = (device.type == "cuda" and not prefill_vision_once) if prefill_prefix is None else prefill_prefix
        prefill = ("rows_vision_once" if prefill_vision_once else "rows_prefix" if prefix else "rows") \
            if by_rows else "batch"
        prefill = "packed" if prefill_packed else prefill
        rows = _static_generate(model, inputs, cfg, eos, repeats, stats,
                                _decoders if _decoders is not None else {}, options, prefill, keep_mode,
                                prefill_autocast).tolist()
    return [_cut_at_eos(r, eos) for r in rows]


def select_rows(inputs: Mapping[str, torch.Tensor], rows: Sequence[int], config: Any) -> dict[str, torch.Tensor]:
    """The processor batch restricted (or expanded) to prompt `rows`, images included; all-padding columns go.

    Images are matched to prompts in order, by the number of `<|vision_start|>` tokens each prompt holds.
    """
    if inputs.get("pixel_values_videos") is not None:
        raise RepicError("generation: video inputs are not supported")
    ids = inputs["input_ids"]
    index = torch.as_tensor(list(rows), device=ids.device)
    out = {k: v.index_select(0, index) for k, v in inputs.items()
           if k not in ("pixel_values", "image_grid_thw") and torch.is_tensor(v) and v.shape[:1] == ids.shape[:1]}
    if inputs.get("image_grid_thw") is not None:
        grid, pixels = inputs["image_grid_thw"], inputs["pixel_values"]
        first_image = _first_images(inputs, config)
        patches = grid.prod(-1).tolist()
        first_patch = [0]
        for p in patches:
            first_patch.append(first_patch[-1] + p)
        images = [j for r in rows for j in range(first_image[r], first_image[r + 1])]
        out["image_grid_thw"] = grid[images]
        out["pixel_values"] = torch.cat([pixels[first_patch[j]:first_patch[j + 1]] for j in images])
    keep = int(out["attention_mask"].any(0).long().argmax())  # first column holding a real token
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
        if k in out:
            out[k] = out[k][:, keep:]
    return out


def rollout_trainer(trainer_cls: type, backend: str = "static") -> type:
    """A subclass of TRL's `GRPOTrainer` (pass the class) whose default rollouts go through `backend`.

    Only TRL's plain `transformers.generate` path is replaced; vLLM, continuous batching, tool calls and
    sampling options the static backend does not implement (top_p < 1, min_p) keep TRL's own path. The G
    consecutive copies of a prompt (TRL's RepeatSampler) are prefilled once. Unlike TRL's path, rollouts run
    with the model in eval mode (no LoRA dropout while sampling) unless the class sets `rollout_keep_mode`
    (repic.train.grpo.rollout_mode: the model's training mode, LoRA dropout active, as TRL's path and RePIC's).
    """
    check_backend(backend)
    if backend == "hf":
        return trainer_cls

    class StaticRolloutGRPOTrainer(trainer_cls):
        rollout_backend = backend
        # the decode step eager or compiled (LoRA dropout included); the training stage compiles it on CUDA
        # (repic.train.grpo: +9.7-12.7 % tokens/s on an H100, BENCHMARKS.md, issue 28, call 24)
        decode_compile = False
        # the rollout prefill: a padded batch of distinct prompts at once, or one prompt at a time with the batch's
        # images encoded once (`generate_ids`' prefill_rows / prefill_vision_once; the stage's on CUDA, call 25)
        prefill_rows = False
        prefill_vision_once = False
        # the prefill under autocast to the model's dtype: LoRA's products in bf16, as the decode step's (generate_ids)
        prefill_autocast = False
        # the prefill as one forward of the prompts packed into one row (`generate_ids`' prefill_packed; the model
        # prepared by repic.train.speed's enable_packing); instead of prefill_rows / prefill_vision_once
        prefill_packed = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            from repic.vlm.vision import enable_fast_vision, enable_image_feature_cache

            # the frozen vision tower runs in every rollout prefill, policy forward and reference forward:
            # bucketed windows, and each distinct image encoded once per step (not once per completion and pass)
            enable_fast_vision(self.model)
            self.image_feature_cache = enable_image_feature_cache(self.model)
            self.rollout_stats: dict[str, Any] = {}  # the last static rollout's (generate_ids' `stats`)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            if (self.use_vllm or self.use_transformers_continuous_batching or self.tools or has_tool_images
                    or (self.top_p is not None and self.top_p < 1.0) or self.min_p is not None):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            from trl.models import unwrap_model_for_generation

            inputs = _pad_prompts(prompt_ids, multimodal_fields, self._tokenizer.pad_token_id,
                                  self.accelerator.device)
            with unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped:
                config = _core(unwrapped).config
                repeats = num_generations if _repeated_groups(inputs, prompt_ids, num_generations, config) else 1
                if repeats > 1:
                    inputs = select_rows(inputs, range(0, len(prompt_ids), repeats), config)
                completion_ids = generate_ids(
                    unwrapped, inputs, backend=backend, max_new_tokens=self.max_completion_length,
                    repeats=repeats, do_sample=True, temperature=self.temperature, top_k=self.top_k,
                    repetition_penalty=self.repetition_penalty, eos_token_id=list(self.eos_token_ids),
                    pad_token_id=self._tokenizer.pad_token_id,
                    suppress_tokens=[config.image_token_id] if self._is_vlm else None,
                    decode_compile=self.decode_compile, prefill_rows=self.prefill_rows,
                    prefill_vision_once=self.prefill_vision_once and not self.prefill_packed, prefill_prefix=False,
                    prefill_packed=self.prefill_packed,
                    keep_mode=getattr(self, "rollout_keep_mode", False), prefill_autocast=self.prefill_autocast,
                    stats=self.rollout_stats,
                )
            return completion_ids, None

    StaticRolloutGRPOTrainer.__name__ = f"Static{trainer_cls.__name__}"
    return StaticRolloutGRPOTrainer


# ----------------------------------------------------------------------------------------------------------------
# generation config


def _generation_config(model: Any, max_new_tokens: int, kwargs: Mapping[str, Any]) -> Any:
    """The effective config, as `generate` resolves it: the model's, updated by kwargs, global defaults last."""
    cfg = copy.deepcopy(model.generation_config)
    cfg.update(**{k: v for k, v in kwargs.items() if v is not None})
    cfg.max_new_tokens = max_new_tokens
    for key, value in cfg._get_default_generation_params().items():
        if getattr(cfg, key, None) is None:
            setattr(cfg, key, value)
    return cfg


def _eos_ids(cfg: Any) -> list[int]:
    eos = cfg.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _check_static_supported(cfg: Any) -> None:
    for key, allowed in _REFUSED.items():
        if getattr(cfg, key, None) not in allowed:
            raise RepicError(f"generation backend 'static' does not implement {key}={getattr(cfg, key)!r}; "
                             "use backend 'hf'")
    if cfg.do_sample and cfg.top_p not in (None, 1.0):
        raise RepicError(f"generation backend 'static' does not implement top_p={cfg.top_p!r}; use backend 'hf'")


def _cut_at_eos(row: list[int], eos: Sequence[int]) -> list[int]:
    for i, tok in enumerate(row):
        if tok in eos:
            return row[:i + 1]
    return row


# ----------------------------------------------------------------------------------------------------------------
# static backend


def _core(model: Any) -> Any:
    """The Qwen2.5-VL `...ForConditionalGeneration` under PEFT / accelerate wrappers (LoRA layers stay in it)."""
    while hasattr(model, "get_base_model") or hasattr(model, "module"):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model.module
    return model


def _decode_options(device: torch.device, compile: bool | None, attention: str | None) -> tuple[bool, str]:
    """(compile, attention) of the static decode step. Defaults, as measured on an H200 (BENCHMARKS.md, issue 12):
    compiled on CUDA (8.0 -> 5.9 ms a step at B = 32, 1-image prompts; 11.1 -> 8.6 ms at RePIC's 4-reference
    captioning shape), eager elsewhere (a CPU build may lack a compiler, and CPU decoding is tests and rehearsals);
    attention "matmul" when compiled (faster than sdpa's masked kernel at every measured shape, most at B = 1),
    "sdpa" when eager (equal to `generate` bit for bit on CPU)."""
    compile = device.type == "cuda" if compile is None else bool(compile)
    attention = attention or ("matmul" if compile else "sdpa")
    if attention not in DECODE_ATTENTION:
        raise RepicError(f"decode_attention: expected one of {'|'.join(DECODE_ATTENTION)}, got {attention!r}")
    return compile, attention


def _static_generate(model: Any, inputs: Mapping[str, torch.Tensor], cfg: Any, eos: list[int], repeats: int,
                     stats: dict[str, float] | None, decoders: dict, options: tuple[bool, str] = (False, "sdpa"),
                     prefill: str = "batch", keep_mode: bool = False, prefill_autocast: bool = False
                     ) -> torch.Tensor:
    core = _core(model)
    modes = {m: m.training for m in core.modules()}
    if not keep_mode:
        core.eval()
    try:
        return _static_generate_eval(core, inputs, cfg, eos, repeats, stats, decoders, options, prefill,
                                     prefill_autocast)
    finally:
        for m, training in modes.items():
            m.training = training


def _prompt_positions(core: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """3-D mrope position ids of the prompt, [3, B, S], exactly as `generate` computes them."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if inputs.get("image_grid_thw") is not None and inputs.get("mm_token_type_ids") is not None:
        pos, _ = core.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                           image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
        return pos
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return text[None].expand(3, -1, -1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(core: Any, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor, mode: str = "batch"
             ) -> tuple[Any, torch.Tensor]:
    """The prompt's KV cache (`.layers[i].keys/.values`, [B, kv heads, width, d], left padded) and last logits.

    `mode` "rows" and a padded batch: one forward per prompt without its padding, so the language model's attention
    is causal with no mask (flash); in a padded batch sdpa gets a padding mask and a slower masked kernel
    (BENCHMARKS.md: 16 % more captions/s at 4 references, B = 32, on an H200; 1.5 % fewer at 1 reference). The
    pad slots stay zero; the decode mask never attends them. "rows_vision_once": the same, with every image of the
    batch encoded in one tower call first (each prompt's forward takes its images' features), as the batched
    prefill encodes them; "rows_prefix": one prompt at a time, each starting from the cache of the prompt before it
    where they begin alike (`_prefill_shared_prefixes`); "batch": one forward of the padded batch; "packed": one
    forward of the prompts' real tokens packed into one row, each attending causally to its own (repic.train.speed's
    `_packing_forward`: the images encoded and merged, and the positions computed, on the padded batch first)."""
    mask = inputs["attention_mask"]
    if mode == "batch" or len(mask) == 1 or (bool(mask.all()) and mode != "rows_prefix"):
        out = core(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
        return out.cache, out.logits[:, -1]
    if mode == "packed":  # the language model's `packing` attribute: repic.train.speed's enable_packing sets it
        lm = core.model.language_model
        if "packing" not in vars(lm):
            raise RepicError("generation: prefill_packed needs a model prepared by repic.train.speed.enable_packing")
        outer, lm.packing = lm.packing, "prefill"  # its forward packs a cache-starting forward too
        try:
            out = core(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
        finally:
            lm.packing = outer
        return out.cache, out.logits[:, -1]
    if mode == "rows_prefix":
        return _prefill_shared_prefixes(core, inputs, positions)
    features, first_image = None, None
    if mode == "rows_vision_once" and inputs.get("image_grid_thw") is not None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        features = core.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        first_image = _first_images(inputs, core.config)
    n, width = mask.shape
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    logits = []
    for b in range(n):
        if features is None:
            row = select_rows(inputs, [b], core.config)  # without its all-padding columns
            encoded = {}
        else:
            row = select_rows({k: v for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}, [b],
                              core.config)
            row["image_grid_thw"] = inputs["image_grid_thw"][first_image[b]:first_image[b + 1]]
            encoded = {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(
                pooler_output=features[first_image[b]:first_image[b + 1]])}}
        start = width - row["input_ids"].shape[1]
        out = core(**row, position_ids=positions[:, b:b + 1, start:], use_cache=True, logits_to_keep=1, **encoded)
        _store_row(keys, values, out.cache, b, n, width, start)
        logits.append(out.logits[0, -1])
        del out
    cache = types.SimpleNamespace(layers=[types.SimpleNamespace(keys=k, values=v) for k, v in zip(keys, values)])
    return cache, torch.stack(logits)


def _store_row(keys: list[torch.Tensor], values: list[torch.Tensor], cache: Any, b: int, n: int, width: int,
               start: int) -> None:
    """Row `b`'s cache (one unpadded prompt) into the left-padded batch cache [n, kv heads, width, d] per layer,
    from column `start`; the batch tensors are made at the first row stored."""
    for i, layer in enumerate(cache.layers):
        if len(keys) <= i:
            keys.append(layer.keys.new_zeros(n, layer.keys.shape[1], width, layer.keys.shape[3]))
            values.append(layer.values.new_zeros(n, layer.values.shape[1], width, layer.values.shape[3]))
        keys[i][b, :, start:] = layer.keys[0]
        values[i][b, :, start:] = layer.values[0]


def _image_identities(inputs: Mapping[str, torch.Tensor]) -> list[int]:
    """For each image of the batch, a number shared by the images with equal grid and pixels (`image_keys`'
    checksums, equality then confirmed exactly)."""
    from repic.vlm.vision import image_keys

    if inputs.get("image_grid_thw") is None:
        return []
    seen: dict[tuple, list[tuple[torch.Tensor, int]]] = {}
    out = []
    for c, k in zip(*image_keys(inputs["pixel_values"], inputs["image_grid_thw"])):
        same = seen.setdefault(k, [])
        uid = next((u for other, u in same if torch.equal(other, c)), None)
        if uid is None:
            uid = sum(map(len, seen.values()))
            same.append((c, uid))
        out.append(uid)
    return out


def _prompt_units(inputs: Mapping[str, torch.Tensor], config: Any) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt as units, a text token (its id) or a whole image (-1 - its identity), and the token offset of
    each unit in the unpadded prompt (plus its length)."""
    mask = inputs["attention_mask"]
    first_image = _first_images(inputs, config)
    uids = _image_identities(inputs)
    starts = (mask.shape[1] - mask.sum(1)).tolist()
    units, offsets = [], []
    for b, start in enumerate(starts):
        row = inputs["input_ids"][b, start:].tolist()
        image, u, at = first_image[b], [], []
        for i, t in enumerate(row):
            if t == config.image_token_id:
                if i and row[i - 1] == config.image_token_id:
                    continue
                u.append(-1 - uids[image])
                image += 1
            else:
                u.append(t)
            at.append(i)
        at.append(len(row))
        units.append(u)
        offsets.append(at)
    return units, offsets


def _prefill_shared_prefixes(core: Any, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor
                             ) -> tuple[Any, torch.Tensor]:
    """`_prefill`'s "rows" with shared prefixes computed once. RePIC's conversations start alike (its system prompt,
    then the references in database order: prompts of one photo often share their first references). The prompts
    are prefilled in lexicographic order of their units (`_prompt_units`), each from the cache of the one before it
    over their common units (an image is shared whole or not at all; the last token is always computed, for its
    logits): the language model runs only the prompt's own suffix, attending the copied prefix (transformers'
    chunked prefill: a cache and the suffix's positions), and the tower encodes only the suffix's images. Keys and
    values are causal, so the copied prefix equals the prompt's own (tests: within fp32 rounding)."""
    from transformers import DynamicCache

    config = core.config
    mask = inputs["attention_mask"]
    n, width = mask.shape
    starts = (width - mask.sum(1)).tolist()
    units, offsets = _prompt_units(inputs, config)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    logits: list[torch.Tensor] = [mask.new_zeros(())] * n
    previous = None
    for b in sorted(range(n), key=lambda r: units[r]):
        shared = 0
        if previous is not None:
            for x, y in zip(units[b], units[previous]):
                if x != y:
                    break
                shared += 1
            shared = min(shared, len(units[b]) - 1)
        cut, start = offsets[b][shared], starts[b]
        row = select_rows(inputs, [b], config)  # without its all-padding columns
        past = {}
        if cut:
            s = starts[previous]
            past["past_key_values"] = DynamicCache(ddp_cache_data=[
                (k[previous:previous + 1, :, s:s + cut], v[previous:previous + 1, :, s:s + cut])
                for k, v in zip(keys, values)])
            for k in ("input_ids", "mm_token_type_ids", "token_type_ids"):  # the mask stays whole: prefix + suffix
                if k in row:
                    row[k] = row[k][:, cut:]
            if "image_grid_thw" in row:  # the suffix's images: the row's after those of the shared prefix
                grid, skip = row.pop("image_grid_thw"), sum(1 for x in units[b][:shared] if x < 0)
                pixels = row.pop("pixel_values")
                if skip < len(grid):
                    row["image_grid_thw"] = grid[skip:]
                    row["pixel_values"] = pixels[int(grid[:skip].prod(-1).sum()):]
        out = core(**row, position_ids=positions[:, b:b + 1, start + cut:], use_cache=True, logits_to_keep=1, **past)
        _store_row(keys, values, out.cache, b, n, width, start)
        logits[b] = out.logits[0, -1]
        previous = b
        del out, past
    cache = types.SimpleNamespace(layers=[types.SimpleNamespace(keys=k, values=v) for k, v in zip(keys, values)])
    return cache, torch.stack(logits)


def _first_images(inputs: Mapping[str, torch.Tensor], config: Any) -> list[int]:
    """Index of each prompt's first image in the batch's images (and one past the last), as `select_rows` matches
    images to prompts: in order, by the `<|vision_start|>` tokens each prompt holds."""
    counts = ((inputs["input_ids"] == config.vision_start_token_id) & inputs["attention_mask"].bool()).sum(1).tolist()
    first = [0]
    for c in counts:
        first.append(first[-1] + c)
    return first


def _static_generate_eval(core: Any, inputs: Mapping[str, torch.Tensor], cfg: Any, eos: list[int], repeats: int,
                          stats: dict[str, float] | None, decoders: dict, options: tuple[bool, str],
                          prefill: str = "batch", prefill_autocast: bool = False) -> torch.Tensor:
    device = inputs["input_ids"].device
    max_new = int(cfg.max_new_tokens)
    _sync(device)
    t0 = time.perf_counter()
    # --- prefill: the model's own forward, once per distinct prompt
    positions = _prompt_positions(core, inputs)
    from repic.vlm.vision import fast_vision, fast_vision_enabled

    # windows bucketed by length (one attention call per window length and layer); for captioning on CUDA the
    # blocks around the attention compiled too (BENCHMARKS.md: the tower at 362-372 TFLOP/s on an H200, 181
    # eager). A tower set up by the GRPO trainer keeps its own setting (eager: a few images per step).
    compile_vision = None if fast_vision_enabled(core) else device.type == "cuda"
    dtype = core.model.language_model.embed_tokens.weight.dtype
    amp = torch.autocast(device.type, dtype=dtype) if prefill_autocast and dtype != torch.float32 \
        else contextlib.nullcontext()
    with fast_vision(core, compile=compile_vision), amp:
        cache, logits = _prefill(core, inputs, positions, prefill)
    _sync(device)
    n_prompts, prompt_len = inputs["input_ids"].shape
    batch = n_prompts * repeats
    rows = torch.arange(n_prompts, device=device).repeat_interleave(repeats)
    cache_len = -(-(prompt_len + max_new) // CACHE_ALIGN) * CACHE_ALIGN
    key = (batch, cache_len, cfg.do_sample, float(cfg.temperature or 1.0), int(cfg.top_k or 0),
           float(cfg.repetition_penalty or 1.0), tuple(eos), tuple(cfg.suppress_tokens or ()), max_new, options,
           core.training)
    t1 = time.perf_counter()
    decoder = decoders.get(key)
    if decoder is None:
        decoder = decoders[key] = _Decoder(core, batch, cache_len, max_new, cfg, eos, device, *options)
    t2 = time.perf_counter()
    decoder.load(cache, logits.float(), inputs, positions, rows)
    del cache, logits
    steps = decoder.run()
    _sync(device)
    t3 = time.perf_counter()
    if stats is not None:
        stats.update(prefill=prefill, prefill_s=t1 - t0, capture_s=t2 - t1, decode_s=t3 - t2, decode_steps=steps,
                     graph=decoder.graph is not None, capture_error=decoder.capture_error,
                     compiled=decoder.parts is not None, compile_error=decoder.compile_error)
    return decoder.tokens[:, :steps + 1].cpu()


class _Decoder:
    """Static KV cache + state of one batch shape, and the decode step over them (a CUDA graph on CUDA).

    Step k reads token `tokens[:, k-1]` at mrope position `pos`, writes its keys/values at cache slot `slot`,
    and writes the chosen token to `tokens[:, k]`; `slot`, `col`, `pos`, `done` (and `seen`, for the
    repetition penalty) advance on the device.
    """

    def __init__(self, core: Any, batch: int, cache_len: int, max_new: int, cfg: Any, eos: list[int],
                 device: torch.device, compile: bool = False, attention: str = "sdpa") -> None:
        lm = core.model.language_model
        text_cfg = lm.config
        if "sliding_attention" in (getattr(text_cfg, "layer_types", None) or []):
            raise RepicError("generation backend 'static' does not implement sliding-window attention layers; "
                             "use backend 'hf'")
        dtype = lm.embed_tokens.weight.dtype
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
        kv_heads, vocab = text_cfg.num_key_value_heads, core.lm_head.out_features
        self.core, self.lm, self.batch, self.cache_len, self.max_new = core, lm, batch, cache_len, max_new
        self.n_rep = text_cfg.num_attention_heads // kv_heads
        self.do_sample, self.temperature = bool(cfg.do_sample), float(cfg.temperature or 1.0)
        self.top_k = int(cfg.top_k or 0) if self.do_sample else 0
        penalty = float(cfg.repetition_penalty or 1.0)
        self.penalty = penalty if penalty != 1.0 else None
        self.pad = int(cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0))
        kw = dict(device=device)
        shape = (batch, kv_heads, cache_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, **kw) for _ in lm.layers]
        self.values = [torch.zeros(shape, dtype=dtype, **kw) for _ in lm.layers]
        self.prompt_mask = torch.zeros(batch, cache_len, dtype=torch.bool, **kw)
        self.is_new = torch.zeros(cache_len, dtype=torch.bool, **kw)
        self.arange = torch.arange(cache_len, **kw)
        self.slot = torch.zeros(1, dtype=torch.long, **kw)
        self.col = torch.ones(1, dtype=torch.long, **kw)
        self.pos = torch.zeros(3, batch, dtype=torch.long, **kw)
        self.tokens = torch.full((batch, max_new), self.pad, dtype=torch.long, **kw)
        self.done = torch.zeros(batch, dtype=torch.bool, **kw)
        self.eos = torch.tensor(eos if eos else [-1], dtype=torch.long, **kw)
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, **kw) if self.penalty else None
        self.suppress = None
        if cfg.suppress_tokens:
            self.suppress = torch.zeros(vocab, dtype=torch.bool, **kw)
            self.suppress[torch.tensor([t for t in cfg.suppress_tokens if 0 <= t < vocab], dtype=torch.long,
                                       **kw)] = True
        # PEFT LoRA layers as base + two low-rank products in the model's dtype (3 kernels, where PEFT's own
        # forward, with fp32 adapters, launches ~8); the adapter copies are refreshed by every `load`. A layer in
        # training mode (rollouts with LoRA dropout, `keep_mode`) drops its adapter's input as PEFT's forward does.
        self.low_rank: dict[int, tuple[Any, list[tuple[torch.Tensor, torch.Tensor, Any]]]] = {}
        for layer in lm.layers:
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                      layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                adapters = _lora_adapters(m)
                if adapters is not None:
                    self.low_rank[id(m)] = (m.base_layer, [
                        (torch.empty(m.lora_A[a].weight.shape, dtype=dtype, **kw),
                         torch.empty(m.lora_B[a].weight.shape, dtype=dtype, **kw), (m, a, _dropout_p(m, a)))
                        for a in adapters])
        self.refresh_adapters()
        self.attend = _attend_sdpa if attention == "sdpa" else _attend_matmul
        self.parts: dict[str, Any] | None = None  # the compiled layer functions, when the step uses them
        self.compile_error: str | None = None
        if compile:
            self.params, why = self._layer_params()
            if why is None:
                self.parts = _compiled_parts(attention)
                self.attend = self.parts["attend"]
            else:
                self.compile_error = why
                warnings.warn(f"generation: decode step not compiled ({why})", stacklevel=3)
        self.graph = None
        self.capture_error: str | None = None
        if device.type == "cuda":
            try:
                self._capture()
            except Exception as exc:  # noqa: BLE001 - decoding stays correct, only slower: say so and go on
                self.graph, self.capture_error = None, repr(exc)
                warnings.warn(f"generation: CUDA graph capture failed, decoding eagerly ({exc!r})", stacklevel=2)

    def linear(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        entry = self.low_rank.get(id(module))
        if entry is None:
            return module(x)
        base, adapters = entry
        y = base(x)
        for a, b_scaled, (_, _, p) in adapters:
            xa = F.dropout(x, p, training=True) if p else x
            y = torch.addmm(y.reshape(-1, y.shape[-1]), F.linear(xa, a).reshape(-1, a.shape[0]), b_scaled.t()
                            ).view(y.shape)
        return y

    def _layer_params(self) -> tuple[list[tuple[tuple, tuple]], str | None]:
        """Per layer, the tensors of the compiled functions' arguments (a PEFT LoRA projection: its base weight
        and our low-rank copies); or the reason the layers do not fit them."""
        def proj(m: Any) -> tuple:
            entry = self.low_rank.get(id(m))
            if entry is not None:
                base, adapters = entry
                return base.weight, base.bias, tuple((a, b, p) for a, b, (_, _, p) in adapters)
            if type(m) is not torch.nn.Linear:
                raise TypeError(f"{type(m).__name__} is not a plain Linear or LoRA layer")
            return m.weight, m.bias, ()

        params = []
        try:
            for layer in self.lm.layers:
                attn, mlp = layer.self_attn, layer.mlp
                norms = (layer.input_layernorm, layer.post_attention_layernorm)
                if not all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms):
                    raise TypeError(f"{type(norms[0]).__name__} is not an RMSNorm")
                if not (type(mlp.act_fn).__name__ == "SiLUActivation" or isinstance(mlp.act_fn, torch.nn.SiLU)):
                    raise TypeError(f"activation {type(mlp.act_fn).__name__} is not SiLU")
                params.append(((norms[0].weight, norms[0].variance_epsilon, proj(attn.q_proj), proj(attn.k_proj),
                                proj(attn.v_proj), attn.head_dim),
                               (proj(attn.o_proj), norms[1].weight, norms[1].variance_epsilon, proj(mlp.gate_proj),
                                proj(mlp.up_proj), proj(mlp.down_proj))))
        except TypeError as exc:
            return [], str(exc)
        return params, None

    def refresh_adapters(self) -> None:
        for _, adapters in self.low_rank.values():
            for a, b_scaled, (m, name, _) in adapters:
                a.copy_(m.lora_A[name].weight)
                b_scaled.copy_(m.lora_B[name].weight * m.scaling[name])

    # -- logits -> next token, as generate's processors and sampler do (same order)
    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.penalty is not None:
            penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.suppress is not None:
            logits = logits.masked_fill(self.suppress, float("-inf"))
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1])).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        # Exponential race: argmax(p / E), E ~ Exp(1), is a sample of p; unlike multinomial it never syncs.
        return (probs / torch.empty_like(probs).exponential_()).argmax(-1)

    def _advance(self, chosen: torch.Tensor) -> None:
        chosen = torch.where(self.done, torch.full_like(chosen, self.pad), chosen)
        self.tokens.index_copy_(1, self.col, chosen[:, None])
        self.done |= (chosen[:, None] == self.eos[None, :]).any(-1)
        if self.seen is not None:
            self.seen.scatter_(1, chosen[:, None], True)

    def step(self) -> None:
        """One decode step; device-side state only, so it can be captured and replayed."""
        if self.parts is not None:
            try:
                return self._step(self.parts)
            except Exception as exc:  # noqa: BLE001 - no compiler here (no Triton / C++ toolchain): stay eager, say so
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                # the failed try wrote at most the same keys/values at the same slot: rerunning eagerly is exact
                self.parts, self.compile_error = None, repr(exc)
                self.attend = _attend_sdpa if self.attend is _attend_sdpa else _attend_matmul
                warnings.warn(f"generation: compiled decode step failed, decoding eagerly ({exc!r})", stacklevel=2)
        self._step(None)

    def _step(self, parts: dict[str, Any] | None) -> None:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

        lm, b = self.lm, self.batch
        tok = self.tokens.index_select(1, self.col - 1)  # [B, 1]
        hidden = lm.embed_tokens(tok)
        cos, sin = lm.rotary_emb(hidden, self.pos[:, :, None])
        mask = (self.prompt_mask | (self.is_new & (self.arange <= self.slot)))[:, None, None, :]
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            if parts is not None:
                q, k, v = parts["pre"](hidden, cos, sin, *self.params[i][0])
            else:
                x = layer.input_layernorm(hidden)
                q = self.linear(attn.q_proj, x).view(b, 1, -1, attn.head_dim).transpose(1, 2)
                k = self.linear(attn.k_proj, x).view(b, 1, -1, attn.head_dim).transpose(1, 2)
                v = self.linear(attn.v_proj, x).view(b, 1, -1, attn.head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.keys[i].index_copy_(2, self.slot, k)
            self.values[i].index_copy_(2, self.slot, v)
            # the n_rep query heads of one key/value head as n_rep query rows: no repeated keys/values
            q = q.reshape(b, -1, self.n_rep, attn.head_dim)
            o = self.attend(q, self.keys[i], self.values[i], mask, attn.scaling)
            o = o.reshape(b, -1, 1, attn.head_dim).transpose(1, 2).reshape(b, 1, -1)
            if parts is not None:
                hidden = parts["post"](hidden, o, *self.params[i][1])
                continue
            hidden = hidden + self.linear(attn.o_proj, o)
            mlp, x = layer.mlp, layer.post_attention_layernorm(hidden)
            x = mlp.act_fn(self.linear(mlp.gate_proj, x)) * self.linear(mlp.up_proj, x)
            hidden = hidden + self.linear(mlp.down_proj, x)
        logits = self.core.lm_head(lm.norm(hidden)[:, -1]).float()
        self._advance(self.choose(logits))
        self.pos += 1
        self.slot += 1
        self.col += 1

    def _capture(self) -> None:
        # The state is a dummy here (`load` writes the real one before any replay); slot 0 attended, so the
        # warm-up steps compute finite values.
        self.col.fill_(1)
        self.is_new.fill_(True)
        self.graph = capture_graph(self.step, reset=lambda: self.col.fill_(1))
        for buf in self.keys + self.values:
            buf.zero_()
        torch.cuda.synchronize()

    def load(self, cache: Any, logits: torch.Tensor, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor,
             rows: torch.Tensor) -> None:
        """Write a prefilled batch (prompt rows expanded by `rows`) and its first token into the state."""
        self.refresh_adapters()
        mask = inputs["attention_mask"].bool()
        prompt_len = mask.shape[1]
        for i, layer in enumerate(cache.layers):
            self.keys[i][:, :, :prompt_len].copy_(layer.keys.index_select(0, rows))
            self.values[i][:, :, :prompt_len].copy_(layer.values.index_select(0, rows))
        self.prompt_mask.zero_()
        self.prompt_mask[:, :prompt_len] = mask.index_select(0, rows)
        self.is_new.copy_(self.arange >= prompt_len)
        self.slot.fill_(prompt_len)
        self.col.fill_(0)
        self.pos.copy_(positions[:, :, -1].index_select(1, rows) + 1)
        self.tokens.fill_(self.pad)
        self.done.zero_()
        if self.seen is not None:
            self.seen.zero_()
            self.seen.scatter_(1, inputs["input_ids"].index_select(0, rows), True)
        self._advance(self.choose(logits.index_select(0, rows)))
        self.col.fill_(1)

    def run(self) -> int:
        """Decode until every row stopped or `max_new` tokens; returns the number of decode steps run."""
        steps = 0
        while steps < self.max_new - 1:
            self.graph.replay() if self.graph is not None else self.step()
            steps += 1
            if steps % SYNC_EVERY == 0 and bool(self.done.all()):
                break
        return steps


def capture_graph(step: Any, reset: Any = None, warmups: int = 2) -> torch.cuda.CUDAGraph:
    """`step()` captured as a CUDA graph, as the decode step is: `warmups` calls on a side stream first (lazy
    cuBLAS / attention / inductor initialisation stays out of the graph), `reset()` after each."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            step()
            if reset is not None:
                reset()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


# The decode step's layer parts as functions of plain tensors: one compiled graph serves every layer (a module
# argument would compile once per layer). `p` of a projection: (weight, bias or None, ((A, B·scaling, dropout), ...)):
# a LoRA layer in training mode (GRPO rollouts, `keep_mode`) drops its adapter's input as PEFT's forward does, each
# adapter its own mask, drawn in the eager step's order; compiled, inductor draws them with its own generator (from
# seeds the CUDA generator gives each call, fresh at each CUDA-graph replay).


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2_5_VLRMSNorm.forward, as a function of tensors."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _proj(x: torch.Tensor, p: tuple) -> torch.Tensor:
    weight, bias, low_rank = p
    y = F.linear(x, weight, bias)
    for a, b, drop in low_rank:
        y = y + F.linear(F.linear(F.dropout(x, drop, training=True) if drop else x, a), b)
    return y


def _pre_fn(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm_w: torch.Tensor, eps: float,
            q_p: tuple, k_p: tuple, v_p: tuple, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input norm, q/k/v projections and rotary (transformers' `apply_rotary_pos_emb`) of one decode position:
    [B, 1, hidden] -> 3 × [B, heads, 1, d]."""
    b = hidden.shape[0]
    x = _rms(hidden, norm_w, eps)
    q, k, v = (_proj(x, p).view(b, 1, -1, head_dim).transpose(1, 2) for p in (q_p, k_p, v_p))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = head_dim // 2

    def rotate_half(t: torch.Tensor) -> torch.Tensor:
        return torch.cat((-t[..., half:], t[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


def _post_fn(hidden: torch.Tensor, o: torch.Tensor, o_p: tuple, norm_w: torch.Tensor, eps: float, gate_p: tuple,
             up_p: tuple, down_p: tuple) -> torch.Tensor:
    """Output projection, residual, norm, SiLU MLP, residual."""
    hidden = hidden + _proj(o, o_p)
    x = _rms(hidden, norm_w, eps)
    return hidden + _proj(F.silu(_proj(x, gate_p)) * _proj(x, up_p), down_p)


def _attend_sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
                 ) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def _attend_matmul(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
                   ) -> torch.Tensor:
    """transformers' eager attention (scores in the model's dtype, softmax in fp32), masked by a bool mask."""
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), values)


_COMPILED: dict[str, dict[str, Any]] = {}


def _compiled_parts(attention: str) -> dict[str, Any]:
    """The compiled layer functions (made once per process; inductor recompiles per batch size only)."""
    if attention not in _COMPILED:
        other = next(iter(_COMPILED.values()), None)  # the layer functions do not depend on the attention
        pre = other["pre"] if other else torch.compile(_pre_fn, fullgraph=True)
        post = other["post"] if other else torch.compile(_post_fn, fullgraph=True)
        # sdpa is one kernel already; the matmul form's scale, mask, softmax and cast fuse into one
        attend = _attend_sdpa if attention == "sdpa" else torch.compile(_attend_matmul, fullgraph=True)
        _COMPILED[attention] = {"pre": pre, "post": post, "attend": attend}
    return _COMPILED[attention]


def _dropout_p(module: Any, adapter: str) -> float:
    """The dropout probability PEFT applies to `adapter`'s input in `module` now: its `nn.Dropout`'s p in training
    mode, else 0."""
    drop = module.lora_dropout[adapter]
    return float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0


def _lora_adapters(module: Any) -> list[str] | None:
    """Active plain-LoRA adapter names of a PEFT `lora.Linear` that adds them at run time; None otherwise
    (not a LoRA layer, merged, disabled, DoRA or other variants: the module's own forward is used)."""
    if not (hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")):
        return None
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return None
    if not isinstance(module.base_layer, torch.nn.Linear) or getattr(module, "fan_in_fan_out", False):
        return None
    adapters = [a for a in module.active_adapters if a in module.lora_A.keys()]
    if any(a in getattr(module, "lora_variant", {}) for a in adapters):
        return None
    return adapters


# ----------------------------------------------------------------------------------------------------------------
# TRL helpers


def _pad_prompts(prompt_ids: Sequence[Sequence[int]], multimodal_fields: Mapping[str, Any], pad_id: int,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded batch from TRL's prompt ids and processor fields, as TRL's own generate path builds it."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    for k, v in multimodal_fields.items():
        if torch.is_tensor(v):
            inputs[k] = v
        elif isinstance(v, list) and v and isinstance(v[0], list):
            field = torch.zeros((len(v), width), dtype=torch.long)
            for i, row in enumerate(v):
                field[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
            inputs[k] = field
        else:
            inputs[k] = torch.as_tensor(v)
    return {k: t.to(device) for k, t in inputs.items()}


def _repeated_groups(inputs: Mapping[str, torch.Tensor], prompt_ids: Sequence[Sequence[int]], group: int,
                     config: Any) -> bool:
    """Whether rows come in consecutive groups of `group` identical prompts (ids and images)."""
    n = len(prompt_ids)
    if group <= 1 or n % group:
        return False
    if any(list(prompt_ids[i]) != list(prompt_ids[i - i % group]) for i in range(n)):
        return False
    if inputs.get("pixel_values") is None:
        return True
    for start in range(0, n, group):
        first = select_rows(inputs, [start], config)["pixel_values"]
        for i in range(start + 1, start + group):
            if not torch.equal(first, select_rows(inputs, [i], config)["pixel_values"]):
                return False
    return True


# Chat conversations -> greedy answers: captioning, the judge, the merge check and training's held-out check.
def generate_captions(model: Any, processor: Any, conversations: Sequence[tuple[list[dict], list[Any]]],
                      *, batch_size: int, max_new_tokens: int, backend: str = "hf", desc: str | None = None,
                      hit_limit: list[bool] | None = None) -> list[str]:
    """Greedy captions for many conversations, batched by similar prompt size, left padded; `backend` is
    HF `generate` ("hf") or the static-KV-cache/CUDA-graph decoder ("static", token-identical in fp32).
    With `desc`, shows progress (`repic.core.progress`); `hit_limit` receives, per caption, whether it was cut at
    `max_new_tokens`."""
    from repic.core.progress import Progress

    texts = [processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
             for msgs, _ in conversations]
    images = [imgs for _, imgs in conversations]
    if desc is None:
        return generate(model, processor, texts, images, backend=backend, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, hit_limit=hit_limit)
    with Progress(len(texts), desc, unit="caption") as bar:
        return generate(model, processor, texts, images, backend=backend, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, hit_limit=hit_limit, on_batch=bar.update)
