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
from repic.core.params import batch_plan, grpo_config, lora_config
from repic.core.prompts import training_prompt


def resize_for_training(image: Image.Image, in_list: bool, multi_short_side: int = 512,
                        single_short_side: int = 1024) -> Image.Image:
    """RePIC's resize before the processor (`Qwen2VLGRPOTrainer._generate_and_score_completions`): an image of a
    list (any length, one included) with a side over `multi_short_side` gets its short side set to it, the long
    side scaled and truncated (`int`), LANCZOS; a single image (not a list) the same with `single_short_side`.
    A small short side is enlarged: 400x900 in a list becomes 512x1152."""
    limit = multi_short_side if in_list else single_short_side
    w, h = image.size
    if w > limit or h > limit:
        size = (limit, int(h * (limit / w))) if w < h else (int(w * (limit / h)), limit)
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _open_rgb(path: Path, where: str) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except OSError as exc:
        raise RepicError(f"{where}: cannot read image {path} ({exc})") from None


def check_images(samples: list[dict[str, Any]], root: str | os.PathLike) -> None:
    """Every training image opens (its header): a missing file fails before training, not at its first fetch."""
    for i, sample in enumerate(samples):
        for rel in sample["image"] if isinstance(sample["image"], list) else [sample["image"]]:
            path = resolve_image(root, rel)
            try:
                Image.open(path).close()
            except OSError as exc:
                raise RepicError(f"training sample {i}: cannot read image {path} ({exc})") from None


def sample_example(sample: dict[str, Any], root: str | os.PathLike, rng: random.Random, *, index: int = 0,
                   multi_short_side: int = 512, single_short_side: int = 1024,
                   load: Any = None) -> dict[str, Any]:
    """One RePIC training sample -> TRL's conversational example, as RePIC's `__getitem__` builds it (the prompt
    by method and image count, an ICT text drawn from `rng`) with RePIC's resize. A several-image sample that RePIC
    gives one image slot (`iou`) gets its first image only (RePIC passed them all for one slot, which the processor
    cannot match: unreachable in its data). `solution` is JSON text so one Arrow column holds "yes", boxes and name
    lists alike; the rewards decode it. Original and resized sizes of the last image travel along for the strict
    protocol's box rescaling. `load(path, in_list)`: the resized image (a cache), default: read it."""
    n_images = len(sample["image"]) if isinstance(sample["image"], list) else 1
    text, _ = training_prompt(sample["problem"], sample["accu_reward_method"], n_images, rng)
    images, sizes, resized = [], [], []
    for path, in_list in training_images(sample, root):  # the images `preloading` reads for the row
        if load is None:
            img = _open_rgb(path, f"training sample {index}")
            sizes.append(list(img.size))
            img = resize_for_training(img, in_list, multi_short_side, single_short_side)
        else:
            size, img = load(path, in_list)
            sizes.append(list(size))
        resized.append(list(img.size))
        images.append(img)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return {"prompt": [{"role": "user", "content": content}], "images": images,
            "solution": json.dumps(sample["solution"]), "accu_reward_method": sample["accu_reward_method"],
            "image_size": sizes[-1], "resized_size": resized[-1]}


def build_examples(samples: list[dict[str, Any]], root: str | os.PathLike, *, seed: int,
                   multi_short_side: int = 512, single_short_side: int = 1024) -> list[dict[str, Any]]:
    """Every sample built once (`sample_example`), ICT texts drawn from one seeded generator in sample order: the
    held-out check's and the benchmarks' fixed examples. Training draws at every fetch (`fetching_trainer`)."""
    rng = random.Random(seed)
    return [sample_example(s, root, rng, index=i, multi_short_side=multi_short_side,
                           single_short_side=single_short_side) for i, s in enumerate(samples)]


# ---------------------------------------------------------------- the recipe's batch and groups

GROUPINGS = ("repic", "grpo")
LORA_TARGETS = ("repic", "language_model")


def repic_lookup(n_samples: int, groups: int, seed: int) -> list[list[int]]:
    """The sample each of `groups` emulated RePIC processes finds at each index: RePIC's processes each shuffled
    the training list with Python's `random.shuffle` (unseeded) and then looked the sampler's same index up in their
    own list. Here process j's list is `random.Random(f"{seed}/process/{j}").shuffle`d: reproducible, and the same
    at any number of real processes."""
    lookup = []
    for j in range(groups):
        order = list(range(n_samples))
        random.Random(f"{seed}/process/{j}").shuffle(order)
        lookup.append(order)
    return lookup


