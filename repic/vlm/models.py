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


def load_processor(path: str | os.PathLike, *, max_pixels: int | None = None) -> ImageQwenVLProcessor:
    """The checkpoint's processor, left padding; `max_pixels` caps the image size (RePIC's captioning uses
    1024*28*28); None keeps the checkpoint's own."""
    try:
        processor = ImageQwenVLProcessor.from_pretrained(str(path))
    except OSError as exc:
        raise RepicError(f"{path}: cannot load a Qwen2.5-VL processor ({exc})") from None
    processor.tokenizer.padding_side = "left"
    if max_pixels is not None:
        from transformers.image_utils import SizeDict

        # `size`, not a max_pixels kwarg: transformers deprecates passing max_pixels through to each call.
        shortest = processor.image_processor.size["shortest_edge"]
        processor.image_processor.size = SizeDict(shortest_edge=shortest, longest_edge=int(max_pixels))
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
