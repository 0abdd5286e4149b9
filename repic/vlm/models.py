"""Qwen2.5-VL models and processors: one loading path for hub or local checkpoints.

Every stage loads its model with `from_pretrained`, the tiny embedded base (`repic.synthetic.tiny_model`) as
well as a hub checkpoint such as `Qwen/Qwen2.5-VL-7B-Instruct`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from repic.core.io import RepicError


class ImageQwenVLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images only.

    The stock processor insists on a video processor, which needs torchvision; CPU machines with the plain
    torch wheel have none. Images go through the same PIL image processor and token replacement as upstream.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def use_threads(threads: int | None) -> None:
    """params `base.threads`: torch's intra-op CPU thread count for the rest of the stage (None: torch's default,
    the machine's cores). torch splits a matrix product or a reduction between its threads, so the count changes
    the order of float additions and with it the bytes of everything computed on the CPU; a fixed count makes a
    stage's outputs independent of the machine's cores (not of its CPU's kernels: README, "Same seed, same
    numbers"). Every stage that runs torch calls it first."""
    if threads is not None:
        torch.set_num_threads(threads)


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise RepicError(f"dtype: expected auto|float32|bfloat16|float16, got {dtype!r}") from None


def attn_implementation() -> str:
    """flash-attention 2 when installed (and a GPU is there), PyTorch sdpa otherwise."""
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_processor(path: str | os.PathLike, *, max_pixels: int | None = None,
                   min_pixels: int | None = None) -> ImageQwenVLProcessor:
    """The checkpoint's processor, left padding; `max_pixels` caps the image size (RePIC's captioning uses
    1024*28*28) and `min_pixels` floors it (RePIC's training sets both: 12845056 and 3136); None keeps the
    checkpoint's own."""
    try:
        processor = ImageQwenVLProcessor.from_pretrained(str(path))
    except OSError as exc:
        raise RepicError(f"{path}: cannot load a Qwen2.5-VL processor ({exc})") from None
    if getattr(processor.image_processor, "backend", "pil") != "pil":
        # transformers 5 picks its torchvision image processor wherever torchvision is installed (GPU machines);
        # RePIC's transformers 4.49 ran the PIL/numpy one, as this CPU environment does: the same one everywhere
        # (and the one repic.vlm.image_memo memoizes)
        from transformers import AutoImageProcessor

        processor.image_processor = AutoImageProcessor.from_pretrained(str(path), backend="pil")
    processor.tokenizer.padding_side = "left"
    if max_pixels is not None or min_pixels is not None:
        from transformers.image_utils import SizeDict

        # `size`, not max_pixels/min_pixels kwargs: transformers deprecates passing them through to each call
        # (transformers 4.49 read its `max_pixels`/`min_pixels` attributes, which RePIC's training sets, instead)
        size = processor.image_processor.size
        processor.image_processor.size = SizeDict(
            shortest_edge=int(min_pixels if min_pixels is not None else size["shortest_edge"]),
            longest_edge=int(max_pixels if max_pixels is not None else size["longest_edge"]))
    return processor


def load_model(path: str | os.PathLike, *, device: str = "auto", dtype: str = "auto",
               adapter: str | os.PathLike | None = None) -> Qwen2_5_VLForConditionalGeneration:
    """Load a Qwen2.5-VL checkpoint (local dir or hub id), optionally with a PEFT LoRA adapter on top."""
    device = pick_device(device)
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(path), dtype=pick_dtype(dtype, device), attn_implementation=attn_implementation()
        )
    except OSError as exc:
        raise RepicError(f"{path}: cannot load a Qwen2.5-VL model ({exc})") from None
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.to(device).eval()


# =============================================================================================== adapters
def safetensors_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors file's header alone (8-byte length + JSON): no weight is read."""
    import json
    import struct

    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise RepicError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _module_key(name: str) -> str:
    """A linear layer's name, independent of the checkpoint format: transformers moved Qwen2.5-VL's language
    model under `model.language_model.` and its vision tower under `model.visual.` (PEFT's saved names add
    `base_model.model.`); the key keeps the tower and the path from its `layers`/`blocks`/`merger` on."""
    parts = name.split(".")
    tower = "visual" if "visual" in parts else "text"
    start = next((i for i, p in enumerate(parts) if p in ("layers", "blocks", "merger")), len(parts) - 1)
    return tower + ":" + ".".join(parts[start:])


def check_adapter(adapter: str | os.PathLike, base_model: str | os.PathLike) -> None:
    """A LoRA adapter checked against the base model it is applied to, from file headers only (seconds at 7B),
    before any work: every target module must exist in the base and every LoRA matrix fit its weight
    (lora_A: [r, in_features], lora_B: [out_features, r]). A mismatch is one line naming both folders, instead of
    PEFT's traceback of hundreds of size mismatches after the retrieval pass. A base without local safetensors
    (a hub id) or an adapter without adapter_model.safetensors is not checked here (PEFT checks it on load)."""
    import json
    from pathlib import Path

    adapter, base = Path(adapter), Path(base_model)
    weights = adapter / "adapter_model.safetensors"
    base_files = sorted(base.glob("*.safetensors")) if base.is_dir() else []
    if not weights.is_file() or not base_files:
        return
    try:
        made_for = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        raise RepicError(f"{adapter / 'adapter_config.json'}: expected PEFT's adapter config (a JSON object)") from None
    base_shapes: dict[str, list[int]] = {}
    for f in base_files:
        base_shapes.update({_module_key(k.removesuffix(".weight")): s for k, s in safetensors_shapes(f).items()
                            if k.endswith(".weight") and len(s) == 2})
    problems, n = [], 0
    for name, shape in sorted(safetensors_shapes(weights).items()):
        for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if not name.endswith(part):
                continue
            n += 1
            module = name.removesuffix(part).removeprefix("base_model.model.")
            target = base_shapes.get(_module_key(module))
            if target is None:
                problems.append(f"{module}: no such linear layer in the base")
            elif shape[dim] != target[dim]:  # base weight: [out_features, in_features]
                what = "in_features" if dim == 1 else "out_features"
                problems.append(f"{module}{part.removesuffix('.weight')} {shape} needs {what} {shape[dim]}, the "
                                f"base's weight is {target}")
    if problems:
        raise RepicError(f"{adapter}: this LoRA adapter does not fit the base model {base} ({len(problems)} of {n} "
                         f"matrices; made for {made_for!r} per its adapter_config.json), e.g. {problems[0]}")