def repic_lora_targets(model: Any) -> list[str]:
    """RePIC's LoRA targets (`find_all_linear_names`): every `torch.nn.Linear` whose name lacks `visual`, minus any
    named `embed_tokens`; the language model's projections and `lm_head`. Sorted full module names."""
    import torch

    names = {name for name, module in model.named_modules()
             if "visual" not in name and isinstance(module, torch.nn.Linear)}
    return sorted(n for n in names if "embed_tokens" not in n)


def reward_functions(names: list[str], protocol: str) -> list:
    from repic.train.rewards import REWARD_REGISTRY

    unknown = [n for n in names if n not in REWARD_REGISTRY]
    if unknown:
        raise RepicError(f"train_grpo_lora.rewards: unknown reward {unknown[0]!r}; "
                         f"expected one of {sorted(REWARD_REGISTRY)}")
    return [REWARD_REGISTRY[n](protocol) for n in names]


# What the training loop reads of the `train_grpo_lora` section: checkpoints are keyed on these (and the data,
# base model, seed, dtype and number of processes), so editing `heldout_eval` or `launch` keeps them.
TRAINING_KEYS = ("rollout_backend", "protocol", "rewards", "resize", "min_pixels", "max_pixels", "lora", "grpo",
                 "grouping", "completions_per_step", "lora_targets", "rollout_dropout")
# ... except these GRPOConfig fields, which change how fast, not what, is trained: a checkpoint resumes across them.
HARDWARE_GRPO_KEYS = ("dataloader_num_workers",)


def epoch_seeded(trainer_cls: type, lookup: list[list[int]] | None = None) -> type:
    """`trainer_cls` (a TRL GRPOTrainer) whose training sampler draws epoch e's order from the epoch number, and,
    given `lookup` (`repic_lookup`, grouping `repic`), yields for the j-th of the G copies of an index the sample
    `lookup[j][index]`: each normalisation group is G different samples, as RePIC's 8 processes made it.

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
            if lookup is None:
                yield from super().__iter__()
                return
            # RepeatSampler yields each index mini_repeat_count (= G) times in a row: copy j -> process j's sample
            for n, index in enumerate(super().__iter__()):
                yield lookup[n % self.mini_repeat_count][index]

    class EpochSeededTrainer(trainer_cls):
        def _get_train_sampler(self, dataset=None):
            s = super()._get_train_sampler(dataset)
            if not isinstance(s, RepeatSampler) or (s.shuffle and s.seed is None):
                raise RepicError(f"unexpected TRL training sampler {type(s).__name__}: resume would not be exact")
            if lookup is not None and len(lookup) != s.mini_repeat_count:
                raise RepicError(f"grouping repic: {len(lookup)} emulated processes for groups of "
                                 f"{s.mini_repeat_count}")
            return EpochRepeatSampler(data_source=s.data_source, mini_repeat_count=s.mini_repeat_count,
                                      batch_size=s.batch_size, repeat_count=s.repeat_count, shuffle=s.shuffle,
                                      seed=s.seed)

    return EpochSeededTrainer


def fetch_rng(seed: int, generation: int, position: int, grouping: str, group_size: int) -> random.Random:
    """The generator of one fetch's prompt draw: by the generation (optimizer step) and the row's position in the
    global generation batch, so any number of processes and a resumed run draw the same. Under `grpo` the G
    copies of a prompt share one draw (one prompt a group); under `repic` each row is its own process's fetch."""
    key = position if grouping == "repic" else position // group_size
    return random.Random(f"{seed}/fetch/{generation}/{key}")


def _image_cache(resize: dict[str, int], cache_images: int) -> Any:
    """`load(path, in_list)` -> (original size, the image resized as RePIC's `_prepare_inputs`), the last
    `cache_images` kept (the G copies of a prompt and the repeated fetches share them)."""
    from collections import OrderedDict

    cache: OrderedDict = OrderedDict()

    def load(path: Path, in_list: bool) -> tuple[tuple[int, int], Image.Image]:
        key = (str(path), in_list)
        if key not in cache:
            img = _open_rgb(path, "training image")
            cache[key] = (img.size, resize_for_training(img, in_list, **resize))
            while len(cache) > cache_images:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    return load


