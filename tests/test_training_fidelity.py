"""Training as RePIC trained, proved against its own code (../shared/repic_training, loaded with `ast`: its functions
and methods run here without its heavy imports): rewards, prompt building, resize, the sampler's index -> sample
mapping under `grouping: repic`, the completions an optimizer step, LoRA targets, rollout sampling (issue 22), and
the advantages, loss, KL and gradients of a training step."""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence, Sized, Union  # noqa: UP035 - RePIC's annotations

import pytest
from PIL import Image

from .conftest import REPO, SHARED, TINY_MODEL, need_shared

OPEN_R1 = SHARED / "repic_training" / "src" / "open-r1-multimodal" / "src" / "open_r1"
DATASET_PY = OPEN_R1 / "grpo_multitask_multi_img_no_format.py"
TRAINER_PY = OPEN_R1 / "trainer" / "grpo_trainer.py"
METHODS = ("yes_no", "iou", "yes_no_name", "yes_no_name_multi")


# ---------------------------------------------------------------- RePIC's code, loaded without its imports


def _exec(nodes: list[ast.stmt], path: Path, namespace: dict[str, Any]) -> dict[str, Any]:
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return namespace


def _top_level(tree: ast.Module, names: set[str]) -> list[ast.stmt]:
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            out.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets):
            out.append(node)
    return out


def _method(tree: ast.Module, cls: str, name: str) -> ast.FunctionDef:
    klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == name)


@pytest.fixture(scope="module")
def repic() -> SimpleNamespace:
    """RePIC's rewards and `LazySupervisedDataset` (its `random` is the namespace's: a test swaps in a seeded
    generator), and from its trainer: `RepeatRandomSampler`, `_get_train_sampler`, `_get_per_token_logps`,
    `compute_loss`, `find_all_linear_names` (nested in `__init__`), the image loop of
    `_generate_and_score_completions` as a function of `inputs`, its statements from the gather of the rewards to
    the advantages as a function of `rewards_per_func`, and the keywords of its rollouts' `GenerationConfig`."""
    import PIL.Image
    import torch
    import yaml

    need_shared(DATASET_PY, "RePIC's training code")
    data_tree = ast.parse(DATASET_PY.read_text(encoding="utf-8"))
    names = {"MIN_CONTENT_LEN", "IOU_THRESHOLD", "BBOX_REGEX", "yes_no_reward", "yes_no_answer_reward",
             "yes_no_answer_reward_multi", "_iou", "iou_reward", "accuracy_reward", "LazySupervisedDataset"}
    data = _exec(_top_level(data_tree, names), DATASET_PY, {
        "os": os, "re": re, "json": json, "yaml": yaml, "random": random.Random(0), "torch": torch,
        "Image": PIL.Image, "Dataset": object, "GRPOScriptArguments": object, "datetime": datetime,
        "Any": Any, "Dict": dict, "List": list, "Sequence": Sequence, "Union": Union})

    trainer_tree = ast.parse(TRAINER_PY.read_text(encoding="utf-8"))
    init = _method(trainer_tree, "Qwen2VLGRPOTrainer", "__init__")
    find_all = next(n for n in ast.walk(init) if isinstance(n, ast.FunctionDef) and n.name == "find_all_linear_names")
    generation_call = next(n for n in ast.walk(init) if isinstance(n, ast.Call)
                           and getattr(n.func, "id", None) == "GenerationConfig")
    score = _method(trainer_tree, "Qwen2VLGRPOTrainer", "_generate_and_score_completions")
    loop = next(n for n in score.body if isinstance(n, ast.For))  # `for x in inputs:` -> `images`
    images_fn = ast.parse("def prepare_images(inputs):\n    images = []\n    return images").body[0]
    images_fn.body.insert(1, loop)
    # the advantages: from the gather of every process's rewards to `advantages = ...`, as a function of them
    first = next(i for i, n in enumerate(score.body) if isinstance(n, ast.Assign)
                 and ast.unparse(n.value) == "self.accelerator.gather(rewards_per_func)")
    last = next(i for i, n in enumerate(score.body) if isinstance(n, ast.Assign)
                and ast.unparse(n.targets[0]) == "advantages")
    advantages_fn = ast.parse("def advantages(self, rewards_per_func):\n    return advantages").body[0]
    advantages_fn.body[:0] = score.body[first:last + 1]
    methods = [_method(trainer_tree, "Qwen2VLGRPOTrainer", m)
               for m in ("_get_train_sampler", "_get_per_token_logps", "compute_loss")]
    ast.fix_missing_locations(images_fn)
    ast.fix_missing_locations(advantages_fn)
    trainer = _exec([*_top_level(trainer_tree, {"RepeatRandomSampler"}), find_all, images_fn, advantages_fn,
                     *methods],
                    TRAINER_PY, {"torch": torch, "PIL": PIL, "Sampler": object, "Sized": Sized, "Optional": Optional})
    return SimpleNamespace(
        data=data, accuracy_reward=data["accuracy_reward"], dataset=data["LazySupervisedDataset"],
        sampler=trainer["_get_train_sampler"], per_token_logps=trainer["_get_per_token_logps"],
        advantages=trainer["advantages"], compute_loss=trainer["compute_loss"],
        find_all_linear_names=trainer["find_all_linear_names"], prepare_images=trainer["prepare_images"],
        generation_keywords={k.arg: ast.literal_eval(k.value) if isinstance(k.value, ast.Constant) else None
                             for k in generation_call.keywords})


# ---------------------------------------------------------------- 7. rewards


