"""GRPO + LoRA post-training with RePIC's verifiable rewards (TRL `GRPOTrainer`, PEFT `LoraConfig`).

Config keys are the libraries' own field names: `params.train_grpo_lora.grpo` goes to `GRPOConfig`,
`params.train_grpo_lora.lora` to `LoraConfig`, so TRL's and PEFT's docs are ours.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from PIL import Image

from repic.core.io import RepicError, resolve_image
from repic.core.params import grpo_config, lora_config
from repic.core.prompts import training_problem


def resize_for_training(image: Image.Image, n_images: int, multi_short_side: int, single_short_side: int
                        ) -> Image.Image:
    """RePIC's resize: short side <= 512 px for multi-image samples, <= 1024 px for single-image ones."""
    limit = multi_short_side if n_images > 1 else single_short_side
    short = min(image.size)
    if short <= limit:
        return image
    scale = limit / short
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)


def build_examples(samples: list[dict[str, Any]], root: str | os.PathLike, *, seed: int,
                   multi_short_side: int = 512, single_short_side: int = 1024) -> list[dict[str, Any]]:
    """RePIC training samples -> TRL conversational examples with images and reward columns.

    `solution` is stored as JSON text so one Arrow column holds "yes", boxes and name lists alike; the rewards
    decode it. Original and resized image sizes travel along for the strict protocol's box rescaling.
    """
    rng = random.Random(seed)
    examples = []
    for i, sample in enumerate(samples):
        paths = sample["image"] if isinstance(sample["image"], list) else [sample["image"]]
        images, sizes, resized = [], [], []
        for rel in paths:
            path = resolve_image(root, rel)
            try:
                img = Image.open(path).convert("RGB")
            except OSError as exc:
                raise RepicError(f"training sample {i}: cannot read image {path} ({exc})") from None
            sizes.append(list(img.size))
            img = resize_for_training(img, len(paths), multi_short_side, single_short_side)
            resized.append(list(img.size))
            images.append(img)
        text = training_problem(sample["problem"], sample["accu_reward_method"], rng)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        examples.append({
            "prompt": [{"role": "user", "content": content}],
            "images": images,
            "solution": json.dumps(sample["solution"]),
            "accu_reward_method": sample["accu_reward_method"],
            "image_size": sizes[-1],
            "resized_size": resized[-1],
        })
    return examples


def reward_functions(names: list[str], protocol: str) -> list:
    from repic.train.rewards import REWARD_REGISTRY

    unknown = [n for n in names if n not in REWARD_REGISTRY]
    if unknown:
        raise RepicError(f"train_grpo_lora.rewards: unknown reward {unknown[0]!r}; "
                         f"expected one of {sorted(REWARD_REGISTRY)}")
    return [REWARD_REGISTRY[n](protocol) for n in names]


# What the training loop reads of the `train_grpo_lora` section: checkpoints are keyed on these (and the data,
# base model, seed, dtype and number of processes), so editing `heldout_eval` or `launch` keeps them.
TRAINING_KEYS = ("rollout_backend", "protocol", "rewards", "resize", "lora", "grpo")