def training_images(sample: dict[str, Any], root: str | os.PathLike) -> list[tuple[Path, bool]]:
    """(path, in_list) of each image `sample_example` shows for `sample` (its prompt's image slots: by method and
    image count, never by the ICT draw)."""
    in_list = isinstance(sample["image"], list)
    paths = sample["image"] if in_list else [sample["image"]]
    slots = training_prompt(sample["problem"], sample["accu_reward_method"], len(paths), random.Random(0))[1]
    return [(resolve_image(root, rel), in_list) for rel in paths[:slots]]


def preloading(dataset: Any, samples: list[dict[str, Any]], root: str | os.PathLike, *, resize: dict[str, int],
               cache_images: int = 64) -> Any:
    """`dataset` (a datasets.Dataset of rows `{"sample": i}`) whose rows, when read, carry their sample's training
    images already read and resized (`preloaded`: {(path, in_list): (original size, image)}), for
    `fetching_trainer` to use instead of reading them. The Trainer's DataLoader reads the rows: in its worker
    processes, ahead of the step, when GRPOConfig's `dataloader_num_workers` > 0 (the images' decoding and resizing
    then overlap the GPU's work), in the training process when 0. The images are the ones `fetching_trainer` would
    read itself (the same function, the same files). Each process reading rows keeps its own last `cache_images`
    resized images, a batch's worth (64 at RePIC's sizes, up to 4 MB an image: ~0.25 GB a worker): a DataLoader
    worker reads whole batches, whose rows repeat an image within the batch (grouping `grpo`: a prompt's G rows)
    and in the next `steps_per_generation - 1` batches (TRL's sampler repeats a generation batch's rows, which other
    workers read); under `repic` a sample comes once an epoch."""
    load = _image_cache(resize, cache_images)

    def transform(batch: dict[str, list]) -> dict[str, list]:
        return {"sample": batch["sample"],
                "preloaded": [{(str(path), in_list): load(path, in_list)
                               for path, in_list in training_images(samples[i], root)} for i in batch["sample"]]}

    return dataset.with_transform(transform)


def fetching_trainer(trainer_cls: type, samples: list[dict[str, Any]], root: str | os.PathLike, *, seed: int,
                     grouping: str, resize: dict[str, int], cache_images: int = 256) -> type:
    """`trainer_cls` whose training rows (`{"sample": i}`) become examples when fetched, as RePIC's
    `LazySupervisedDataset.__getitem__` built them: the prompt routed by method and image count, the ICT text
    drawn at every fetch (`fetch_rng`), the images resized as RePIC's `_prepare_inputs` (`sample_example`): those a
    row carries (`preloading`), else read here (the last `cache_images` resized images kept)."""
    load = _image_cache(resize, cache_images)

    def row_loader(row: dict[str, Any]) -> Any:
        preloaded = row.get("preloaded") or {}

        def load_row(path: Path, in_list: bool) -> tuple[tuple[int, int], Image.Image]:
            hit = preloaded.get((str(path), in_list))
            return hit if hit is not None else load(path, in_list)

        return load_row

    class FetchingTrainer(trainer_cls):
        def _prepare_inputs(self, generation_batch):
            if isinstance(generation_batch, list) and generation_batch and "sample" in generation_batch[0]:
                first = self.accelerator.process_index * len(generation_batch)
                generation_batch = [
                    sample_example(samples[row["sample"]], root,
                                   fetch_rng(seed, self.state.global_step, first + r, grouping, self.num_generations),
                                   index=row["sample"], load=row_loader(row), **resize)
                    for r, row in enumerate(generation_batch)]
            return super()._prepare_inputs(generation_batch)

    return FetchingTrainer


def rollout_mode(trainer_cls: type, dropout: bool) -> type:
    """`trainer_cls` whose rollouts run with LoRA dropout active (`dropout`, as RePIC's: its model stays in
    training mode while it generates) or off (the model in eval mode while it generates)."""

    class RolloutModeTrainer(trainer_cls):
        rollout_keep_mode = dropout  # read by the static backend (repic.vlm.generation.rollout_trainer)

        def _generate_single_turn(self, *args, **kwargs):
            if dropout:
                return super()._generate_single_turn(*args, **kwargs)
            modes = {m: m.training for m in self.model.modules()}
            self.model.eval()
            try:
                return super()._generate_single_turn(*args, **kwargs)
            finally:
                for m, training in modes.items():
                    m.training = training

    return RolloutModeTrainer