def _reward_cases(n: int, seed: int = 0) -> list[tuple[str, Any, str]]:
    """Answers built of the fragments the four rewards look at, around the 100-character ICT gate, with
    RePIC-format solutions of every method."""
    rng = random.Random(seed)
    fragments = ["yes", "no", "Yes", "NO", "know", "not", "nothing", "Yes.", "[10, 20, 110, 220]", "[0,0,5,5]",
                 "[10, 20, 111, 221]", "[12,22, 108 ,218]", "[11, 20, 12, 220]", "[-1, 2, 3, 4]",
                 '{"bbox_2d": [9, 19, 109, 219]}', "[1.5, 2, 3, 4]", "<bo>", "</bo>", "<mam>", "bo", "<bo>'s",
                 "<bob>", "<x.y>", "(", ".*", "\n", "a", "The photo shows ", "sitting on the grass next to "]
    solutions = {
        "yes_no": ["yes", "no", "Yes", "No.", "maybe", ""],
        "iou": [[10, 20, 110, 220], [0, 0, 5, 5], [11, 20, 12, 220], [0, 0, 0, 0], [5, 5, 1, 1]],
        "yes_no_name": ["<bo>", "<mam>", "bo", "<x.y>", "<bob>"],
        "yes_no_name_multi": [["<bo>"], ["<bo>", "<mam>"], ["<bo>", "<mam>", "<x.y>"], [], ["bo", "<bob>"]],
    }
    cases = []
    for _ in range(n):
        text = "".join(rng.choice(fragments) + rng.choice(["", " ", ", "]) for _ in range(rng.randint(0, 8)))
        text += "z" * rng.choice([0, 0, 40, 80, 95, 99, 100, 120])
        method = rng.choice(METHODS)
        cases.append((text, rng.choice(solutions[method]), method))
    return cases


def test_rewards_equal_repic_accuracy_reward_per_sample(repic, monkeypatch):
    """Per sample, the sum of our three rewards (TRL sums the reward functions, None -> NaN -> left out) equals
    RePIC's `accuracy_reward`, on 6,000 generated RePIC-format cases; exactly one of ours scores each sample."""
    from repic.train.grpo import reward_functions

    monkeypatch.delenv("DEBUG_MODE", raising=False)  # RePIC's reward would log every call
    cases = _reward_cases(6000)
    completions = [[{"role": "assistant", "content": text}] for text, _, _ in cases]
    theirs = repic.accuracy_reward(completions, [sol for _, sol, _ in cases],
                                   accu_reward_method=[m for _, _, m in cases])
    ours = [fn(completions, [json.dumps(sol) for _, sol, _ in cases], [m for _, _, m in cases])
            for fn in reward_functions(["object_consistency", "visual_localization", "identity_consistency"],
                                       "repic")]
    for i, case in enumerate(cases):
        scored = [values[i] for values in ours if values[i] is not None]
        assert len(scored) == 1 and scored[0] == theirs[i], case
    for method in METHODS:  # the cases reach both outcomes of every reward
        values = {theirs[i] > 0 for i, case in enumerate(cases) if case[2] == method}
        assert values == {False, True}, method


# ---------------------------------------------------------------- 6. prompts


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "data").mkdir()
    for i, size in enumerate([(64, 48), (30, 90), (600, 520), (8, 6)]):  # one over 512: resized
        Image.new("RGB", size, (60 * i, 100, 50)).save(root / f"data/{i}.png")
    return root


def _image_specs() -> list[Any]:
    """A single image (not a list), and lists of 1-4 images."""
    return ["./data/0.png", ["./data/1.png"], ["./data/0.png", "./data/2.png"],
            ["./data/1.png", "./data/2.png", "./data/3.png"], [f"./data/{i}.png" for i in range(4)]]


def _repic_getitem(repic, sample: dict, root: Path, rng: random.Random) -> dict:
    repic.data["random"] = rng
    dataset = object.__new__(repic.dataset)
    dataset.list_data_dict = [dict(sample)]
    dataset.script_args = SimpleNamespace(image_root=str(root))
    return dataset[0]


def test_prompts_equal_repic_getitem_by_method_and_image_count(repic, image_root):
    """Text and image slots of every method x image count (single, lists of 1-4) equal RePIC's `__getitem__`, ICT
    texts included (drawn from the same generator state); images passed are RePIC's, except where it gives one slot
    to several images (`iou`: we pass the slot's image alone)."""
    from repic.train.grpo import sample_example

    routes = set()
    for method in METHODS:
        for spec in _image_specs():
            for seed in range(12):
                sample = {"image": spec, "problem": f"Is <bo> in image {seed}?", "solution": "yes",
                          "accu_reward_method": method}
                theirs = _repic_getitem(repic, sample, image_root, random.Random(seed))
                ours = sample_example(sample, image_root, random.Random(seed))
                slots = [p for p in ours["prompt"][0]["content"] if p["type"] == "image"]
                assert ours["prompt"][0]["content"][:-1] == theirs["prompt"][0]["content"][:-1], (method, spec)
                assert ours["prompt"][0]["content"][-1] == theirs["prompt"][0]["content"][-1], (method, spec)
                their_images = theirs["image"] if isinstance(theirs["image"], list) else [theirs["image"]]
                resized = repic.prepare_images([theirs])[0]  # what RePIC's processor got
                resized = resized if isinstance(resized, list) else [resized]
                assert len(ours["images"]) == len(slots)
                assert [im.size for im in ours["images"]] == [im.size for im in resized[:len(slots)]]
                if len(slots) != len(their_images):
                    assert method == "iou" and len(their_images) > 1 and len(slots) == 1
                routes.add((method, len(their_images), len(slots), ours["prompt"][0]["content"][-1]["text"]
                            .removeprefix(sample["problem"])))
    # the three routes the issue names: multi-image iou -> one slot, single-image multi-ICT -> the box suffix
    assert ("iou", 3, 1, " For bounding box coordinates, return the final answer in JSON format.") in routes
    assert ("yes_no_name_multi", 1, 1, " For bounding box coordinates, return the final answer in JSON format.") \
        in routes
    assert {r[3] for r in routes if r[0] == "yes_no_name"} == {
        "", " Output the final answer including its name.",
        " Output the final answer without duplicating the given information."}


