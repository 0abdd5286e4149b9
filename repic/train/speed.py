"""Faster training forwards for TRL's `GRPOTrainer`, each one exact: what is trained does not change.

`fast_trainer(trainer_cls, compile_vision=..., preprocess_once=...)` returns a subclass of the trainer class (TRL's,
or `repic.vlm.generation.rollout_trainer`'s) with these levers, each off unless asked for (bench/perf.py measures
them; BENCHMARKS.md has the figures). Two levers were measured and removed: one that ran each sequence's forwards
alone (9.5 % slower on an H100 at RePIC's shapes: small products; `packed` below is padding-free with the rows'
positions in one forward), and one that compiled each decoder layer with `torch.compile` (at most +1.6-3.2 % on an
H100 on top of the stage's path, with a first step of 77-120 s: under issue 28's 5 % bar; BENCHMARKS.md).

- `compile_vision`: the frozen vision tower's blocks compiled (repic.vlm.vision), as captioning does on CUDA.
- `autocast_lora`: under bf16 autocast (TRL's log-prob forwards with `bf16: true`), PEFT casts each LoRA layer's
  input to its adapter's dtype (fp32) before the dropout, and autocast casts it back to bf16 for the adapter's
  products: two copies and an fp32 dropout per adapted module and pass (on an H100 at RePIC's shapes the largest
  non-matmul kernels of a step, BENCHMARKS.md). Here the input stays in the autocast dtype wherever autocast would
  cast it back anyway; the products see the same bf16 numbers, and the dropout computes `x * mask / (1 - p)` in
  fp32 and rounds once to bf16 either way, so losses and gradients are the same for the same masks. Outside
  autocast (a CPU run in fp32, rollouts without it) PEFT's cast runs as before.
- `preprocess_once`: the processor's image preprocessing (resize, rescale, normalize, patches: on the CPU, ~0.2-0.5 s
  for an image with a 1024-px short side) done once per distinct image. TRL preprocesses a batch's images twice a
  step (for the rollouts and for the forwards), and each of the G copies of a prompt's images again; here an image
  already processed (same pixels, same options) reuses its patches, and the distinct new images of a call are
  processed in parallel threads. The patches are the same arrays the processor would compute.
  The memo is repic.vlm.image_memo's; captioning and the embedded warm-up use it keyed by image object
  (`images_processed_once`): the caption loader
  (`repic.vlm.preprocess.load_for_processor`) gives one PIL object per file, so a reference image shown in many
  conversations is neither converted nor resized again, and no pixels are hashed.

- `trim_padding`: TRL pads a step's rows to the step's longest (prompts on the left, completions on the right),
  splits them into micro-batches at random and runs each log-prob forward at that width. Under RePIC's grouping a
  step mixes its four tasks (at RePIC's image sizes: 915 tokens for a two-image yes/no prompt, 2,553 for a box
  prompt with one image at a 1,024-px short side), so much of that width is padding. Here the rows
  go into micro-batches by length (TRL's random draw made, then a stable sort: the loss and its gradient are sums
  over rows of equal weight, so the split does not change them; not with `bnpo` or the entropy mask, which
  normalise per micro-batch: TRL's split stays there), and each forward's chunk of rows runs cut to its own
  longest row (`trimmed_logps`). A dropped column is padding in every row of the chunk, masked out of attention
  and the loss, and positions come from the mask, so the log-probs are the padded path's up to float rounding;
  LoRA dropout draws its masks over the narrower input's shape (other masks, the same distribution).

- `packed`: the log-prob forwards' decoder layers run padding-free. TRL's rows are padded (prompts on the left,
  completions on the right; at RePIC's shapes, even cut by `trim_padding`, a quarter of a forward's positions are
  padding, and every product, elementwise kernel and the masked attention ran over them). Here the language model
  takes each row's real positions only, packed into one sequence ([1, tokens]: the image features merged and the
  M-RoPE positions computed on the padded rows first, as before), its attention runs per row (causal, over that
  row's positions: flash attention's variable-length kernel where torch has it on the device, else one causal
  product per row), and its output is scattered back to the padded shape (zeros at padding, which TRL masks) for
  TRL's log-probabilities. Each token sees the positions and keys it saw padded (the padded mask is causal and
  hides padding keys), so the log-probs are the padded path's up to float rounding; LoRA dropout draws its masks
  over the packed shape (other masks, the same distribution). Rollouts (a KV cache) are not packed, unless
  repic.vlm.generation's `prefill_packed` asks for their prefill (`_packing_forward`'s "prefill" mode).

Gradient checkpointing itself is TRL's option (`GRPOConfig.gradient_checkpointing`): off, the backward does not
recompute each layer's forward, at the price of the activations' memory.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any

import torch

from repic.vlm.image_memo import memoize_image_processor


def fast_trainer(trainer_cls: type, *, compile_vision: bool = False,
                 preprocess_once: bool = False, autocast_lora: bool = False, trim_padding: bool = False,
                 packed: bool = False) -> type:
    """`trainer_cls` (a TRL GRPOTrainer class) with the levers asked for (module docstring); itself if none."""
    if not (compile_vision or preprocess_once or autocast_lora or trim_padding or packed):
        return trainer_cls

    class FastGRPOTrainer(trainer_cls):
        speed_options = {"compile_vision": compile_vision,
                         "preprocess_once": preprocess_once, "autocast_lora": autocast_lora,
                         "trim_padding": trim_padding, "packed": packed}

        def _prepare_inputs(self, generation_batch: Any) -> Any:
            if not (trim_padding and self.model.training and length_groups_keep_the_loss(self)):
                return super()._prepare_inputs(generation_batch)
            with micro_batches_by_length():
                return super()._prepare_inputs(generation_batch)

        def _get_per_token_logps_and_entropies(self, model: Any, input_ids: Any, attention_mask: Any,
                                               logits_to_keep: int, batch_size: int | None = None,
                                               **kwargs: Any) -> Any:
            compute = super()._get_per_token_logps_and_entropies
            with packed_forwards(model) if packed else contextlib.nullcontext():
                if not trim_padding:
                    return compute(model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size, **kwargs)
                return trimmed_logps(compute, model, input_ids, attention_mask, logits_to_keep, batch_size, kwargs)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if autocast_lora:
                lora_inputs_in_autocast(self.model)
            if preprocess_once and getattr(self.processing_class, "image_processor", None) is not None:
                memoize_image_processor(self.processing_class.image_processor)
            if compile_vision:
                from repic.vlm.vision import enable_fast_vision

                enable_fast_vision(self.model, compile=True)
            if packed:
                enable_packing(self.model)

    FastGRPOTrainer.__name__ = f"Fast{trainer_cls.__name__}"
    return FastGRPOTrainer


# ----------------------------------------------------------------------------------------------------------------


def _cast_unless_autocast(self: Any, x: Any, dtype: torch.dtype) -> Any:
    """PEFT's `_cast_input_dtype`, except that an input already in the autocast dtype of its device stays as it is
    (autocast would cast it back for the adapter's products)."""
    if (isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
            and x.dtype == torch.get_autocast_dtype(x.device.type)):
        return x
    return type(self)._cast_input_dtype(self, x, dtype)


def lora_inputs_in_autocast(model: Any) -> int:
    """The `autocast_lora` lever (module docstring) on every LoRA layer of `model`; returns how many."""
    from peft.tuners.lora import LoraLayer

    done = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module._cast_input_dtype = types.MethodType(_cast_unless_autocast, module)
            done += 1
    return done


def lora_inputs_cast(model: Any) -> None:
    """Undo `lora_inputs_in_autocast` (PEFT's cast back)."""
    for module in model.modules():
        if getattr(module.__dict__.get("_cast_input_dtype"), "__func__", None) is _cast_unless_autocast:
            del module._cast_input_dtype


# ----------------------------------------------------------------------------------------------------------------
# `packed`: padding-free log-prob forwards

PACKED = "repic_packed"  # the attention implementation's name: SDPA, or per-row attention over packed rows
# which per-row kernel packed rows use: "auto" (flash attention's variable-length kernel on CUDA where torch has
# it, else "rows"), "varlen", or "rows" (one causal SDPA product per row)
PACKED_ATTENTION = {"kernel": "auto"}


def _language_model(model: Any) -> Any:
    from repic.vlm.generation import _core

    return _core(model).model.language_model


def packed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except for packed rows (`cu_seq_lens_q`: a forward of `packed_forwards`,
    replayed as is by gradient checkpointing): there each row attends causally to its own positions only."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("dropout") or query.shape[0] != 1:
        raise ValueError("packed attention: one packed row and no attention dropout expected, got "
                         f"{query.shape[0]} rows, dropout {kwargs.get('dropout')}")
    scale = kwargs.get("scaling")
    kernel = PACKED_ATTENTION["kernel"]
    if kernel == "varlen" or (kernel == "auto" and query.is_cuda and _varlen_attn() is not None):
        out = _varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), bounds,
                      int(kwargs["max_length_q"]), scale)
        return out.unsqueeze(0), None
    cuts = bounds.tolist()
    rows = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scale,
        enable_gqa=key.shape[1] != query.shape[1]) for a, b in zip(cuts, cuts[1:]) if b > a]
    return torch.cat(rows, 2).transpose(1, 2), None