def lora_head_trainer(trainer_cls: type) -> type:
    """`trainer_cls` that trains a LoRA adapter on `lm_head` (RePIC's targets include it). TRL 1.16 refuses one:
    its fused log-probabilities read `lm_head.weight` and would never see the adapter. Here, when the head carries
    an adapter, TRL's check is passed the base layer, and the fused forward computes the completion tokens'
    logits through the adapted head module (LoRA and its dropout, as RePIC's `model(...).logits`), then their
    log-softmax, in fp32, for the positions TRL scores only. Without an adapter on the head, TRL's path is kept."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    class LoraHeadTrainer(trainer_cls):
        def __init__(self, *args: Any, model: Any, **kwargs: Any) -> None:
            from repic.vlm.generation import _core

            core = _core(model)
            head = core.get_output_embeddings()
            if not isinstance(head, BaseTunerLayer):
                super().__init__(*args, model=model, **kwargs)
                return
            core.get_output_embeddings = lambda: head.get_base_layer()
            try:
                super().__init__(*args, model=model, **kwargs)
            finally:
                del core.get_output_embeddings
            install_lora_head_logps(core, self.temperature, entropy_grad=self._entropy_bonus_enabled)

    return LoraHeadTrainer


def install_lora_head_logps(core: Any, temperature: float, entropy_grad: bool = False) -> None:
    """Replace TRL's fused LM head of `core` (its `forward(..., fused_lm_head=True)`) by one that runs the head
    module: `lm_head(hidden)` of the scored positions, divided by `temperature`, fp32 log-softmax (see
    `lora_head_trainer`). The entropies (a metric, unless TRL's entropy bonus is on: `entropy_grad`) carry no
    graph, which saves a vocabulary-wide activation per token."""
    import functools
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    trl_forward = core.forward

    @functools.wraps(type(core).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        logits = self.lm_head(hidden[mask]).float() / temperature
        logp = logits.log_softmax(-1)
        token = logp.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = -(logp.exp() * logp).sum(-1)
        log_probs = torch.zeros(mask.shape, dtype=token.dtype, device=token.device).masked_scatter(mask, token)
        entropies = torch.zeros(mask.shape, dtype=entropy.dtype, device=entropy.device).masked_scatter(mask, entropy)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropies, label_mask=mask)

    core.forward = types.MethodType(forward, core)


def lora_plan(params: dict[str, Any]) -> tuple[Any, str]:
    """The `train_grpo_lora` section's PEFT `LoraConfig` (its `lora` fields checked) and its `lora_targets`
    (`repic` or `language_model`, default the latter), or one line naming the bad key."""
    targets = params.get("lora_targets", "language_model")
    if targets not in LORA_TARGETS:
        raise RepicError(f"train_grpo_lora.lora_targets: expected one of {', '.join(LORA_TARGETS)}, got {targets!r}")
    if targets == "repic" and "target_modules" in params["lora"]:
        raise RepicError("train_grpo_lora.lora.target_modules: lora_targets: repic sets them; remove one of the two")
    return lora_config(params["lora"]), targets


def lora_model(base: Any, params: dict[str, Any]) -> Any:
    """`base` with the training stage's LoRA adapter (`train_grpo_lora`'s `lora` and `lora_targets`: `repic` puts
    it on `repic_lora_targets(base)`, lm_head included). Seed first: PEFT draws `lora_A` at random. The training
    stage and bench/perf.py build their adapter here."""
    from peft import get_peft_model

    lora, targets = lora_plan(params)
    if targets == "repic":
        lora.target_modules = repic_lora_targets(base)
    return get_peft_model(base, lora)


def recipe_trainer(trainer_cls: type, params: dict[str, Any]) -> type:
    """`trainer_cls` (TRL's GRPOTrainer) with the `train_grpo_lora` section's training behaviour that does not
    depend on the data: rollouts through `rollout_backend` (default `hf`), `rollout_dropout` when set
    (`rollout_mode`), and log-probabilities through the adapted head when lm_head carries LoRA
    (`lora_head_trainer`). The training stage and bench/perf.py build their trainer class from this."""
    from repic.vlm.generation import rollout_trainer

    cls = rollout_trainer(trainer_cls, params.get("rollout_backend", "hf"))
    if params.get("rollout_dropout") is not None:
        cls = rollout_mode(cls, bool(params["rollout_dropout"]))
    return lora_head_trainer(cls)


def training_processor(model_path: str | os.PathLike, params: dict[str, Any]) -> Any:
    """The checkpoint's processor with the `train_grpo_lora` section's image pixel bounds (`min_pixels`,
    `max_pixels`; absent: the checkpoint's own), as RePIC's trainer sets them on its processor."""
    from repic.vlm.models import load_processor

    return load_processor(model_path, min_pixels=params.get("min_pixels"), max_pixels=params.get("max_pixels"))


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

    `params` (params.yaml's `train_grpo_lora`) beyond the libraries' sections: `grouping` (`repic`: each group of G
    completions is G samples, RePIC's; `grpo`: G completions of one prompt; default grpo), `completions_per_step`
    (sets the per-device batch and the accumulation, `batch_plan`, for the processes of this run; absent: the
    grpo section's own), `lora_targets` (`repic`: `repic_lora_targets`; `language_model`: the default of
    `lora_config`), `rollout_dropout` (true/false: LoRA dropout on/off while rolling out; absent: the backend's
    own, on for TRL's `hf`, off for `static`).
    """
    from datasets import Dataset
    from transformers import set_seed
    from trl import GRPOTrainer

    from repic.vlm.models import load_model, pick_device

    device = pick_device(device)
    grouping = params.get("grouping", "grpo")
    if grouping not in GROUPINGS:
        raise RepicError(f"train_grpo_lora.grouping: expected one of {', '.join(GROUPINGS)}, got {grouping!r}")
    targets = lora_plan(params)[1]  # its errors before anything is loaded
    grpo = dict(params["grpo"])
    if params.get("completions_per_step") is not None:
        grpo = batch_plan(grpo, params["completions_per_step"], int(os.environ.get("WORLD_SIZE", "1")))
    args = grpo_config({**grpo, "seed": seed}, checkpoint_dir, use_cpu=device == "cpu")
    rewards = reward_functions(params["rewards"], params["protocol"])
    check_images(samples, root)
    # rows read with their images (preloading): by the DataLoader's workers, ahead of the step, where
    # `dataloader_num_workers` > 0 (on an H100 at RePIC's shapes, BENCHMARKS.md: +16 % tokens/s over bench/perf.py's
    # rows, images decoded from Arrow; +2.6 % in this stage's own run, whose image files decoded cheaply)
    dataset = preloading(Dataset.from_list([{"sample": i} for i in range(len(samples))]), samples, root,
                         resize=params.get("resize", {}))
    processor = training_processor(model_path, params)
    # Loaded on the CPU: the Trainer (accelerate) places it, one GPU per process under `accelerate launch`.
    # Seeded before LoRA's random init of lora_A, which the Trainer's own seeding comes too late for.
    set_seed(seed)
    model = lora_model(load_model(model_path, device="cpu", dtype=dtype).train(), params)
    from repic.train.speed import fast_trainer, varlen_available
    from repic.vlm.image_memo import preprocess_counts

    trainer_cls = fetching_trainer(recipe_trainer(GRPOTrainer, params), samples, root, seed=seed,
                                   grouping=grouping, resize=params.get("resize", {}))
    lookup = repic_lookup(len(samples), args.num_generations, seed) if grouping == "repic" else None
    trainer_cls = epoch_seeded(trainer_cls, lookup)
    # Levers of repic.train.speed, each measured on an H100 at RePIC's shapes (BENCHMARKS.md, issue 28): each
    # distinct image preprocessed once, not TRL's twice a step and once per copy of a prompt (the processor's own
    # arrays; +16-26 % tokens/s); under bf16 autocast LoRA's inputs not cast to the adapters' fp32 (the same
    # products; +9-28 %); on CUDA the frozen vision tower compiled, as captioning runs it (+5-7 %), and each
    # log-prob forward's rows grouped by length and cut to their own longest row (`trim_padding`: +15-18 %; on CUDA
    # only, where it is measured: on the CPU the embedded default and the rehearsal keep TRL's padded forwards, whose
    # float rounding and LoRA dropout masks their committed outputs were made with). On CUDA, where torch has
    # flash attention's variable-length kernel, the log-prob forwards also run padding-free (`packed`: each row's
    # real positions only, attention per row; +15.0-16.6 % tokens/s, the training phase 26.7 -> 36.5 % of the
    # peak on an H100, issue 28, call 23).
    cuda = device.startswith("cuda")
    packed = cuda and varlen_available()
    trainer_cls = fast_trainer(trainer_cls, preprocess_once=True, autocast_lora=True, compile_vision=cuda,
                               trim_padding=cuda, packed=packed)
    # static rollouts: the prefill under autocast to the model's dtype, so LoRA's products there are bf16 as the
    # decode step's and RePIC's bf16 model's, not fp32 (+6.0-11.1 % tokens/s, the rollout 4.7-5.0 -> 4.0 s a step on
    # an H100; BENCHMARKS.md, issue 28, calls 19-20); nothing changes for an fp32 model (CPU runs)
    trainer_cls.prefill_autocast = True
    # on CUDA the decode step compiled, LoRA dropout included (+9.7-12.7 % tokens/s, the rollout 4.1 -> 3.5 s a step;
    # H100, BENCHMARKS.md, issue 28, call 24). RePIC's grouping puts G different prompts (915-2,553 tokens) in one
    # rollout: where the log-prob forwards are packed, the prefill is one forward of the prompts' real tokens packed
    # into one row, attention per prompt (`prefill_packed`: +11.3-12.9 % over the prefill by prompt, the rollout
    # 3.70 -> 2.97 s a step; call 27); elsewhere on CUDA one prompt at a time without its padding, the batch's images
    # in one tower call (+3.9-5.9 % over the padded batch; call 25). The CPU keeps the eager step and the padded
    # prefill.
    trainer_cls.decode_compile = cuda
    trainer_cls.prefill_packed = packed
    trainer_cls.prefill_rows = trainer_cls.prefill_vision_once = cuda and not packed
    trainer = trainer_cls(
        model=model,
        reward_funcs=rewards,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=callbacks,
    )
    if trainer.is_world_process_zero():
        print(f"train_grpo_lora: {args.per_device_train_batch_size} completions a device x {args.world_size} "
              f"processes x accumulation {args.gradient_accumulation_steps} = "
              f"{args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps} completions "
              f"an optimizer step, groups of {args.num_generations} ({grouping}), LoRA on "
              f"{len(model.targeted_module_names)} modules ({targets})", flush=True)
    # Only now, with everything built, may stale checkpoints go: a config error above keeps them. One process
    # decides (several removing the same folder would race), the others then read what it left.
    if trainer.accelerator.is_main_process:
        # by content, not by path: the same paths with a rebuilt model or redrawn images must not resume
        images = sorted({str(resolve_image(root, rel)) for sample in samples
                         for rel in (sample["image"] if isinstance(sample["image"], list) else [sample["image"]])})
        trained = {k: params.get(k) for k in TRAINING_KEYS}
        trained["grpo"] = {k: v for k, v in (trained["grpo"] or {}).items() if k not in HARDWARE_GRPO_KEYS}
        fingerprint = {"params": trained, "seed": seed, "samples": samples,
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
    counts = preprocess_counts(processor.image_processor)
    if trainer.is_world_process_zero() and counts:
        print(f"train_grpo_lora: images preprocessed {counts[0]} of {counts[1]} asked for (each distinct image once)",
              flush=True)
    if trainer.is_world_process_zero():
        # the adapter alone: with lm_head targeted, PEFT would add the (frozen, unchanged) head's full weight
        trainer.model.save_pretrained(out_dir, save_embedding_layers=False)
    return [rec for rec in trainer.state.log_history if "loss" in rec or "reward" in rec]


def heldout_rewards(model_path: str | os.PathLike, adapter_dir: str | os.PathLike, samples: list[dict[str, Any]],
                    root: str | os.PathLike, params: dict[str, Any], *, seed: int, device: str = "auto",
                    dtype: str = "auto", batch_size: int = 8) -> dict[str, Any]:
    """Base vs trained on training-format samples the run did not train on: the mean of each reward over the
    greedy answers of the base (no adapter) and of base + adapter, with the rollouts' prompts, images, answer
    length, generation backend and reward functions. `None` where no sample of that reward type was drawn."""
    from peft import PeftModel

    from repic.vlm.generation import generate_captions
    from repic.vlm.models import load_model

    examples = build_examples(samples, root, seed=seed, **params.get("resize", {}))
    conversations = [(ex["prompt"], ex["images"]) for ex in examples]
    gen = dict(batch_size=batch_size, max_new_tokens=params["grpo"].get("max_completion_length", 256),
               backend=params.get("rollout_backend", "hf"))
    processor = training_processor(model_path, params)
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