def test_ict_suffix_distribution_and_draw_at_every_fetch(repic, image_root):
    """RePIC draws the ICT suffix at every `__getitem__` (per epoch, per process): the same sample fetched again
    gets a fresh draw, with randint(0, 4)'s 1/5, 1/5, 3/5. Ours draws at every fetch too (`fetching_trainer`),
    keyed on the optimizer step and the row's place in the global generation batch: the same at 1 or 8 processes;
    one draw a group under `grpo` (a group is one prompt), one a row under `repic` (each row its process's fetch)."""
    from repic.train.grpo import fetching_trainer, sample_example

    sample = {"image": ["./data/3.png", "./data/3.png"], "problem": "Describe <bo>.", "solution": "<bo>",
              "accu_reward_method": "yes_no_name"}
    rng_theirs, rng_ours = random.Random(5), random.Random(5)
    theirs = [_repic_getitem(repic, sample, image_root, rng_theirs)["prompt"][0]["content"][-1]["text"]
              for _ in range(1000)]
    ours = [sample_example(sample, image_root, rng_ours)["prompt"][0]["content"][-1]["text"] for _ in range(1000)]
    assert ours == theirs  # fetch after fetch, the same sequence of draws
    counts = {t: theirs.count(t) / len(theirs) for t in set(theirs)}
    assert sorted(counts.values()) == pytest.approx([0.2, 0.2, 0.6], abs=0.05)

    class Base:
        def _prepare_inputs(self, batch):
            return batch

    samples = [dict(sample, problem=f"Describe <bo> {i}.") for i in range(16)]

    def fetch(grouping: str, step: int, world: int, rows: list[int]) -> list[str]:
        cls = fetching_trainer(Base, samples, image_root, seed=3, grouping=grouping, resize={})
        texts = []
        per = len(rows) // world
        for k in range(world):
            trainer = cls()
            trainer.accelerator = SimpleNamespace(process_index=k)
            trainer.state = SimpleNamespace(global_step=step)
            trainer.num_generations = 8
            texts += [ex["prompt"][0]["content"][-1]["text"]
                      for ex in trainer._prepare_inputs([{"sample": i} for i in rows[k * per:(k + 1) * per]])]
        return texts

    rows = list(range(16))
    for grouping in ("repic", "grpo"):
        assert fetch(grouping, 4, 1, rows) == fetch(grouping, 4, 8, rows)  # 1 process or 8: the same draws
    # one sample fetched at 40 steps: every suffix comes up (a draw per fetch, not per example)
    assert len({fetch("repic", step, 1, [0])[0] for step in range(40)}) == 3
    # grpo: the 8 copies of a prompt share the draw; repic: 8 rows, 8 draws
    group = fetch("grpo", 9, 1, [0] * 8)
    assert len(set(group)) == 1
    assert any(len(set(fetch("repic", step, 1, [0] * 8))) > 1 for step in range(5))


# ---------------------------------------------------------------- 5. resize


def test_resize_equals_repic_prepare_inputs(repic, tmp_path):
    """Sizes and pixels (LANCZOS, int() truncation, short side set to 512 for an image of a list of any length,
    1024 for a single image; small short sides enlarged) equal RePIC's `_generate_and_score_completions` loop."""
    import numpy as np

    from repic.train.grpo import resize_for_training, sample_example

    rng = np.random.default_rng(0)
    sides = [300, 512, 513, 777, 1024, 1025, 1600]
    changed = 0
    for w in sides:
        for h in sides:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for in_list in (False, True):
                theirs = repic.prepare_images([{"image": [img] if in_list else img}])[0]
                theirs = theirs[0] if in_list else theirs
                ours = resize_for_training(img, in_list)
                assert ours.size == theirs.size and ours.tobytes() == theirs.tobytes(), (w, h, in_list)
                changed += ours.size != img.size
    assert changed > 40
    assert resize_for_training(Image.new("RGB", (400, 900)), True).size == (512, 1152)  # enlarged
    # through the training path: a list of any length (one included) at 512, a single image at 1024
    (tmp_path / "d").mkdir()
    Image.new("RGB", (1200, 700), "red").save(tmp_path / "d/a.png")
    Image.new("RGB", (600, 2000), "blue").save(tmp_path / "d/b.png")
    for spec, sizes in [("./d/a.png", [(1755, 1024)]), (["./d/a.png"], [(877, 512)]),
                        (["./d/b.png", "./d/a.png"], [(512, 1706), (877, 512)])]:
        ex = sample_example({"image": spec, "problem": "Is it?", "solution": "yes", "accu_reward_method": "yes_no"},
                            tmp_path, random.Random(0))
        assert [im.size for im in ex["images"]] == sizes
        assert ex["image_size"] == list(Image.open(tmp_path / (spec if isinstance(spec, str) else spec[-1])).size)
        assert ex["resized_size"] == list(sizes[-1])


# ---------------------------------------------------------------- 1-2. batch and groups