def epoch_seeded(trainer_cls: type) -> type:
    """`trainer_cls` (a TRL GRPOTrainer) whose training sampler draws epoch e's order from the epoch number.

    TRL's `RepeatSampler` seeds one generator when it is built and advances it by one permutation per pass, and
    transformers 5's Trainer no longer replays the finished epochs on resume (it calls `set_epoch`, which
    RepeatSampler lacks). So a run resumed in epoch 2 or later drew epoch 1's order again and then skipped the
    batches already trained: samples repeated or missed. Here pass e reseeds and draws e+1 permutations, the
    order an uninterrupted run sees, whichever process or resume asks for it.
    """
    import torch
    from trl.trainer.utils import RepeatSampler

    class EpochRepeatSampler(RepeatSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:  # called by the Trainer / accelerate before each pass
            self.epoch = epoch

        def __iter__(self):
            if self.shuffle:
                self.generator.manual_seed(self.seed)
                for _ in range(self.epoch):
                    torch.randperm(self.num_samples, generator=self.generator)
            return super().__iter__()

    class EpochSeededTrainer(trainer_cls):
        def _get_train_sampler(self, dataset=None):
            s = super()._get_train_sampler(dataset)
            if not isinstance(s, RepeatSampler) or (s.shuffle and s.seed is None):
                raise RepicError(f"unexpected TRL training sampler {type(s).__name__}: resume would not be exact")
            return EpochRepeatSampler(data_source=s.data_source, mini_repeat_count=s.mini_repeat_count,
                                      batch_size=s.batch_size, repeat_count=s.repeat_count, shuffle=s.shuffle,
                                      seed=s.seed)

    return EpochSeededTrainer


def content_digest(paths: list[str | os.PathLike]) -> str:
    """sha256 over the bytes of `paths` (folders walked, files in sorted order, each with its relative name):
    what the checkpoints were trained from, by content, so that a rebuilt base model or redrawn images at the same
    paths make them stale. Reads every byte once (a 7B checkpoint: seconds on a local disk)."""
    import hashlib

    digest = hashlib.sha256()
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
            with f.open("rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def prepare_checkpoints(checkpoint_dir: str | os.PathLike, fingerprint: dict[str, Any]) -> str | None:
    """The checkpoint to resume from, if any. Checkpoints of another configuration (params, data, base model)
    are stale: they are removed rather than resumed."""
    import hashlib
    import shutil

    from transformers.trainer_utils import get_last_checkpoint

    from repic.core.io import read_json, write_json

    checkpoint_dir = Path(checkpoint_dir)
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
    marker = checkpoint_dir / "fingerprint.json"
    if checkpoint_dir.exists() and (not marker.is_file() or read_json(marker).get("sha256") != key):
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"sha256": key})
    return get_last_checkpoint(str(checkpoint_dir))


def train(model_path: str | os.PathLike, samples: list[dict[str, Any]], root: str | os.PathLike,
          out_dir: str | os.PathLike, params: dict[str, Any], *, checkpoint_dir: str | os.PathLike, seed: int,
          device: str = "auto", dtype: str = "auto", callbacks: list | None = None) -> list[dict]:
    """Run GRPO + LoRA and save the adapter to `out_dir`; returns the per-step log records.

    Checkpoints go to `checkpoint_dir` (GRPOConfig `save_strategy`/`save_steps`); a rerun after a crash resumes
    from the last one (optimizer, scheduler, RNG and data position included), so on CPU with a fixed seed the
    final adapter equals an uninterrupted run's.
    """
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import set_seed
    from trl import GRPOTrainer

    from repic.vlm.models import load_model, load_processor, pick_device

    device = pick_device(device)
    lora = lora_config(params["lora"])
    args = grpo_config({**params["grpo"], "seed": seed}, checkpoint_dir, use_cpu=device == "cpu")
    rewards = reward_functions(params["rewards"], params["protocol"])
    examples = build_examples(samples, root, seed=seed, **params.get("resize", {}))
    dataset = Dataset.from_list(examples)
    processor = load_processor(model_path)
    # Loaded on the CPU: the Trainer (accelerate) places it, one GPU per process under `accelerate launch`.
    # Seeded before LoRA's random init of lora_A, which the Trainer's own seeding comes too late for.
    set_seed(seed)
    model = get_peft_model(load_model(model_path, device="cpu", dtype=dtype).train(), lora)
    from repic.vlm.generation import rollout_trainer

    trainer_cls = epoch_seeded(rollout_trainer(GRPOTrainer, params.get("rollout_backend", "hf")))
    trainer = trainer_cls(
        model=model,
        reward_funcs=rewards,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=callbacks,
    )
    # Only now, with everything built, may stale checkpoints go: a config error above keeps them. One process
    # decides (several removing the same folder would race), the others then read what it left.
    if trainer.accelerator.is_main_process:
        # by content, not by path: the same paths with a rebuilt model or redrawn images must not resume
        images = sorted({str(resolve_image(root, rel)) for sample in samples
                         for rel in (sample["image"] if isinstance(sample["image"], list) else [sample["image"]])})
        fingerprint = {"params": {k: params.get(k) for k in TRAINING_KEYS}, "seed": seed, "samples": samples,
                       "dtype": dtype, "world_size": args.world_size,
                       "model": content_digest([model_path]), "images": content_digest(images)}
        prepare_checkpoints(checkpoint_dir, fingerprint)
    trainer.accelerator.wait_for_everyone()
    from transformers.trainer_utils import get_last_checkpoint

    resume = get_last_checkpoint(str(checkpoint_dir))
    if trainer.is_world_process_zero():
        print(f"train_grpo_lora: resuming from {resume}" if resume else
              f"train_grpo_lora: no checkpoint of this configuration in {checkpoint_dir}: training from step 0",
              flush=True)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(out_dir)
    return [rec for rec in trainer.state.log_history if "loss" in rec or "reward" in rec]