def varlen_available() -> bool:
    """Whether this torch has flash attention's variable-length kernel (`torch.nn.attention.varlen`, 2.10+), which
    `packed` forwards use on CUDA (one causal product per row otherwise: slower than the padded path there)."""
    return _varlen_attn() is not None


@functools.cache
def _varlen_attn() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _parameters(fn: Any) -> Any:
    import inspect

    return inspect.signature(fn).parameters


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, longest: int,
            scale: float | None) -> torch.Tensor:
    """torch's variable-length flash attention, causal, over [tokens, heads, dim] (its arguments vary across torch
    releases: `is_causal` in 2.10, `window_size` after; grouped keys and values natively from 2.12)."""
    varlen_attn = _varlen_attn()
    params = _parameters(varlen_attn)
    kw: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "scale" in params:
        kw["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(f"packed attention: this torch's varlen_attn takes no scale, the model asks {scale}")
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, bounds, bounds, longest, longest, **kw)


def enable_packing(model: Any) -> None:
    """Let `packed_forwards` pack `model`'s language model: its attention becomes `packed_attention` (SDPA's own
    path for every forward that is not packed) and its forward packs the rows while `packed_forwards` is on."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    lm = _language_model(model)
    if lm.config._attn_implementation not in ("sdpa", PACKED):
        raise ValueError(f"packed forwards: the language model's attention is {lm.config._attn_implementation!r}, "
                         "expected 'sdpa'")
    if any(t != "full_attention" for t in lm.config.layer_types):
        raise ValueError("packed forwards: sliding-window layers are not supported")
    AttentionInterface.register(PACKED, packed_attention)
    if PACKED not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(PACKED, sdpa_mask)
    lm.config._attn_implementation = PACKED
    lm.forward = types.MethodType(_packing_forward, lm)
    lm.packing = False


def disable_packing(model: Any) -> None:
    """Undo `enable_packing`."""
    lm = _language_model(model)
    if lm.config._attn_implementation == PACKED:
        lm.config._attn_implementation = "sdpa"
    vars(lm).pop("forward", None)
    vars(lm).pop("packing", None)


@contextlib.contextmanager
def packed_forwards(model: Any) -> Any:
    """Within the block, forwards of `model` (one `enable_packing` prepared) without a cache run packed."""
    lm = _language_model(model)
    if "packing" not in vars(lm):
        raise ValueError("packed_forwards: enable_packing(model) first")
    outer, lm.packing = lm.packing, True
    try:
        yield
    finally:
        lm.packing = outer


def _packing_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The language model's forward (`enable_packing`): while `packing`, a forward of padded rows without a cache
    runs on their real positions packed into one row, and its output is put back in the padded shape. With
    `packing == "prefill"` (repic.vlm.generation's packed rollout prefill, `prefill_packed`) a forward that starts a
    cache (`use_cache`, none given) runs packed too, its keys and values put back in the padded shape, zeros in the
    pad slots (as the prefill by rows leaves them)."""
    raw = type(self).forward
    mask, embeds, positions = (kwargs.get(k) for k in ("attention_mask", "inputs_embeds", "position_ids"))
    prefill = self.packing == "prefill" and bool(kwargs.get("use_cache"))
    if (not self.packing or args or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
            or (kwargs.get("use_cache") and not prefill) or embeds is None or positions is None
            or not isinstance(mask, torch.Tensor) or mask.ndim != 2):
        return raw(self, *args, **kwargs)
    keep = mask.bool()
    rows, width = keep.shape
    lengths = keep.sum(1, dtype=torch.int32)
    index = keep.flatten().nonzero().squeeze(1)
    bounds = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    rest = {k: v for k, v in kwargs.items() if k not in ("attention_mask", "inputs_embeds", "position_ids",
                                                          "input_ids", "cache", "use_cache")}
    out = raw(self, input_ids=None, attention_mask=dict.fromkeys(self.config.layer_types),
              position_ids=positions.flatten(-2)[..., index].unsqueeze(-2), cache=None,
              inputs_embeds=embeds.flatten(0, 1).index_select(0, index).unsqueeze(0), use_cache=prefill,
              cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest, **rest)

    def unpack(packed: torch.Tensor) -> torch.Tensor:  # [tokens, ...] -> [rows, width, ...], zeros where padded
        return packed.new_zeros(rows * width, *packed.shape[1:]).index_copy(0, index, packed).view(
            rows, width, *packed.shape[1:])

    out.last_hidden_state = unpack(out.last_hidden_state[0])
    if prefill:  # [1, kv heads, tokens, d] -> [rows, kv heads, width, d]
        for layer in out.cache.layers:
            layer.keys = unpack(layer.keys[0].transpose(0, 1)).transpose(1, 2)
            layer.values = unpack(layer.values[0].transpose(0, 1)).transpose(1, 2)
    return out