def _world_sizes(params: dict) -> dict[str, int]:
    """Processes of the paper's three launches: its `accelerate launch --num_processes 8`, 1 GPU (`launch:
    python`), and 2 nodes x 8 GPUs through workflow/multinode.py's flags."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("_repic_multinode", REPO / "workflow" / "multinode.py")
    multinode = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = multinode  # its dataclasses look their module up
    try:
        spec.loader.exec_module(multinode)
    finally:
        del sys.modules[spec.name]

    def processes(command: str) -> int:
        m = re.search(r"--num_processes[ =](\d+)", command)
        return int(m.group(1)) if m else 1

    flags = multinode.machine_flags(2, 0, 8, ("10.0.0.1", 29500))
    return {"8 GPUs": processes(params["train_grpo_lora"]["launch"]), "1 GPU": processes("python"),
            "2 nodes": processes(" ".join(flags))}


@pytest.fixture(scope="module")
def paper(tmp_path_factory) -> dict:
    from repic.core.params import apply_overlay

    path = tmp_path_factory.mktemp("paper") / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    return apply_overlay(path, REPO / "configs" / "paper.yaml")


def test_paper_run_makes_16_completions_per_optimizer_step_at_1_8_and_16_processes(repic, paper, tmp_path):
    """RePIC: 8 processes x 1 completion x accumulation 2 = 16 completions, its sampler 16 // 8 = 2 prompt indices
    an optimizer step. `make paper` on 8 GPUs, on 1 GPU and on 2 nodes: the built GRPOConfig gives 16 completions
    an optimizer step, and RePIC's own `_get_train_sampler` given those settings hands out 2 indices a step."""
    from repic.core.params import grpo_config
    from repic.train.grpo import batch_plan

    train = paper["train_grpo_lora"]
    assert train["grouping"] == "repic" and train["completions_per_step"] == 16
    worlds = _world_sizes(paper)
    assert worlds == {"8 GPUs": 8, "1 GPU": 1, "2 nodes": 16}
    for where, world in worlds.items():
        plan = batch_plan(train["grpo"], train["completions_per_step"], world)
        per_device, accum = plan["per_device_train_batch_size"], plan["gradient_accumulation_steps"]
        assert per_device * world * accum == 16, where
        if world == 1:  # GRPOConfig's own checks see this process alone: built as the 1-GPU run builds it
            args = grpo_config({**plan, "bf16": False, "report_to": "none"}, tmp_path, use_cpu=True)
            assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, 2)
            assert args.generation_batch_size == 16 and args.steps_per_generation == 2  # one rollout batch a step
        fake = SimpleNamespace(args=SimpleNamespace(per_device_train_batch_size=per_device,
                                                    gradient_accumulation_steps=accum, seed=0),
                               accelerator=SimpleNamespace(num_processes=world), num_generations=8,
                               num_iterations=1, train_dataset=range(2000))
        sampler = repic.sampler(fake)
        assert sampler.batch_size == 2, where  # RePIC's prompt indices an optimizer step
        assert len(list(iter(sampler))) // (sampler.batch_size * 8) == 1000  # 2K samples: 1,000 steps an epoch
    assert batch_plan(train["grpo"], 16, 1)["per_device_train_batch_size"] == 8  # 1 GPU: 8 x accumulation 2


