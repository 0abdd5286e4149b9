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