# ----------------------------------------------------------------------------------------------------------------
# trim_padding: each forward's rows cut to their own longest


# the per-token fields of TRL's log-prob forwards that `trimmed_logps` cuts with the tokens; the image fields it
# regroups by row; any other field given (another model family's) leaves TRL's path as it is
_ROW_TOKEN_FIELDS = ("token_type_ids", "mm_token_type_ids")
_HANDLED_FIELDS = (*_ROW_TOKEN_FIELDS, "pixel_values", "image_grid_thw", "num_images", "compute_entropy",
                   "compute_aux_loss")


def trimmed_logps(compute: Any, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  logits_to_keep: int, batch_size: int | None, kwargs: dict[str, Any]) -> Any:
    """TRL's `_get_per_token_logps_and_entropies` (`compute`) with each chunk of `batch_size` rows cut to its own
    longest row: the rows ordered by length (stable) so that a chunk holds rows of like length, the columns no row
    of the chunk uses (left padding of the prompts, right padding of the completions) dropped, the chunk's images
    passed with it, and the results put back in the rows' order, zero where a completion column was dropped (no row
    of that chunk has a token there: TRL masks those positions). A dropped column is padding in every row of its
    chunk, masked out of attention and of the loss, and positions come from the mask (Qwen2.5-VL's
    `get_rope_index`), so each token sees what it saw padded."""
    import torch.nn.functional as F

    given = {k for k, v in kwargs.items() if v is not None and v is not False}
    pixel_values, grid, num_images = (kwargs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images"))
    if given - set(_HANDLED_FIELDS) or (pixel_values is not None and (grid is None or num_images is None)):
        return compute(model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size, **kwargs)
    n, width = input_ids.shape
    size = batch_size or n
    order = (torch.argsort(attention_mask.sum(1).cpu(), stable=True).tolist() if size < n else list(range(n)))
    if pixel_values is not None:
        first_image = [0, *torch.tensor(num_images).cumsum(0).tolist()]
        first_row = [0, *grid.prod(-1).cumsum(0).tolist()]
    logps, entropies, aux = [], [], []
    for start in range(0, n, size):
        rows = order[start:start + size]
        index = torch.tensor(rows, device=input_ids.device)
        mask = attention_mask[index]
        used = mask.any(0).nonzero().flatten().tolist()
        # the last prompt column is every row's (left padding), so the kept columns are one span through it
        left, right = min(used[0], width - logits_to_keep - 1), max(used[-1] + 1, width - logits_to_keep + 1)
        keep = logits_to_keep - (width - right)
        sub = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "image_grid_thw", "num_images")}
        for k in _ROW_TOKEN_FIELDS:
            if kwargs.get(k) is not None:
                sub[k] = kwargs[k][index][:, left:right]
        if pixel_values is not None:
            sub["pixel_values"] = torch.cat([pixel_values[first_row[first_image[r]]:first_row[first_image[r + 1]]]
                                             for r in rows])
            sub["image_grid_thw"] = torch.cat([grid[first_image[r]:first_image[r + 1]] for r in rows])
            sub["num_images"] = [num_images[r] for r in rows]
        lp, ent, ax = compute(model, input_ids[index][:, left:right], mask[:, left:right], keep,
                              batch_size=len(rows), **sub)
        logps.append(F.pad(lp, (0, logits_to_keep - keep)))
        if ent is not None:
            entropies.append(F.pad(ent, (0, logits_to_keep - keep)))
        if ax is not None:
            aux.append(ax)
    back = torch.tensor(order, device=input_ids.device)

    def unorder(parts: list[torch.Tensor]) -> torch.Tensor | None:
        if not parts:
            return None
        stacked = torch.cat(parts)
        out = torch.empty_like(stacked)
        out[back] = stacked
        return out

    return unorder(logps), unorder(entropies), torch.stack(aux).mean() if aux else None