def _trl_stream(lookup, n: int, seed: int, world: int, per_device: int, accum: int, epochs: int) -> list:
    """Our training sampler (TRL's `_get_train_sampler` through `epoch_seeded`), cut by accelerate's own
    `BatchSamplerShard` as the Trainer's dataloader is: per optimizer step, the rollout batch (the first fetch of
    its `accum`) gathered over processes in process order, as TRL gathers rewards."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler
    from trl import GRPOTrainer

    from repic.train.grpo import epoch_seeded

    class Base:
        def _get_train_sampler(self, dataset=None):
            return GRPOTrainer._get_train_sampler(self, dataset)

    cls = epoch_seeded(Base, lookup)
    trainer = cls()
    trainer.args = SimpleNamespace(generation_batch_size=per_device * world * accum, steps_per_generation=accum,
                                   seed=seed)
    trainer.num_generations, trainer.num_iterations, trainer.shuffle_dataset = 8, 1, True
    trainer.train_dataset = list(range(n))
    sampler = trainer._get_train_sampler()
    steps = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        shards = [list(BatchSamplerShard(BatchSampler(sampler, per_device * accum, drop_last=False), world, k))
                  for k in range(world)]
        for fetch in range(0, len(shards[0]), accum):
            steps.append([i for k in range(world) for i in shards[k][fetch]])
    return steps


def test_repic_grouping_maps_indices_as_8_repic_processes_did(repic, paper):
    """RePIC at 8 processes: the sampler gives every process the same index, each looks it up in its own
    shuffled list, the 8 rewards are gathered and normalised as one group: 8 different samples. Emulated with
    RePIC's own sampler and 8 per-process lists (`repic_lookup`; RePIC's shuffles were unseeded), the groups of
    every optimizer step over 2 epochs equal ours at 1, 8 and 16 processes; `grpo` groups are one sample x 8."""
    from repic.train.grpo import batch_plan, repic_lookup

    n, seed = 40, 7
    lookup = repic_lookup(n, 8, seed)
    assert all(sorted(order) == list(range(n)) for order in lookup) and len({tuple(o) for o in lookup}) == 8
    fake = SimpleNamespace(args=SimpleNamespace(per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                                seed=seed),
                           accelerator=SimpleNamespace(num_processes=8), num_generations=8, num_iterations=1,
                           train_dataset=list(range(n)))
    sampler = repic.sampler(fake)
    theirs, indices = [], []
    for _epoch in range(2):  # RePIC's generator runs on: epoch 2 is its second permutation
        stream = list(iter(sampler))
        micro = [[lookup[p][stream[t + p]] for p in range(8)] for t in range(0, len(stream), 8)]  # 1 a process
        indices += [[stream[t], stream[t + 8]] for t in range(0, len(stream), 16)]
        theirs += [micro[s] + micro[s + 1] for s in range(0, len(micro), 2)]  # accumulation 2: one step
    assert len(theirs) == 2 * n // 2
    grpo = paper["train_grpo_lora"]["grpo"]
    for world in (1, 8, 16):
        plan = batch_plan(grpo, 16, world)
        ours = _trl_stream(lookup, n, seed, world, plan["per_device_train_batch_size"],
                           plan["gradient_accumulation_steps"], epochs=2)
        assert ours == theirs, world
        assert all(len(step) == 16 for step in ours)
    # grpo grouping: the same sampler without the lookup: each group is one sample 8 times, RePIC's indices
    true = _trl_stream(None, n, seed, 1, 8, 2, epochs=2)
    assert all(len(set(step[g:g + 8])) == 1 for step in true for g in (0, 8))
    assert [[step[0], step[8]] for step in true] == indices


# ---------------------------------------------------------------- 3. LoRA targets


def test_lora_targets_equal_repic_find_all_linear_names(repic, tiny_model_dir):
    """On the tiny Qwen2.5-VL: RePIC's `find_all_linear_names(model, ["visual"])` = ours (`lora_targets: repic`),
    lm_head included, no vision module; the PEFT model built from them adapts exactly those modules."""
    from peft import get_peft_model

    from repic.core.params import lora_config
    from repic.train.grpo import repic_lora_targets
    from repic.vlm.models import load_model

    model = load_model(tiny_model_dir, device="cpu")
    theirs = repic.find_all_linear_names(model, ["visual"])
    ours = repic_lora_targets(model)
    assert sorted(theirs) == ours and len(ours) == 7 * TINY_MODEL["num_hidden_layers"] + 1
    assert "lm_head" in ours and not any("visual" in n for n in ours)
    config = lora_config({"r": 4, "lora_alpha": 8})
    config.target_modules = ours
    peft = get_peft_model(model, config)
    assert sorted(peft.targeted_module_names) == ours


# ---------------------------------------------------------------- 4. rollout sampling


def test_rollout_sampling_is_repics(repic, paper, tmp_path):
    """RePIC's rollouts: `GenerationConfig(max_new_tokens, do_sample=True, temperature=1, pad_token_id)` in
    transformers 4.49, whose other defaults apply (top-k 50, top-p 1.0, repetition penalty 1.0), with the model
    in training mode. The paper config builds the same, and keeps LoRA dropout on in rollouts."""
    from repic.core.params import grpo_config
    from repic.train.grpo import batch_plan

    assert set(repic.generation_keywords) == {"max_new_tokens", "do_sample", "temperature", "pad_token_id"}
    assert repic.generation_keywords["do_sample"] is True and repic.generation_keywords["temperature"] == 1
    train = paper["train_grpo_lora"]
    args = grpo_config({**batch_plan(train["grpo"], 16, 1), "bf16": False, "report_to": "none"}, tmp_path,
                       use_cpu=True)
    transformers_4_49_defaults = {"top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "min_p": None}
    assert {k: getattr(args, k) for k in transformers_4_49_defaults} == transformers_4_49_defaults
    assert args.temperature == 1.0 and args.max_completion_length == 256
    assert train["rollout_dropout"] is True and train["rollout_backend"] == "static"


def test_static_rollouts_keep_training_mode_when_asked(tiny_model_dir, monkeypatch):
    """`rollout_dropout: true`: the static backend samples with the model as it is (training mode: LoRA dropout
    active), as TRL's `hf` path and RePIC's did; false: eval mode, and restored afterwards either way."""
    import torch

    from repic.train.grpo import rollout_mode
    from repic.vlm import generation
    from repic.vlm.models import load_model, load_processor

    model = load_model(tiny_model_dir, device="cpu").train()
    processor = load_processor(tiny_model_dir)
    inputs = processor.apply_chat_template([[{"role": "user", "content": [{"type": "text", "text": "yes"}]}]],
                                           add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", padding=True)
    seen = []
    original = generation._static_generate_eval
    monkeypatch.setattr(generation, "_static_generate_eval",
                        lambda core, *a, **k: seen.append(core.training) or original(core, *a, **k))
    for keep in (True, False):
        generation.generate_ids(model, inputs, backend="static", max_new_tokens=2, keep_mode=keep, do_sample=False)
    assert seen == [True, False] and model.training
    assert all(m.training for m in model.modules())
    assert rollout_mode(generation.rollout_trainer(object, "static"), True).rollout_keep_mode is True

    class Base:
        def _generate_single_turn(self):
            return self.model.training

    for dropout in (True, False):
        trainer = rollout_mode(Base, dropout)()
        trainer.model = torch.nn.Linear(1, 1).train()
        assert trainer._generate_single_turn() is dropout and trainer.model.training


# ---------------------------------------------------------------- 3. an adapter on lm_head is really trained


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL with its own lm_head (RePIC's 7B has one; the default tiny base ties it)."""
    from repic.synthetic.tiny_model import build_tiny_model

    texts = ["This is the query image. Name: <zorp>, Info: a red toy. yes no caption"] * 20
    return build_tiny_model(tmp_path_factory.mktemp("untied") / "model", texts,
                            {**TINY_MODEL, "tie_word_embeddings": False}, seed=0)


