"""The tiny embedded base: a Qwen2.5-VL built from a config with a tokenizer trained offline, saved with
`save_pretrained` so that every stage loads it back with `from_pretrained`, the code path of a hub checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from repic.vlm.models import ImageQwenVLProcessor

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


def build_tiny_model(out_dir: str | os.PathLike, texts: Iterable[str], cfg: dict[str, Any], seed: int,
                     names: Iterable[str] = ()) -> Path:
    """Build a tiny Qwen2.5-VL from a config + offline tokenizer and `save_pretrained` it (model + processor).

    `cfg` keys: vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, vision_hidden_size, vision_depth, vision_heads, min_pixels, max_pixels; optional
    embedding_std (token embedding init), tie_word_embeddings (default true; false: an own `lm_head`, a
    copy of the embeddings, that LoRA can target as RePIC's 7B has), rope_theta (default Qwen2.5-VL's 1e6) and
    name_share (default 1: the weight of the direction that the embeddings of the tokens of `names`, concept keys
    like `<pilok>`, share).
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
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 1_000_000.0)),
                         "mrope_section": mrope},
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
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    weight = model.get_input_embeddings().weight
    if cfg.get("embedding_std"):  # larger than the default 0.02: fixed embeddings (repic.synthetic.warmup)
        torch.nn.init.normal_(weight, std=cfg["embedding_std"])
    name_ids = sorted({i for n in names for i in tokenizer(n.strip("<>"))["input_ids"]})
    if name_ids:
        # Names share one direction of their embeddings (as a pretrained model's embeddings mark proper names),
        # each keeping a random part of its own: a head can find "the name" in a prompt, and the copy of it is
        # told apart from every other name by the random part. Norms stay those of the other tokens.
        with torch.no_grad():
            common = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(seed)) * weight.std()
            share = float(cfg.get("name_share", 1.0))
            weight[name_ids] = (weight[name_ids] + share * common) / (1 + share**2) ** 0.5
    if not model.config.tie_word_embeddings:  # untied: the head starts as a copy of the embeddings
        with torch.no_grad():
            model.lm_head.weight.copy_(weight)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def check_single_tokens(model_dir: str | os.PathLike, keys: Iterable[str]) -> None:
    """Raise unless the name inside each concept key (`<pilok>` -> `pilok`) is one token of the saved tokenizer."""
    from repic.core.io import RepicError
    from repic.vlm.models import load_processor

    tokenizer = load_processor(model_dir).tokenizer
    split = {key: pieces for key in keys if len(pieces := tokenizer.tokenize(key.strip("<>"))) != 1}
    if split:
        key, pieces = next(iter(split.items()))
        raise RepicError(f"fetch_data.tiny_model.vocab_size: {len(tokenizer)} tokens are too few: {len(split)} concept "
                         f"names are not one token each (e.g. {key} -> {pieces}); raise vocab_size")