def heldout_rewards(model_path: str | os.PathLike, adapter_dir: str | os.PathLike, samples: list[dict[str, Any]],
                    root: str | os.PathLike, params: dict[str, Any], *, seed: int, device: str = "auto",
                    dtype: str = "auto", batch_size: int = 8) -> dict[str, Any]:
    """Base vs trained on training-format samples the run did not train on: the mean of each reward over the
    greedy answers of the base (no adapter) and of base + adapter, with the rollouts' prompts, images, answer
    length, generation backend and reward functions. `None` where no sample of that reward type was drawn."""
    from peft import PeftModel

    from repic.vlm.generation import generate_captions
    from repic.vlm.models import load_model, load_processor

    examples = build_examples(samples, root, seed=seed, **params.get("resize", {}))
    conversations = [(ex["prompt"], ex["images"]) for ex in examples]
    gen = dict(batch_size=batch_size, max_new_tokens=params["grpo"].get("max_completion_length", 256),
               backend=params.get("rollout_backend", "hf"))
    processor = load_processor(model_path)
    model = load_model(model_path, device=device, dtype=dtype)
    answers = {"base": generate_captions(model, processor, conversations, **gen)}
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    answers["trained"] = generate_captions(model, processor, conversations, **gen)
    columns = {k: [ex[k] for ex in examples] for k in ("solution", "accu_reward_method", "image_size",
                                                        "resized_size")}
    rewards = reward_functions(params["rewards"], params["protocol"])
    out: dict[str, Any] = {"n": len(examples)}
    for who, texts in answers.items():
        out[who] = {}
        for fn in rewards:
            values = [v for v in fn(texts, **columns) if v is not None]
            out[who][fn.__name__] = sum(values) / len(values) if values else None
    return out


def summarize_log(log: list[dict[str, Any]]) -> dict[str, Any]:
    """First vs last logged value of the total reward, each reward type, KL and loss (nan-aware means
    over the first/last quarter of steps, since one step sees one prompt group)."""
    import math

    keys = sorted({k for rec in log for k in rec if k in ("reward", "kl", "loss")
                   or (k.startswith("rewards/") and k.endswith("/mean"))})
    n = max(1, len(log) // 4)

    def mean(recs: list[dict[str, Any]], key: str) -> float | None:
        vals = [float(r[key]) for r in recs if r.get(key) is not None and not math.isnan(float(r[key]))]
        return sum(vals) / len(vals) if vals else None

    return {"steps": len(log), "window": n,
            "first": {k: mean(log[:n], k) for k in keys}, "last": {k: mean(log[-n:], k) for k in keys}}
