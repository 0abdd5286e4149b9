"""Supervised warm-up of the tiny embedded base, so that GRPO has something to reinforce.

A randomly initialised model has flat logits: its greedy output is noise and GRPO + LoRA cannot move it
(every rollout scores 0, so every advantage is 0). Real bases (Qwen2.5-VL-7B) already caption and answer; they
fail at *personalization*, often captioning generically instead of naming the user's concepts. The warm-up gives
the tiny base that profile, with a short full fine-tune on the world's *training* concept looks under fresh
made-up names (never an evaluation concept, never a name of the world):

* captions that describe the scene from templates (which concept is in which corner, what it looks like, how
  many other objects are around), in the evaluation's captioning conversation and in the training JSON's
  captioning problems, for 1, 2 and 4 concepts;
* a caption names the concepts (each name copied from its reference line) only part of the time: for the one
  question that asks for names outright ("... names everyone ...") with probability `name_rate_asked`, otherwise
  with probability `name_rate`. Like a real base, it follows an explicit request and rarely personalises on its
  own: greedy, it names the concepts in about one caption in four; sampled, often enough for GRPO's identity
  reward to have a gap to close;
* the yes/no and box answer formats: boxes drawn at random, yes/no leaning to "yes" as many VLMs do (the
  format, not the skill);
* judging two captions in the judge's prompt (`judge_llm`'s local judge is this model): the caption that names
  more of the references, and no concept that is not there, wins; equally good captions tie.

Names are one token each (the tokenizer is trained on this text; `fetch_data` checks it), so naming an unseen
concept means copying one token from the prompt. A caption opens with the name (`<trar> is in the top left
corner: ...`): whether to name is decided at the caption's first token (`<`), and the name is copied at the
next. Copying is learnt first, on naming drills (`naming_drills`: the captioning prompt with its images, a
reference under one of 1000 fresh names, too many to memorise, and the answer begun with `<`, so the drills
teach how to name, never whether to), then kept up beside the examples, in turn with the judging examples.
Token embeddings stay fixed (and tied to the output layer), and names share one direction of them
(`repic.synthetic.tiny_model`), so a name the warm-up never used is represented like one it did: the copy
generalises to the evaluation concepts' names. GRPO then has to raise how often the base names, not teach it how.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from repic.core.prompts import CAPTION_QUESTIONS, caption_messages, judge_messages, training_problem
from repic.vlm.image_memo import images_processed_once

# The question that asks for names outright: the base follows it (`name_rate_asked`), the others less often.
ASKS_FOR_NAMES = CAPTION_QUESTIONS[1]
KINDS = ("caption", "describe", "caption", "describe", "caption", "yes_no", "describe", "iou")
YES_RATE = 0.8  # the base's yes/no answers lean to "yes", as many VLMs' do (the format, not the skill)
CORNERS = ("top left", "top right", "bottom left", "bottom right")
_COUNTS = ("alone", "one", "two", "three", "four", "five", "six", "seven", "eight")


def warmup_names(seed: int, n: int, avoid: set[str]) -> list[str]:
    """Fresh made-up names for the warm-up (none of the world's): a look gets a new name in every example,
    so the only way to name a concept right is to copy the name given in the prompt."""
    from repic.synthetic.world import made_up_names

    names = [f"<{n}>" for n in made_up_names(random.Random(f"{seed}/warmup-names"), n + len(avoid))]
    return [k for k in names if k not in avoid][:n]


def _a(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _looks(c: Any) -> str:
    """'a teal hexagon-shaped pet with red stripes' from the concept's info sentence."""
    return c.info[0].lower() + c.info[1:].rstrip(".")


def _corner(box: Sequence[int], size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return f"{'top' if cy < size / 2 else 'bottom'} {'left' if cx < size / 2 else 'right'}"


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def caption(named: Sequence[tuple[str | None, Any]], corners: Sequence[str], n_others: int) -> str:
    """A templated caption of a scene: `named` pairs each concept (in reference order) with the name the caption
    uses for it, or None to describe it without a name; `corners` says where each one is. A name comes first
    (`<trar> is in the top left corner: ...`), so naming is decided at the caption's first token and the name is
    copied right there, from the reference line just above."""
    others = "alone" if n_others == 0 else f"next to {_COUNTS[n_others]} other object{'s' * (n_others > 1)}"
    if len(named) == 1:
        (key, c), corner = named[0], corners[0]
        if key:
            return f"{key} is in the {corner} corner: {_looks(c)}, {others} on a light background."
        return f"{_cap(_looks(c))} is in the {corner} corner, {others} on a light background."
    heads = [key or _a(f"{c.primary} {c.category}") for key, c in named]
    if len(named) == 2:
        where = f"{corners[0]} and {corners[1]} corners" if corners[0] != corners[1] else f"{corners[0]} corner"
        return f"{_cap(heads[0])} and {heads[1]} are in the {where}, {others} on a light background."
    listed = ", ".join(heads[:-1]) + " and " + heads[-1]
    return f"{_cap(listed)} are together in this image, {others} on a light background."


def _quality(text: str, keys: Sequence[str], pool: Sequence[str]) -> int:
    """Judge's rule: names of the references present, minus names of concepts that are not there."""
    return sum(k in text for k in keys) - sum(k in text for k in pool if k not in keys)


def _judge_pair(rng: random.Random, group: Sequence[Any], keys: Sequence[str], wrong: Sequence[str],
                corners: Sequence[str], n_others: int) -> list[str]:
    """Two captions of one scene for the judge: named (`keys`), generic, or naming concepts that are not in it
    (`wrong`); mostly named vs generic (what base and trained captions differ by), then ties and wrong names, in
    either order. Their wording (where things are, how many others) may differ, which does not count."""

    def variant(ks: Sequence[str | None]) -> str:
        where = corners if rng.random() < 0.5 else [rng.choice(CORNERS) for _ in group]
        return caption(list(zip(ks, group, strict=True)), where, rng.choice((n_others, rng.randrange(5))))

    made = {"named": keys, "generic": [None] * len(group), "wrong": wrong}
    pair = rng.choice([("named", "generic")] * 5 + [("named", "named"), ("generic", "generic"),
                                                     ("named", "wrong"), ("generic", "wrong")])
    if rng.random() < 0.5:
        pair = pair[::-1]
    return [variant(made[k]) for k in pair]


def warmup_examples(*, seed: int, n_concepts: int, n_train_concepts: int | None, n_distractors: int,
                    image_size: int, n_examples: int, n_names: int, name_rate: float,
                    name_rate_asked: float, kinds: Sequence[str] = KINDS, tag: str = "warmup"
                    ) -> list[dict[str, Any]]:
    """Seeded SFT examples `{"messages", "images", "target"}`: training-concept looks under fresh names, of the
    `kinds` in turn (caption, describe, judge, yes_no, iou); `tag` names the seeded streams."""
    from repic.synthetic.world import captioning_problem, make_concepts, render_reference, render_scene

    evaluation, concepts = make_concepts(seed, n_concepts, n_train_concepts or n_concepts)
    pool = warmup_names(seed, n_names, avoid={c.key for c in [*evaluation, *concepts]})
    rng = random.Random(f"{seed}/{tag}")
    examples = []
    for i in range(n_examples):
        kind = kinds[i % len(kinds)]
        size = {"caption": (1, 2, 4), "describe": (1, 2), "judge": (1, 2, 4)}.get(kind, (1,))
        group = rng.sample(concepts, rng.choice(size))
        scene, placed = render_scene(group, n_distractors, random.Random(f"{seed}/{tag}/{i}/scene"), image_size)
        refs = [render_reference(c, random.Random(f"{seed}/{tag}/{i}/{c.name}"), image_size) for c in group]
        keys = rng.sample(pool, len(group))
        corners = [_corner(next(p.box for p in placed if p.key == c.key), image_size) for c in group]
        n_others = len(placed) - len(group)
        question = rng.choice(CAPTION_QUESTIONS)
        rate = name_rate_asked if question == ASKS_FOR_NAMES else name_rate
        named = rng.random() < rate
        text = caption([(k if named else None, c) for k, c in zip(keys, group, strict=True)], corners, n_others)
        references = [{"name": k, "info": c.info} for k, c in zip(keys, group, strict=True)]
        if kind == "caption":
            messages, images, target = caption_messages(references, question), [*refs, scene], text
        elif kind == "judge":
            wrong = rng.sample([k for k in pool if k not in keys], len(group))
            variants = _judge_pair(rng, group, keys, wrong, corners, n_others)
            qa, qb = (_quality(v, keys, [*keys, *wrong]) for v in variants)
            target = "A" if qa > qb else "B" if qb > qa else "tie"
            messages, images = judge_messages(references, *variants), [*refs, scene]
        else:
            if kind == "describe":
                method = "yes_no_name" if len(group) == 1 else "yes_no_name_multi"
                problem, images, target = captioning_problem(group, question, keys), [*refs, scene], text
            elif kind == "yes_no":
                problem = f"The first image shows {keys[0]}. Is {keys[0]} in the second image?"
                method, images, target = "yes_no", [refs[0], scene], "yes" if rng.random() < YES_RATE else "no"
            else:
                problem = (f"{keys[0]} is {_looks(group[0])}. "
                           f"Give the bounding box of {keys[0]} in the image as [x1, y1, x2, y2] in pixels.")
                x1, y1 = rng.randrange(image_size // 2), rng.randrange(image_size // 2)
                w, h = rng.randrange(8, image_size // 2), rng.randrange(8, image_size // 2)
                method, images, target = "iou", [scene], f"[{x1}, {y1}, {x1 + w}, {y1 + h}]"
            content = [{"type": "image"} for _ in images]
            content.append({"type": "text", "text": training_problem(problem, method, rng)})
            messages = [{"role": "user", "content": content}]
        examples.append({"messages": messages, "images": images, "target": target})
    return examples


def _batch(processor: Any, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Tokenised examples with labels on the answer only. An example's optional `prefix` is the start of the
    answer, given as prompt (no loss on it); `eos: False` leaves the end-of-turn token off the target."""
    prompts = [processor.apply_chat_template(e["messages"], add_generation_prompt=True, tokenize=False)
               + e.get("prefix", "") for e in examples]
    eos = processor.tokenizer.eos_token
    full = [p + e["target"] + (eos if e.get("eos", True) else "") for p, e in zip(prompts, examples)]
    images: list[list[Image.Image]] | None = [e["images"] for e in examples] if examples[0]["images"] else None
    # Each image is processed once: the prompts' own calls (for their lengths) reuse the batch's patches.
    with images_processed_once(processor, capacity=max(64, sum(len(e["images"] or ()) for e in examples))):
        batch = processor(text=full, images=images, return_tensors="pt", padding=True, padding_side="right")
        prompt_lens = [len(processor(text=[p], images=e["images"] or None, return_tensors="pt")["input_ids"][0])
                       for p, e in zip(prompts, examples)]
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for row, n in enumerate(prompt_lens):
        labels[row, :n] = -100  # loss on the answer only
    batch["labels"] = labels
    return batch


def answer_loss(model: Any, batch: Any) -> torch.Tensor:
    """The model's own causal-LM loss (`model(**batch).loss`: mean cross-entropy of each labelled token given the
    ones before it), with the output layer applied at the labelled positions only. The labels cover the answers
    (`_batch`): a few tokens of a prompt of hundreds, and the output layer (hidden size x vocabulary) is most of
    a tiny model's cost, so the warm-up skips its products for the prompt, whose logits the loss never reads.
    `batch` may be a list of batches (`_batches`, parts of one batch): the mean over all of their labelled tokens,
    the loss of the batch they make up."""
    parts = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    total, count = None, 0
    for part in parts:
        inputs = {k: v for k, v in part.items() if k != "labels"}
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
        targets = part["labels"][:, 1:]
        keep = targets != -100
        logits = model.lm_head(hidden[:, :-1][keep])
        summed = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
        total = summed if total is None else total + summed
        count += int(keep.sum())
    return total / count


def _batches(processor: Any, examples: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """`examples` as one `_batch` per number of images (in order of first appearance): the drills mix prompts of
    1, 2 and 4 references, whose lengths differ by hundreds of tokens, and one padded batch spent a third of its
    language-model tokens on padding. `answer_loss` of the list is the loss of the whole batch."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for e in examples:
        groups.setdefault(len(e["images"] or ()), []).append(e)
    return [_batch(processor, group) for group in groups.values()]


def patch_embedding_as_matmul(model: Any) -> None:
    """The vision tower's patch embedding (`patch_embed.proj`, a Conv3d whose kernel is its stride and the whole
    patch) computed as the matrix product it equals: each patch's flattened pixels times the flattened kernel. The
    same weights (the Conv3d's own parameter, saved as before) and the same function up to float rounding; on the
    CPU the convolution's forward and backward took 10 % of the warm-up's op time, the product a third of that."""
    embed = model.model.visual.patch_embed
    weight = embed.proj.weight  # (embed_dim, channels, temporal, patch, patch)
    if embed.proj.bias is not None:
        raise ValueError("patch_embedding_as_matmul: expected Qwen2.5-VL's bias-free patch embedding")

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
        return torch.nn.functional.linear(flat, weight.reshape(weight.shape[0], -1))

    embed.forward = forward


def caption_opening(keys: Sequence[str], k: int) -> str:
    """A naming caption's text up to the `<` of its `k`-th name (from 0): `<`, `<a> and <`, `<a>, <b>, <`..."""
    if k == 0:
        return "<"
    return ", ".join(keys[:k]) + (" and <" if k == len(keys) - 1 else ", <")


def naming_drills(*, seed: int, n: int, n_concepts: int, n_train_concepts: int | None, n_names: int,
                  n_distractors: int, image_size: int, sizes: Sequence[int] = (1, 1, 2, 4)
                  ) -> list[dict[str, Any]]:
    """`n` seeded naming drills: a captioning prompt of 1, 2 or 4 references (`sizes`, drawn in turn) with its
    images (either conversation: the evaluation's, or the training JSON's problem), training concepts' looks under
    fresh names, and the answer begun as a naming caption up to the `<` of one of its names (`caption_opening`);
    the target is that name's token and `>`. Names come from a pool too large to memorise, so the loss can only
    fall by copying the right name from the prompt: the skill that names concepts never seen. The opening is
    given, so the drills teach *how* to name, never *whether* to (the captions decide that, at their first
    token)."""
    from repic.synthetic.world import captioning_problem, make_concepts, render_reference, render_scene

    evaluation, concepts = make_concepts(seed, n_concepts, n_train_concepts or n_concepts)
    pool = warmup_names(seed, n_names, avoid={c.key for c in [*evaluation, *concepts]})
    rng = random.Random(f"{seed}/drills")
    drills = []
    for i in range(n):
        group = rng.sample(concepts, sizes[i % len(sizes)])
        keys = rng.sample(pool, len(group))
        question = rng.choice(CAPTION_QUESTIONS)
        others = rng.sample([o for o in concepts if o not in group], rng.randint(0, 1) if len(group) == 1 else 0)
        scene, _ = render_scene([*group, *others], n_distractors, random.Random(f"{seed}/drills/{i}/scene"),
                                image_size)
        images = [*(render_reference(c, random.Random(f"{seed}/drills/{i}/{c.name}"), image_size) for c in group),
                  scene]
        if rng.random() < 0.5:
            messages = caption_messages([{"name": k, "info": c.info} for k, c in zip(keys, group, strict=True)],
                                        question)
        else:
            method = "yes_no_name" if len(group) == 1 else "yes_no_name_multi"
            text = training_problem(captioning_problem(group, question, keys), method, rng)
            messages = [{"role": "user", "content": [*({"type": "image"} for _ in images),
                                                     {"type": "text", "text": text}]}]
        k = rng.randrange(len(keys))
        drills.append({"messages": messages, "images": images, "prefix": caption_opening(keys, k),
                       "target": keys[k][1:], "eos": False})
    return drills


def warmup(model_dir: str | os.PathLike, examples: list[dict[str, Any]], *, steps: int, batch_size: int,
           learning_rate: float, seed: int, drills: list[dict[str, Any]] | None = None,
           judge: list[dict[str, Any]] | None = None, drill_batch_size: int = 16, drill_steps: int = 0,
           warmup_steps: int = 0, freeze_embeddings: bool = False, threads: int | None = None,
           callback: Any = None) -> list[float]:
    """Fine-tune of the saved tiny model in place (`save_pretrained` again); returns the loss curve. The first
    `drill_steps` steps take a batch of `drills` (`naming_drills`) alone, the next `steps` a batch of `examples`
    and, in turn, one of drills (so copying names is kept while the captions are learnt) or one of `judge`
    examples (the judge's task, which needs the copy learnt first). The learning rate rises linearly
    over `warmup_steps`, stays through the drills, then falls linearly to 0. The examples' images are released
    (set to `[]`) once tokenised. `callback(step, model, processor, losses)` is called after every step.

    `threads` (params `base.threads`, which every torch stage applies: `repic.vlm.models.use_threads`): torch's
    intra-op thread count for the warm-up, restored after. How a matrix product or a reduction is split between
    threads changes the order of float additions, so the same seed on 1 and 4 threads gives different bytes; a
    fixed count makes them independent of the machine's cores (not of its CPU's kernels: ATen and BLAS pick AVX2
    or AVX-512 code by CPU, which round differently)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _warmup(model_dir, examples, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                       seed=seed, drills=drills, judge=judge, drill_batch_size=drill_batch_size,
                       drill_steps=drill_steps, warmup_steps=warmup_steps, freeze_embeddings=freeze_embeddings,
                       callback=callback)
    finally:
        torch.set_num_threads(previous)


def _warmup(model_dir: str | os.PathLike, examples: list[dict[str, Any]], *, steps: int, batch_size: int,
            learning_rate: float, seed: int, drills: list[dict[str, Any]] | None, judge: list[dict[str, Any]] | None,
            drill_batch_size: int, drill_steps: int, warmup_steps: int, freeze_embeddings: bool,
            callback: Any) -> list[float]:
    from repic.vlm.models import load_model, load_processor

    torch.manual_seed(seed)
    processor = load_processor(model_dir)
    model = load_model(model_dir, device="cpu", dtype="float32").train()
    if freeze_embeddings:
        # Token embeddings (tied to the output layer) stay as initialised: a name never seen is then represented
        # like every other token, and copying it from the prompt works as for a name seen in the warm-up.
        model.get_input_embeddings().weight.requires_grad_(False)
    patch_embedding_as_matmul(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)

    def lr_factor(s: int) -> float:  # warm-up, flat through the drills, then linear decay to 0 over `steps`
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        flat = max(drill_steps, warmup_steps)
        return min(1.0, 1.0 - (s - flat) / max(1, drill_steps + steps - flat))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    drills = drills or []
    drill_steps = drill_steps if drills else 0
    n_example_batches = -(-len(examples) // batch_size)
    judge = judge or []
    n_drill_batches = -(-len(drills) // drill_batch_size)
    n_judge_batches = -(-len(judge) // drill_batch_size)
    cache: dict[tuple[str, int], list[dict[str, torch.Tensor]]] = {}

    def batch(kind: str, i: int) -> list[dict[str, torch.Tensor]]:
        """Tokenised on first use, then kept; the examples' images are released then (they are in the batch)."""
        if (kind, i) not in cache:
            items, size = {"examples": (examples, batch_size), "drills": (drills, drill_batch_size),
                           "judge": (judge, drill_batch_size)}[kind]
            chunk = items[i * size:(i + 1) * size]
            cache[kind, i] = _batches(processor, chunk)
            for e in chunk:
                e["images"] = None if e["images"] is None else []
        return cache[kind, i]

    rng = random.Random(seed)
    losses = []
    for step in range(drill_steps + steps):
        if step < drill_steps:
            loss = answer_loss(model, batch("drills", step % n_drill_batches))
        else:
            loss = answer_loss(model, batch("examples", rng.randrange(n_example_batches)))
            k = step - drill_steps
            if judge and k % 2:
                loss = loss + answer_loss(model, batch("judge", (k // 2) % n_judge_batches))
            elif drills:
                loss = loss + answer_loss(model, batch("drills", (drill_steps + k // 2) % n_drill_batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if callback is not None:
            callback(step + 1, model, processor, losses)
    model.eval().save_pretrained(model_dir)
    return losses
