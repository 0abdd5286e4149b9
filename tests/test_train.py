"""GRPO + LoRA: the built configs carry the recipe, and the RL loop really learns on a learnable task."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from repic.io import RepicError
from repic.train import LANGUAGE_MODEL_LINEAR, build_examples, grpo_config, lora_config, reward_functions


def test_grpo_and_lora_configs_carry_the_params(tmp_path):
    args = grpo_config({"num_generations": 8, "beta": 0.04, "loss_type": "grpo", "temperature": 1.0,
                        "learning_rate": 1e-5, "max_completion_length": 256, "bf16": False}, tmp_path, use_cpu=True)
    assert (args.num_generations, args.beta, args.loss_type, args.temperature) == (8, 0.04, "grpo", 1.0)
    assert (args.learning_rate, args.max_completion_length) == (1e-5, 256)
    lora = lora_config({"r": 64, "lora_alpha": 128, "lora_dropout": 0.05})
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (64, 128, 0.05)
    assert lora.target_modules == LANGUAGE_MODEL_LINEAR
    with pytest.raises(RepicError, match=r"train_grpo_lora\.grpo\.num_generation: unknown key"):
        grpo_config({"num_generation": 8}, tmp_path, use_cpu=True)
    with pytest.raises(RepicError, match="unknown reward 'bleu'"):
        reward_functions(["bleu"], "repic")


def test_lora_targets_language_model_only(tiny_model_dir):
    from peft import get_peft_model

    from repic.models import load_model

    model = get_peft_model(load_model(tiny_model_dir, device="cpu"), lora_config({"r": 4, "lora_alpha": 8}))
    adapted = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert adapted and all("language_model" in n for n in adapted)
    assert not any("visual" in n for n in adapted)


def test_examples_carry_images_solution_json_and_sizes(tmp_path):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (1200, 600), "red").save(tmp_path / "data" / "big.png")
    Image.new("RGB", (80, 60), "blue").save(tmp_path / "data" / "small.png")
    samples = [
        {"image": "./data/big.png", "problem": "Where is <a>?", "solution": [1, 2, 30, 40],
         "accu_reward_method": "iou"},
        {"image": ["./data/big.png", "./data/small.png"], "problem": "Who?", "solution": ["<a>", "<b>"],
         "accu_reward_method": "yes_no_name_multi"},
    ]
    single, multi = build_examples(samples, tmp_path, seed=0)
    assert single["prompt"][0]["content"][-1]["text"].endswith(
        "For bounding box coordinates, return the final answer in JSON format.")
    assert json.loads(single["solution"]) == [1, 2, 30, 40]
    assert single["image_size"] == [1200, 600] and single["resized_size"] == [1200, 600]  # short side 600 <= 1024
    assert [img.size for img in multi["images"]] == [(1024, 512), (80, 60)]  # multi-image: short side <= 512
    assert sum(b["type"] == "image" for b in multi["prompt"][0]["content"]) == 2
    with pytest.raises(RepicError, match="training sample 0: cannot read image"):
        build_examples([{**samples[0], "image": "./data/nope.png"}], tmp_path, seed=0)
