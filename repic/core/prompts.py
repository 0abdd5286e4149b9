"""Prompts: RePIC's training instruction suffixes and the captioning conversation."""

from __future__ import annotations

import random
from typing import Any

OCT_SUFFIX = "The final answer must be either 'yes' or 'no' with no additional output."
VLT_SUFFIX = "For bounding box coordinates, return the final answer in JSON format."
ICT_SUFFIXES = (
    (0.2, "Output the final answer including its name."),
    (0.2, "Output the final answer without duplicating the given information."),
    (0.6, ""),
)

CAPTION_SYSTEM_PROMPT = (
    "You are a captioning assistant. Your task is to write a caption for the query image, "
    "given information about the reference images."
)

# Rotated by query index, as RePIC's caption_eval scripts rotate their question list.
CAPTION_QUESTIONS = (
    "Give a personalized caption of this image.",
    "Write a short caption that names everyone in this image.",
    "Describe this image using the names of the concepts you recognize.",
    "Can you caption this image, naming the people and things you know?",
)

JUDGE_INSTRUCTION = (
    "You are judging personalized image captions. The reference images above show concepts with their names. "
    "A good caption names the concepts that appear in the query image, correctly, and describes the image "
    "faithfully. Which caption is better? Answer with exactly one of: A, B, tie."
)


def training_problem(problem: str, accu_reward_method: str, rng: random.Random) -> str:
    """Append RePIC's task instruction to a training problem (ICT's instruction is drawn by the seeded `rng`)."""
    if accu_reward_method == "yes_no":
        return f"{problem} {OCT_SUFFIX}"
    if accu_reward_method == "iou":
        return f"{problem} {VLT_SUFFIX}"
    if accu_reward_method in ("yes_no_name", "yes_no_name_multi"):
        weights = [w for w, _ in ICT_SUFFIXES]
        suffix = rng.choices([s for _, s in ICT_SUFFIXES], weights=weights)[0]
        return f"{problem} {suffix}".rstrip()
    raise ValueError("accu_reward_method: expected yes_no|iou|yes_no_name|yes_no_name_multi, "
                     f"got {accu_reward_method!r}")


ICT_METHODS = ("yes_no_name", "yes_no_name_multi")


def ict_text(problem: str, rng: random.Random) -> str:
    """RePIC's ICT instruction, drawn from `rng` as `_randomized_free_text` draws it: `randint(0, 4)`, 0 and 1 one
    suffix each, 2-4 the bare problem."""
    roll = rng.randint(0, 4)
    return f"{problem} {ICT_SUFFIXES[roll][1]}" if roll < 2 else problem


def training_prompt(problem: str, accu_reward_method: str, n_images: int, rng: random.Random) -> tuple[str, int]:
    """(text, image slots) of a training sample as RePIC's `LazySupervisedDataset.__getitem__` routes it, by method
    and number of images (a list's length; a single image, list or not, is 1). Several images: ICT methods keep
    every slot with the drawn ICT text, `yes_no` every slot with OCT's suffix, anything else (`iou`) one slot with
    the box suffix. One image: `yes_no`, `iou` and `yes_no_name` their own text, anything else (`yes_no_name_multi`)
    the box suffix. `rng` is drawn only for an ICT text (once per call: RePIC draws at every fetch)."""
    if n_images > 1:
        if accu_reward_method in ICT_METHODS:
            return ict_text(problem, rng), n_images
        if accu_reward_method == "yes_no":
            return f"{problem} {OCT_SUFFIX}", n_images
        return f"{problem} {VLT_SUFFIX}", 1
    if accu_reward_method == "yes_no":
        return f"{problem} {OCT_SUFFIX}", 1
    if accu_reward_method == "yes_no_name":
        return ict_text(problem, rng), 1
    return f"{problem} {VLT_SUFFIX}", 1


def reference_line(i: int, reference: dict[str, Any]) -> str:
    """The text that follows reference image `i` (from 1): 'i. Name: <name>, Info: <info>' and a newline."""
    return f"{i}. Name: {reference['name']}, Info: {reference['info']}\n"


def caption_messages(references: list[dict[str, Any]], question: str) -> list[dict[str, Any]]:
    """The captioning conversation: each reference image then 'i. Name: .., Info: ..', then the query image.

    `references` are concept_dict entries (`name`, `info`) plus an `image` (PIL image or path) each; the query
    image is the last image placeholder. Images are given as `{"type": "image"}` placeholders in order:
    references first, query last.
    """
    content: list[dict[str, Any]] = []
    for i, ref in enumerate(references, start=1):
        content.append({"type": "image"})
        content.append({"type": "text", "text": reference_line(i, ref)})
    content.append({"type": "image"})
    content.append({"type": "text", "text": f"This is the query image. {question}"})
    return [
        {"role": "system", "content": [{"type": "text", "text": CAPTION_SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]


def judge_messages(references: list[dict[str, Any]], caption_a: str, caption_b: str) -> list[dict[str, Any]]:
    """The judge's conversation (repic.eval.judge): the references as in captioning, the query image, captions A
    and B, and the instruction."""
    content: list[dict[str, Any]] = []
    for i, ref in enumerate(references, start=1):
        content += [{"type": "image"}, {"type": "text", "text": reference_line(i, ref)}]
    content += [{"type": "image"}, {"type": "text", "text": "This is the query image.\n"
                                    f"Caption A: {caption_a}\nCaption B: {caption_b}\n{JUDGE_INSTRUCTION}"}]
    return [{"role": "user", "content": content}]