def test_lm_head_adapter_log_probs_equal_repic_and_it_trains(repic, untied_model_dir, tmp_path, monkeypatch):
    """TRL 1.16 computes log-probabilities from `lm_head.weight` (its fused head) and refuses an adapter there.
    Ours: the completion tokens' log-probs through the adapted head equal RePIC's `_get_per_token_logps` (the
    model's logits, log-softmax), where TRL's fused head misses the adapter; and a training run with
    `lora_targets: repic` (and the paper config's static rollouts, whose prefill the stage runs under autocast)
    moves the lm_head adapter."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from repic.core.params import grpo_config, lora_config
    from repic.train.grpo import install_lora_head_logps, repic_lora_targets, train
    from repic.train.rewards import REWARD_REGISTRY
    from repic.vlm.generation import _core
    from repic.vlm.models import load_model

    from .test_train import _tiny_params, _tiny_samples, text_variety

    base = load_model(untied_model_dir, device="cpu", dtype="float32")
    config = lora_config({"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    config.target_modules = repic_lora_targets(base)
    model = get_peft_model(base, config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = torch.randint(10, base.config.get_text_config().vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100  # the completion: the last 6 tokens
    theirs = repic.per_token_logps(None, model, ids, mask, None, None)[:, 5:]
    core = _core(model)
    add_fused_lm_head(core)
    trl_fused = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs[:, 5:]
    assert (trl_fused - theirs).abs().max() > 1e-3  # TRL's fused head leaves the lm_head adapter out
    install_lora_head_logps(core, 1.0)
    ours = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs[:, 5:]
    assert torch.allclose(ours, theirs, atol=1e-5)
    with pytest.raises(ValueError, match="lm_head"):  # TRL alone refuses the adapter
        GRPOTrainer(model=get_peft_model(load_model(untied_model_dir, device="cpu"), config),
                    reward_funcs=[text_variety],
                    args=grpo_config({"bf16": False, "num_generations": 2, "per_device_train_batch_size": 2},
                                     tmp_path / "trl", use_cpu=True))

    monkeypatch.setitem(REWARD_REGISTRY, "text_variety", lambda protocol: text_variety)
    params = {**_tiny_params(max_steps=2), "rewards": ["text_variety"], "lora_targets": "repic",
              "grouping": "repic", "completions_per_step": 2, "rollout_dropout": True, "rollout_backend": "static"}
    params["grpo"] = {k: v for k, v in params["grpo"].items() if k != "per_device_train_batch_size"}
    from repic.vlm import generation

    rollouts = []  # the training stage's static rollouts: their prefill under autocast (a no-op for this fp32 model)
    generate_ids = generation.generate_ids
    monkeypatch.setattr(generation, "generate_ids",
                        lambda *a, **kw: rollouts.append(kw["prefill_autocast"]) or generate_ids(*a, **kw))
    train(untied_model_dir, _tiny_samples(tmp_path), tmp_path, tmp_path / "adapter", params,
          checkpoint_dir=tmp_path / "ck", seed=0, device="cpu")
    assert rollouts and all(rollouts)
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    head = [k for k in weights if "lm_head" in k and "lora_B" in k]
    assert head and all(weights[k].abs().sum() > 0 for k in head)  # lora_B starts at 0: it was trained
    assert all("lora_" in k for k in weights)  # the adapter alone, not the frozen head's weight


def test_rollout_dropout_reaches_every_adapter_of_the_static_decode(untied_model_dir):
    """LoRA dropout in rollouts must act where PEFT's forward would, in the static backend's own decode step too
    (its projections bypass PEFT's forward). With dropout p = 1 every adapter's input is zero: in training mode
    (`keep_mode`) the static backend and TRL's `hf` path then decode as the base model, in eval mode as the
    adapted one."""
    import torch
    from peft import LoraConfig, get_peft_model

    from repic.train.grpo import repic_lora_targets
    from repic.vlm.generation import generate_ids
    from repic.vlm.models import load_model, load_processor

    base = load_model(untied_model_dir, device="cpu", dtype="float32")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=1.0,
                                            target_modules=repic_lora_targets(base)))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1.0)
    processor = load_processor(untied_model_dir)
    inputs = processor.apply_chat_template(
        [[{"role": "user", "content": [{"type": "text", "text": t}]}] for t in ("yes no caption", "Name: <zorp>")],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    greedy = dict(max_new_tokens=6, do_sample=False)
    model.eval()
    adapted = generate_ids(model, inputs, backend="static", **greedy)
    with model.disable_adapter():
        plain = generate_ids(model, inputs, backend="static", **greedy)
    assert adapted != plain  # the adapters change the answers
    model.train()
    assert generate_ids(model, inputs, backend="static", keep_mode=True, **greedy) == plain
    assert generate_ids(model, inputs, backend="hf", **greedy) == plain  # TRL's path, in training mode
    assert generate_ids(model, inputs, backend="static", **greedy) == adapted  # eval mode inside, by default


# ---------------------------------------------------------------- advantages, loss, KL


def _repic_config_defaults() -> dict[str, Any]:
    """RePIC's GRPOConfig field defaults (its grpo_config.py) overridden by its launch script's flags, and its
    GRPOScriptArguments' image processor bounds."""
    tree = ast.parse((OPEN_R1 / "trainer" / "grpo_config.py").read_text(encoding="utf-8"))
    defaults = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Call):
            for kw in node.value.keywords:
                if kw.arg == "default" and isinstance(kw.value, ast.Constant):
                    defaults[node.target.id] = kw.value.value
    script_args = ast.parse(DATASET_PY.read_text(encoding="utf-8"))  # GRPOScriptArguments: the processor's bounds
    klass = next(n for n in script_args.body if isinstance(n, ast.ClassDef) and n.name == "GRPOScriptArguments")
    for node in klass.body:
        if isinstance(node, ast.AnnAssign) and node.target.id in ("min_pixels", "max_pixels"):
            defaults[node.target.id] = next(ast.literal_eval(kw.value) for kw in node.value.keywords
                                            if kw.arg == "default")
    script = (OPEN_R1.parents[1] / "run_scripts" / "RePIC_training_lora.sh").read_text(encoding="utf-8")
    for key in ("beta", "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps"):
        defaults[key] = float(re.search(rf"--{key} (\S+)", script).group(1))
    return defaults


