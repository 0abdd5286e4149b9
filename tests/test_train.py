"""GRPO + LoRA: the built configs carry the recipe, and the RL loop really learns on a learnable task."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from repic.core.io import RepicError
from repic.core.params import LANGUAGE_MODEL_LINEAR, grpo_config, lora_config
from repic.train.grpo import build_examples, reward_functions


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
    with pytest.raises(RepicError, match=r"grpo\.learning_rate: '1e-4' is not a number"):
        grpo_config({"learning_rate": "1e-4"}, tmp_path, use_cpu=True)
    with pytest.raises(RepicError, match=r"lora\.lora_dropout: '0.05' is not a number"):
        lora_config({"lora_dropout": "0.05"})


def test_lora_targets_language_model_only(tiny_model_dir):
    from peft import get_peft_model

    from repic.vlm.models import load_model

    model = get_peft_model(load_model(tiny_model_dir, device="cpu"), lora_config({"r": 4, "lora_alpha": 8}))
    adapted = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert adapted and all("language_model" in n for n in adapted)
    assert not any("visual" in n for n in adapted)


def test_lora_model_is_the_stages_adapter_for_either_target_set(tiny_model_dir):
    """`lora_model` (the training stage's, which bench/perf.py reuses): `repic` adapts every non-vision linear
    layer, lm_head included; `language_model` the language model's projections only; bad keys: one line."""
    from repic.train.grpo import lora_model, repic_lora_targets
    from repic.vlm.models import load_model

    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    base = load_model(tiny_model_dir, device="cpu")
    targets = repic_lora_targets(base)
    model = lora_model(base, {"lora": lora, "lora_targets": "repic"})
    assert sorted(model.targeted_module_names) == targets and "lm_head" in targets
    plain = lora_model(load_model(tiny_model_dir, device="cpu"), {"lora": lora})
    assert plain.targeted_module_names and all("language_model" in n for n in plain.targeted_module_names)
    with pytest.raises(RepicError, match=r"train_grpo_lora\.lora_targets: expected one of repic, language_model"):
        lora_model(base, {"lora": lora, "lora_targets": "all"})
    with pytest.raises(RepicError, match=r"lora\.target_modules: lora_targets: repic sets them"):
        lora_model(base, {"lora": {**lora, "target_modules": ["q_proj"]}, "lora_targets": "repic"})


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
    # RePIC's resize: a side over 1024 (single image) / 512 (a list's image) sets the short side to it
    assert single["image_size"] == [1200, 600] and single["resized_size"] == [2048, 1024]
    assert [img.size for img in multi["images"]] == [(1024, 512), (80, 60)]
    assert sum(b["type"] == "image" for b in multi["prompt"][0]["content"]) == 2
    with pytest.raises(RepicError, match="training sample 0: cannot read image"):
        build_examples([{**samples[0], "image": "./data/nope.png"}], tmp_path, seed=0)


def _tiny_samples(root):
    (root / "data").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.new("RGB", (56, 56), (60 * i, 100, 50)).save(root / f"data/{i}.png")
    return [{"image": [f"./data/{i % 4}.png", f"./data/{(i + 1) % 4}.png"],
             "problem": f"The first image shows <x{i}>. Is <x{i}> in the second image?",
             "solution": "yes" if i % 2 else "no", "accu_reward_method": "yes_no"} for i in range(8)]


def _tiny_params(**grpo):
    return {"protocol": "repic", "rewards": ["object_consistency", "identity_consistency"],
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
            "grpo": {"num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 4,
                     "learning_rate": 1e-2, "beta": 0.04, "loss_type": "grpo", "logging_steps": 1, "bf16": False,
                     "gradient_checkpointing": False, "max_steps": 4, "save_strategy": "steps", "save_steps": 2,
                     **grpo}}


def _adapter_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def text_variety(completions, **kwargs):
    """A reward with spread on a random model's output (the RePIC rewards are all 0 there): distinct chars."""
    from repic.train.rewards import completion_text

    return [len(set(completion_text(c))) / 10 for c in completions]


def test_killed_run_resumes_to_the_same_adapter(tiny_model_dir, tmp_path, monkeypatch):
    import torch
    from transformers import TrainerCallback

    import repic.train.grpo as grpo
    from repic.train.grpo import train
    from repic.train.rewards import REWARD_REGISTRY

    monkeypatch.setitem(REWARD_REGISTRY, "text_variety", lambda protocol: text_variety)
    opened: list[str] = []  # the training images this process reads (a DataLoader worker's land in its own copy)
    real_open = grpo._open_rgb
    monkeypatch.setattr(grpo, "_open_rgb", lambda path, where: opened.append(str(path)) or real_open(path, where))
    samples = _tiny_samples(tmp_path)
    params = {**_tiny_params(), "rewards": ["object_consistency", "text_variety"]}
    log = train(tiny_model_dir, samples, tmp_path, tmp_path / "full", params,
                checkpoint_dir=tmp_path / "ck_full", seed=3, device="cpu")
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "kl" in log[-1]
    assert opened

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model_dir, samples, tmp_path, tmp_path / "resumed", params,
              checkpoint_dir=tmp_path / "ck", seed=3, device="cpu", callbacks=[Crash()])
    assert not (tmp_path / "resumed").exists() and (tmp_path / "ck" / "checkpoint-2").is_dir()
    class Steps(TrainerCallback):
        ran: list[int] = []

        def on_step_end(self, args, state, control, **kw):
            self.ran.append(state.global_step)

    # evaluation-only and hardware keys are not what the checkpoints were trained on: editing them keeps the
    # checkpoints. With DataLoader workers (repic.train.grpo.preloading) the images are read there, none here.
    opened[:] = []
    log = train(tiny_model_dir, samples, tmp_path, tmp_path / "resumed",
                {**params, "heldout_eval": 99, "launch": "accelerate launch --num_processes 1",
                 "grpo": {**params["grpo"], "dataloader_num_workers": 2}},
                checkpoint_dir=tmp_path / "ck", seed=3, device="cpu", callbacks=[Steps()])
    assert Steps.ran == [3, 4]  # steps 1-2 came from the checkpoint
    assert opened == []
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    full, resumed = _adapter_weights(tmp_path / "full"), _adapter_weights(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert any(v.abs().sum() > 0 for k, v in full.items() if "lora_B" in k)  # it did train


def test_a_run_killed_in_epoch_2_resumes_to_the_same_adapter(tiny_model_dir, tmp_path, monkeypatch, capfd):
    """The paper trains 2 epochs. A run killed inside epoch 2 must resume epoch 2's sample order, not replay
    epoch 1's (TRL's sampler is seeded once per run; see repic.train.grpo.epoch_seeded): same prompts per step, and
    the same final adapter as an uninterrupted run."""
    import torch
    from transformers import TrainerCallback

    from repic.train.grpo import train
    from repic.train.rewards import REWARD_REGISTRY

    seen: list[str] = []

    def recording(completions, prompts=None, **kwargs):  # the prompt of every step, in order
        seen.append(prompts[0][0]["content"][-1]["text"])
        return text_variety(completions)

    monkeypatch.setitem(REWARD_REGISTRY, "text_variety", lambda protocol: recording)
    samples = _tiny_samples(tmp_path)[:4]  # 4 steps per epoch
    params = _tiny_params(max_steps=-1, num_train_epochs=2, save_steps=5)
    params["rewards"] = ["object_consistency", "text_variety"]
    train(tiny_model_dir, samples, tmp_path, tmp_path / "full", params, checkpoint_dir=tmp_path / "ck_full",
          seed=5, device="cpu")
    full_order, seen[:] = list(seen), []
    assert len(full_order) == 8 and full_order[:4] != full_order[4:]  # epoch 2 is reshuffled
    out = capfd.readouterr().out
    assert "no checkpoint of this configuration" in out
    # each distinct image preprocessed once (repic.train.speed.preprocess_once): 4 samples' images, 8 steps
    processed, asked = map(int, re.search(r"images preprocessed (\d+) of (\d+) asked for", out).groups())
    assert 0 < processed < asked

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 7:
                raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model_dir, samples, tmp_path, tmp_path / "resumed", params, checkpoint_dir=tmp_path / "ck",
              seed=5, device="cpu", callbacks=[Crash()])
    assert seen == full_order[:7] and (tmp_path / "ck" / "checkpoint-5").is_dir()  # step 5: inside epoch 2
    seen[:] = []
    train(tiny_model_dir, samples, tmp_path, tmp_path / "resumed", params, checkpoint_dir=tmp_path / "ck",
          seed=5, device="cpu")
    assert f"train_grpo_lora: resuming from {tmp_path / 'ck' / 'checkpoint-5'}" in capfd.readouterr().out
    assert seen == full_order[5:]  # steps 6-8: epoch 2's order, not epoch 1's
    full, resumed = _adapter_weights(tmp_path / "full"), _adapter_weights(tmp_path / "resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_checkpoints_of_another_config_are_not_resumed(tmp_path):
    from repic.train.grpo import prepare_checkpoints

    ck = tmp_path / "ck"
    assert prepare_checkpoints(ck, {"lr": 1}) is None
    (ck / "checkpoint-5").mkdir()
    assert prepare_checkpoints(ck, {"lr": 1}).endswith("checkpoint-5")
    assert prepare_checkpoints(ck, {"lr": 2}) is None and not (ck / "checkpoint-5").exists()


def test_a_failing_run_keeps_the_checkpoints(tiny_model_dir, tmp_path):
    """Stale checkpoints are dropped only once the trainer is built: a bad value, a missing model or any other
    failure before training starts keeps a long run's checkpoints."""
    from repic.train.grpo import prepare_checkpoints, train

    samples = _tiny_samples(tmp_path)
    params = _tiny_params()
    ck = tmp_path / "ck"
    prepare_checkpoints(ck, {"an": "older configuration"})
    (ck / "checkpoint-2").mkdir()
    bad = {**params, "grpo": {**params["grpo"], "learning_rate": "1e-4"}}
    with pytest.raises(RepicError, match=r"learning_rate: '1e-4' is not a number"):
        train(tiny_model_dir, samples, tmp_path, tmp_path / "out", bad, checkpoint_dir=ck, seed=0, device="cpu")
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises for a missing model
        train(tmp_path / "no-model", samples, tmp_path, tmp_path / "out", params, checkpoint_dir=ck, seed=0,
              device="cpu")
    with pytest.raises(RepicError, match="cannot read image"):
        train(tiny_model_dir, [{**samples[0], "image": "./data/nope.png"}], tmp_path, tmp_path / "out", params,
              checkpoint_dir=ck, seed=0, device="cpu")
    assert (ck / "checkpoint-2").is_dir()


def test_checkpoints_are_keyed_on_content_not_paths(tmp_path):
    """A rebuilt base model at the same path (fetch_data changed, training params not) must not resume the old
    run's checkpoints: the fingerprint digests the model's and the images' bytes."""
    import os

    from repic.train.grpo import content_digest

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    before = content_digest([model, image])
    os.utime(model / "model.safetensors", (0, 0))  # a checkout touches files: same bytes, same digest
    assert content_digest([model, image]) == before
    (model / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    assert content_digest([model, image]) != before
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    image.write_bytes(b"PNG")
    assert content_digest([model, image]) != before
