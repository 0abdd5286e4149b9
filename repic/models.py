"""Qwen2.5-VL models and processors: the tiny embedded base, and one loading path for hub or local checkpoints.

The embedded default builds a tiny Qwen2.5-VL from a config with a tokenizer trained offline, saves it with
`save_pretrained` and every stage loads it back with `from_pretrained`: the same code path a hub checkpoint
such as `Qwen/Qwen2.5-VL-7B-Instruct` takes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from repic.io import RepicError

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's chat template, restricted to text and image blocks (the tiny model has no video path).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'image' or 'image' in block %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )


def build_tiny_model(out_dir: str | os.PathLike, texts: Iterable[str], cfg: dict[str, Any], seed: int) -> Path:
    """Build a tiny Qwen2.5-VL from a config + offline tokenizer and `save_pretrained` it (model + processor).

    `cfg` keys: vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, vision_hidden_size, vision_depth, vision_heads, min_pixels, max_pixels.
    """
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, cfg["vocab_size"])
    image_processor = Qwen2VLImageProcessorPil(min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"])
    processor = ImageQwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=CHAT_TEMPLATE)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    # mrope splits head_dim/2 rotary frequencies over (time, height, width), as Qwen2.5-VL's 16/24/24 of 64.
    half = head_dim // 2
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(
        depth=cfg["vision_depth"], hidden_size=cfg["vision_hidden_size"],
        intermediate_size=2 * cfg["vision_hidden_size"], num_heads=cfg["vision_heads"],
        out_hidden_size=cfg["hidden_size"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        window_size=112, fullatt_block_indexes=[cfg["vision_depth"] - 1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


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
