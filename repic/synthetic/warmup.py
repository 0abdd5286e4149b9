"""Supervised warm-up of the tiny embedded base, so that GRPO has something to reinforce.

A randomly initialised model has flat logits: its greedy output is noise and GRPO + LoRA cannot move it
(every rollout scores 0, so every advantage is 0). Real bases (Qwen2.5-VL-7B) already caption and answer;
they fail at *personalization*, often captioning generically instead of naming the user's concepts. The warm-up
gives the tiny base that profile: a short full fine-tune on the world's *training* concepts (never the
evaluation ones) teaching the answer formats (yes/no, a JSON box, captions of >= 100 characters), where only a
fraction `name_rate` of the captions name the concepts. GRPO's identity reward then has a learnable gap.
Yes/no answers and boxes in the warm-up are drawn at random, so the base has the format but not the skill.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch
from PIL import Image

from repic.core.prompts import CAPTION_QUESTIONS, caption_messages, training_problem

GENERIC = (
    "A few colourful shapes lie on a plain light background. One of them is {thing}, "
    "and there are some smaller objects around it."
)


def warmup_names(seed: int, n: int, avoid: set[str]) -> list[str]:
    """Fresh made-up names for the warm-up (none of the world's): a look gets a new name in every example,
    so the only way to name a concept right is to copy the name given in the prompt."""
    from repic.synthetic.world import made_up_names

    names = [f"<{n}>" for n in made_up_names(random.Random(f"{seed}/warmup-names"), n + len(avoid))]
    return [k for k in names if k not in avoid][:n]


def _naming_caption(concepts: list[tuple[str, Any]]) -> str:
    parts = [f"{key} is {c.info[0].lower()}{c.info[1:]}" for key, c in concepts]
    names = " and ".join(key for key, _ in concepts)
    return f"This image shows {names} on a plain light background. " + " ".join(parts)


def _generic_caption(concepts: list[tuple[str, Any]]) -> str:
    c = concepts[0][1]
    return GENERIC.format(thing=f"a {c.primary} {c.category}")


def warmup_examples(*, seed: int, n_concepts: int, n_train_concepts: int | None, n_distractors: int,
                    image_size: int, n_examples: int, n_names: int, name_rate: float) -> list[dict[str, Any]]:
    """Seeded SFT examples `{"messages", "images", "target"}`: training-concept looks under fresh names."""
    from repic.synthetic.world import make_concepts, render_reference, render_scene

    evaluation, concepts = make_concepts(seed, n_concepts, n_train_concepts or n_concepts)
    pool = warmup_names(seed, n_names, avoid={c.key for c in [*evaluation, *concepts]})
    rng = random.Random(f"{seed}/warmup")
    examples = []
    for i in range(n_examples):
        kind = ("caption", "caption", "describe", "yes_no", "iou")[i % 5]
        group = rng.sample(concepts, rng.choice((1, 2, 4)) if kind == "caption" else 1)
        scene, placed = render_scene(group, n_distractors, random.Random(f"{seed}/warmup/{i}/scene"), image_size)
        refs = [render_reference(c, random.Random(f"{seed}/warmup/{i}/{c.name}"), image_size) for c in group]
        named = list(zip(rng.sample(pool, len(group)), group))
        caption = _naming_caption(named) if rng.random() < name_rate else _generic_caption(named)
        if kind == "caption":
            refs_info = [{"name": key, "info": c.info} for key, c in named]
            messages = caption_messages(refs_info, rng.choice(CAPTION_QUESTIONS))
            images, target = [*refs, scene], caption
        else:
            key = named[0][0]
            if kind == "describe":
                problem = (f"The first image shows {key}. Describe the second image in detail, "
                           f"referring to {key} by name.")
                method, images, target = "yes_no_name", [refs[0], scene], caption
            elif kind == "yes_no":
                problem = f"The first image shows {key}. Is {key} in the second image?"
                method, images, target = "yes_no", [refs[0], scene], rng.choice(("yes", "no"))
            else:
                problem = f"Give the bounding box of {key} in the image as [x1, y1, x2, y2] in pixels."
                x1, y1 = rng.randrange(image_size // 2), rng.randrange(image_size // 2)
                w, h = rng.randrange(8, image_size // 2), rng.randrange(8, image_size // 2)
                method, images, target = "iou", [scene], f"[{x1}, {y1}, {x1 + w}, {y1 + h}]"
            text = training_problem(problem, method, rng)
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
            messages = [{"role": "user", "content": content}]
        examples.append({"messages": messages, "images": images, "target": target})
    return examples


def _batch(processor: Any, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    prompts = [processor.apply_chat_template(e["messages"], add_generation_prompt=True, tokenize=False)
               for e in examples]
    eos = processor.tokenizer.eos_token
    full = [p + e["target"] + eos for p, e in zip(prompts, examples)]
    images: list[list[Image.Image]] = [e["images"] for e in examples]
    batch = processor(text=full, images=images, return_tensors="pt", padding=True, padding_side="right")
    prompt_lens = [len(processor(text=[p], images=e["images"], return_tensors="pt")["input_ids"][0])
                   for p, e in zip(prompts, examples)]
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for row, n in enumerate(prompt_lens):
        labels[row, :n] = -100  # loss on the answer only
    batch["labels"] = labels
    return batch


def warmup(model_dir: str | os.PathLike, examples: list[dict[str, Any]], *, steps: int, batch_size: int,
           learning_rate: float, seed: int) -> list[float]:
    """Full fine-tune of the saved tiny model in place (`save_pretrained` again); returns the loss curve."""
    from repic.vlm.models import load_model, load_processor

    torch.manual_seed(seed)
    processor = load_processor(model_dir)
    model = load_model(model_dir, device="cpu", dtype="float32").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(1, steps))
    batches = [_batch(processor, examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    rng = random.Random(seed)
    losses = []
    for _ in range(steps):
        loss = model(**rng.choice(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval().save_pretrained(model_dir)
    return losses