def test_advantages_loss_kl_and_gradients_equal_repic_compute_loss(repic, paper, untied_model_dir, tmp_path,
                                                                    monkeypatch):
    """The paper recipe's optimizer step as RePIC's trainer takes it. Our training stage runs two steps of the
    paper config (its `train_grpo_lora` section whole, but for sizes and CPU settings: G = 8, 16 completions a
    step, 8 x accumulation 2 on one process, `grouping: repic`, lm_head adapted, static rollouts) on the tiny
    model, and its second step (the adapter moved, so the KL term is live) is recorded: the rows, the rewards, TRL's
    rollout batch, the adapter, the loss and the LoRA gradients before clipping. RePIC's code, run from its source
    on the same rollouts, gives the same: its prompt text and processor call (its pixel bounds) the same prompt
    tokens and pixels; its statements from the gather of the rewards to `(r - mean) / (std + 1e-4)` per group of 8
    the same advantages; its `_get_per_token_logps` with the adapter disabled the same reference log-probs; its
    `compute_loss` (clipped ratio at its GRPOConfig's epsilon, k3 KL at its script's beta, per-sequence token
    mean), one completion a call, unpadded, as each of its 8 processes ran at accumulation 2, then reduced as
    DeepSpeed does (summed over micro-steps / accumulation, averaged over processes), the same loss and gradients.
    TRL 1.16's default `use_bias_correction_kl: true` (the KL term times the importance ratio, whose gradient is
    not zero on-policy) moves these gradients by ~4e-4 of their scale, over 1000x this test's rounding
    (~2e-7): the paper config turns it off."""
    from collections import defaultdict

    import numpy as np
    import torch
    import transformers
    from transformers.image_utils import SizeDict
    from trl import GRPOTrainer

    from repic.train.grpo import lora_model, train
    from repic.train.rewards import REWARD_REGISTRY
    from repic.vlm.models import load_model, load_processor

    from .test_train import _tiny_samples, text_variety

    theirs = _repic_config_defaults()
    train_params = paper["train_grpo_lora"]
    ours = train_params["grpo"]
    assert (train_params["min_pixels"], train_params["max_pixels"]) == (theirs["min_pixels"], theirs["max_pixels"])
    assert (ours["beta"], ours["num_generations"], train_params["completions_per_step"]) == (
        theirs["beta"], theirs["num_generations"],
        theirs["num_generations"] * theirs["per_device_train_batch_size"] * theirs["gradient_accumulation_steps"])

    records: dict[str, list] = defaultdict(list)

    def record(owner, name, keep=None):
        original = getattr(owner, name)

        def wrapped(self, *args, **kwargs):
            if keep is None:  # the gradients as they reach clipping
                records[name].append((self.state.global_step, {n: p.grad.detach().clone() for n, p in
                                      self.model.named_parameters() if p.requires_grad}))
            out = original(self, *args, **kwargs)
            if keep is not None:
                records[name].append((self.state.global_step, keep(self, args, out)))
            return out
        monkeypatch.setattr(owner, name, wrapped)

    def rows_adapter_and_batch(self, args, out):  # the rows as RePIC's `__getitem__` built them, and the rollout
        weights = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return args[0], weights, {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in out.items()}

    record(GRPOTrainer, "_generate_and_score_completions", rows_adapter_and_batch)
    record(GRPOTrainer, "_calculate_rewards", lambda self, args, out: out.detach().clone())
    record(GRPOTrainer, "_compute_loss", lambda self, args, out: (out.detach().clone(), self.epsilon_low,
                                                                   self.epsilon_high, self.num_iterations, self.beta))
    record(transformers.Trainer, "_clip_grad_norm")
    monkeypatch.setitem(REWARD_REGISTRY, "text_variety", lambda protocol: text_variety)
    sizes = {"max_completion_length": 6, "max_steps": 2, "bf16": False, "gradient_checkpointing": False,
             "dataloader_num_workers": 0, "report_to": "none", "save_strategy": "no",
             "learning_rate": 1e-2}  # the adapter moves enough in one step for the KL term to show
    grpo = {**{k: v for k, v in ours.items() if k not in ("num_train_epochs", "save_steps", "save_total_limit")},
            **sizes}
    params = {**train_params, "rewards": ["text_variety"], "grpo": grpo,
              "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}}  # RePIC's 0.05 draws masks: none here
    samples = _tiny_samples(tmp_path)  # prompts of several lengths (left padding): 1 or 2 images, ICT suffixes
    rng = np.random.default_rng(0)
    for i, sample in enumerate(samples[::2]):  # single images over the tiny base's own max_pixels (12,544)
        Image.fromarray(rng.integers(0, 256, (168, 224, 3), dtype=np.uint8)).save(tmp_path / f"data/big{i}.png")
        sample.update(image=f"./data/big{i}.png", accu_reward_method="yes_no_name", solution=f"<x{i}>",
                      problem=f"Who is in the image? Answer with a name{', please' * i}.")
    train(untied_model_dir, samples, tmp_path, tmp_path / "adapter", params, checkpoint_dir=tmp_path / "ck",
          seed=0, device="cpu")

    step = 1
    (rows, weights, batch), = [r for s, r in records["_generate_and_score_completions"] if s == step]
    rewards_per_func, = [r for s, r in records["_calculate_rewards"] if s == step]
    losses = [r for s, r in records["_compute_loss"] if s == step]
    trl_grads, = [r for s, r in records["_clip_grad_norm"] if s == step]
    n = len(batch["completion_ids"])
    processes = int(theirs["num_generations"])  # RePIC: one completion a process, a group = the 8 processes
    accumulation = n // processes
    assert n == 16 and len(losses) == accumulation == theirs["gradient_accumulation_steps"]
    assert {(eps_low, eps_high, iterations, beta) for _, eps_low, eps_high, iterations, beta in losses} == {
        (theirs["epsilon"], theirs["epsilon"], theirs["num_iterations"], theirs["beta"])}

    # the prompts: RePIC's text (its TRL's `maybe_apply_chat_template` of a conversational prompt: the chat template
    # with the generation prompt) and processor call give TRL 1.16's prompt tokens and pixels
    processor = load_processor(untied_model_dir)  # with RePIC's bounds (4.49's `min_pixels`/`max_pixels`: 5's `size`)
    processor.image_processor.size = SizeDict(shortest_edge=theirs["min_pixels"], longest_edge=theirs["max_pixels"])
    texts = [processor.apply_chat_template(x["prompt"], tokenize=False, add_generation_prompt=True) for x in rows]
    theirs_inputs = processor(text=texts, images=[x["images"] for x in rows], return_tensors="pt", padding=True,
                              padding_side="left", add_special_tokens=False)
    assert len(set(batch["prompt_mask"].sum(1).tolist())) > 2  # prompts of several lengths, left padded
    assert max(int(t.prod()) for t in batch["image_grid_thw"]) * 14 * 14 > 12544  # the bounds are RePIC's
    assert torch.equal(theirs_inputs["input_ids"], batch["prompt_ids"])
    assert torch.equal(theirs_inputs["attention_mask"], batch["prompt_mask"])
    assert torch.equal(theirs_inputs["pixel_values"], batch["pixel_values"])
    assert torch.equal(theirs_inputs["image_grid_thw"], batch["image_grid_thw"])

    # the advantages: RePIC's statements on the same rewards (one reward function here, so its sum is the reward)
    fake = SimpleNamespace(num_generations=processes, accelerator=SimpleNamespace(gather=lambda t: t))
    advantages = repic.advantages(fake, rewards_per_func)
    assert advantages.abs().max() > 0.1  # rewards with spread: the policy term is live
    assert torch.allclose(batch["advantages"], advantages, atol=1e-6, rtol=1e-6)

    # the same adapter, and RePIC's model call: transformers 5 takes Qwen2.5-VL's 3D positions from
    # `mm_token_type_ids`, which 4.49 derived from the image tokens of `input_ids`
    torch.manual_seed(0)
    model = lora_model(load_model(untied_model_dir, device="cpu", dtype="float32").train(), params)
    assert not model.load_state_dict(weights, strict=False).unexpected_keys
    image_token = model.config.image_token_id

    def repic_model(input_ids, **kwargs):
        return model(input_ids=input_ids, mm_token_type_ids=(input_ids == image_token).long(), **kwargs)

    metrics: dict[str, list] = defaultdict(list)
    self = SimpleNamespace(
        state=SimpleNamespace(global_step=step), num_iterations=int(theirs["num_iterations"]), _step=0,
        _buffered_inputs=[None] * accumulation, args=SimpleNamespace(gradient_accumulation_steps=accumulation),
        epsilon=theirs["epsilon"], beta=theirs["beta"], _metrics=metrics,
        accelerator=SimpleNamespace(gather_for_metrics=lambda t: t),
        _get_per_token_logps=lambda *a: repic.per_token_logps(None, *a))
    patches = [int(t.prod()) for t in batch["image_grid_thw"]]
    first_image = [sum(batch["num_images"][:r]) for r in range(n + 1)]
    model.zero_grad()
    total = 0.0
    for r in range(n):  # row r: RePIC's process r % 8 at micro-step r // 8 (any assignment sums the same)
        prompt = batch["prompt_ids"][r][batch["prompt_mask"][r].bool()][None]
        length = int(batch["completion_mask"][r].sum())
        completion = batch["completion_ids"][r, :length][None]
        images = slice(first_image[r], first_image[r + 1])
        pixels = slice(sum(patches[:images.start]), sum(patches[:images.stop]))
        pixel_values, grid = batch["pixel_values"][pixels], batch["image_grid_thw"][images]
        ids = torch.cat([prompt, completion], 1)
        with torch.no_grad(), model.disable_adapter():  # RePIC's reference: the policy with the adapter disabled
            ref = repic.per_token_logps(None, repic_model, ids, torch.ones_like(ids), pixel_values, grid)
        ref = ref[:, prompt.shape[1] - 1:]
        assert torch.allclose(ref[0], batch["ref_per_token_logps"][r, :length], atol=1e-5), r
        rollout = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
                   "completion_mask": torch.ones_like(completion), "old_per_token_logps": None,
                   "ref_per_token_logps": ref, "advantages": advantages[r:r + 1], "pixel_values": pixel_values,
                   "image_grid_thw": grid}
        self._generate_and_score_completions = lambda inputs, model, rollout=rollout: rollout
        loss = repic.compute_loss(self, repic_model, None)
        (loss / accumulation / processes).backward()  # DeepSpeed: / accumulation, mean over processes
        total += loss.item() / accumulation / processes
    assert min(metrics["kl"]) > 0  # the KL term is live: the adapter has moved from the reference
    assert total == pytest.approx(float(sum(loss for loss, *_ in losses)), rel=1e-5, abs=1e-7)
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == trl_grads.keys() and any("lm_head" in name for name in grads)
    scale = max(float(g.abs().max()) for g in trl_grads.values())
    assert scale > 0
    for name, grad in grads.items():  # rounding here: ~2e-7 of the scale; TRL's bias-corrected KL: ~4e-4
        assert torch.allclose(grad, trl_grads[name], atol=2e-6 * scale, rtol=1e-5), name