def length_groups_keep_the_loss(trainer: Any) -> bool:
    """Whether the loss (and its gradient) is the same however the step's rows are split into micro-batches of
    equal size: TRL's per-row and whole-batch normalisations are; `bnpo` (tokens of the micro-batch) and the entropy
    mask (a quantile of the micro-batch) are not."""
    return trainer.loss_type != "bnpo" and float(getattr(trainer, "top_entropy_quantile", 1.0)) >= 1.0


def by_length(seq_dict: dict[str, Any]) -> dict[str, Any]:
    """TRL's `shuffle_sequence_dict` (the same `torch.randperm` draw), then the rows stably ordered by length
    (prompt + completion tokens): TRL's split then gives micro-batches of rows of like length, each padded to its
    own longest row by `trimmed_logps` instead of to the step's."""
    n = len(next(v for v in seq_dict.values() if v is not None))
    perm = torch.randperm(n)
    lengths = (seq_dict["prompt_mask"].sum(1) + seq_dict["completion_mask"].sum(1)).cpu()[perm]
    perm = perm[torch.argsort(lengths, stable=True)]

    def permute(v: Any) -> Any:
        if v is None or (isinstance(v, torch.Tensor) and v.ndim == 0):
            return v
        if isinstance(v, torch.Tensor):
            return v[perm.to(v.device)]
        return [v[i] for i in perm.tolist()]

    return {key: permute(val) for key, val in seq_dict.items()}


@contextlib.contextmanager
def micro_batches_by_length() -> Any:
    """Within the block, TRL's GRPOTrainer splits a generation batch into micro-batches by length (`by_length`)
    instead of at random (its `shuffle_sequence_dict`)."""
    import trl.trainer.grpo_trainer as grpo

    shuffle = grpo.shuffle_sequence_dict
    grpo.shuffle_sequence_dict = by_length
    try:
        yield
    finally:
        grpo.shuffle_sequence_dict = shuffle
