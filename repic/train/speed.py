"""Faster training forwards for TRL's `GRPOTrainer`, each one exact: what is trained does not change.

`fast_trainer(trainer_cls, compile_layers=..., compile_vision=..., preprocess_once=...)` returns
a subclass of the trainer class (TRL's, or `repic.vlm.generation.rollout_trainer`'s) with these levers, each off
unless asked for (bench/perf.py measures them; BENCHMARKS.md has the figures). A padding-free lever (each sequence's
forwards alone, unpadded) was measured and removed: 9.5 % slower on an H100 at RePIC's shapes (BENCHMARKS.md, issue 28).


- `compile_layers`: each decoder layer of the language model runs as `torch.compile(dynamic=True)` code (one graph
  for all layers and sequence lengths), which fuses the eager elementwise chains around the matrix products
  (RMSNorm and rotary in fp32, LoRA's casts and scaling, SiLU, residual adds) in the forward and the backward; only
  in forwards without a KV cache (TRL's reference and policy forwards), not in rollouts.
  LoRA's dropout modules stay eager (`torch.compiler.disable`), so they draw the same masks from the same generator
  as the eager layer; gradient checkpointing wraps the compiled layer as it wraps the eager one.
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

Gradient checkpointing itself is TRL's option (`GRPOConfig.gradient_checkpointing`): off, the backward does not
recompute each layer's forward, at the price of the activations' memory.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch

from repic.vlm.image_memo import memoize_image_processor


def fast_trainer(trainer_cls: type, *, compile_layers: bool = False, compile_vision: bool = False,
                 preprocess_once: bool = False, autocast_lora: bool = False) -> type:
    """`trainer_cls` (a TRL GRPOTrainer class) with the levers asked for (module docstring); itself if none."""
    if not (compile_layers or compile_vision or preprocess_once or autocast_lora):
        return trainer_cls

    class FastGRPOTrainer(trainer_cls):
        speed_options = {"compile_layers": compile_layers, "compile_vision": compile_vision,
                         "preprocess_once": preprocess_once, "autocast_lora": autocast_lora}

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if autocast_lora:
                lora_inputs_in_autocast(self.model)
            if preprocess_once and getattr(self.processing_class, "image_processor", None) is not None:
                memoize_image_processor(self.processing_class.image_processor)
            if compile_vision:
                from repic.vlm.vision import enable_fast_vision

                enable_fast_vision(self.model, compile=True)
            if compile_layers:
                compile_language_layers(self.model)

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


_COMPILED_CLASSES: dict[tuple[type, Any], type] = {}


def compile_language_layers(model: Any, backend: Any = "inductor") -> int:
    """Each decoder layer of `model`'s language model (under PEFT / accelerate wrappers) as compiled code, LoRA
    dropout left eager; returns the number of layers compiled. A layer class without transformers' checkpointing
    wrapper (`GradientCheckpointingLayer`) is left as it is, with a warning. `backend`: torch.compile's (tests: a
    counting one)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from repic.vlm.generation import _core

    lm = _core(model).model.language_model
    done = 0
    for layer in lm.layers:
        cls = type(layer)
        if getattr(cls, "_repic_compiled", False):
            done += 1
            continue
        raw = getattr(cls.forward, "__wrapped__", None)  # the forward under transformers' checkpointing wrapper
        if not issubclass(cls, GradientCheckpointingLayer) or raw is None:
            warnings.warn(f"compile_layers: {cls.__name__} left eager (not a GradientCheckpointingLayer)",
                          stacklevel=2)
            continue
        key = (cls, backend)
        if key not in _COMPILED_CLASSES:
            # a subclass whose forward is the compiled raw forward: GradientCheckpointingLayer.__init_subclass__
            # wraps it in the same checkpointing logic as the eager class's
            _COMPILED_CLASSES[key] = type(f"Compiled{cls.__name__}", (cls,), {
                "forward": _training_forward(raw, torch.compile(raw, dynamic=True, backend=backend)),
                "_repic_compiled": True})
        layer.__class__ = _COMPILED_CLASSES[key]
        done += 1
    for module in lm.modules():
        if isinstance(module, torch.nn.Dropout) and not getattr(module, "_repic_eager", False):
            # eager: the masks come from the global generator in the eager layer's order (inductor would draw its
            # own); the compiled code breaks its graph around each dropout
            module.forward = torch.compiler.disable(module.forward)
            module._repic_eager = True
    return done


def _training_forward(raw: Any, compiled: Any) -> Any:
    """The compiled forward for forwards without a KV cache (TRL's log-prob forwards); the eager one with a cache
    (rollout prefills, `generate`), whose per-layer cache writes would compile once per layer."""
    import functools

    @functools.wraps(raw)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            return compiled(self, *args, **kwargs)
        return raw(self, *args, **kwargs)

    return forward


def uncompile_language_layers(model: Any) -> None:
    """Undo `compile_language_layers` (the eager layer classes and dropout forwards back)."""
    from repic.vlm.generation import _core

    lm = _core(model).model.language_model
    for layer in lm.layers:
        if getattr(type(layer), "_repic_compiled", False):
            layer.__class__ = type(layer).__mro__[1]
    for module in lm.modules():
        if getattr(module, "_repic_eager", False):
            del module.forward, module._repic_eager
