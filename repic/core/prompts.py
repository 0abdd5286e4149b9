"""Prompts: RePIC's training instruction suffixes, the captioning conversation (ours and RePIC's) and the judge's."""

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

# Our captioning conversation (params `caption.conversation: ours`, the embedded default, which its tiny warm-up
# model was taught): our own wording, not RePIC's (RePIC's follows below).
CAPTION_SYSTEM_PROMPT = (
    "You are a captioning assistant. Your task is to write a caption for the query image, "
    "given information about the reference images."
)

# Ours, rotated by query index as RePIC's caption scripts rotate theirs (only the first question is RePIC's).
CAPTION_QUESTIONS = (
    "Give a personalized caption of this image.",
    "Write a short caption that names everyone in this image.",
    "Describe this image using the names of the concepts you recognize.",
    "Can you caption this image, naming the people and things you know?",
)

# RePIC's own captioning conversation (caption_eval_single.py / caption_eval_multi_{2,4}.py: run_captioning), used
# when params `caption.conversation` is `repic` (the paper config). tests/test_eval_fidelity.py checks every string
# and rule against what RePIC's scripts build (tests/data/repic_conversations.json, made by tools/repic_reference.py).
REPIC_CAPTION_SYSTEM_PROMPT = (
    "You are a captioning assistant. Your task is to generate an accurate caption "
    "for the query image.\nBelow is additional information about the reference images."
)
# caption_eval_single.py's list; RePIC's released 2- and 4-concept caption files (captioning/) follow it too.
REPIC_QUESTIONS_SINGLE = (
    "Give a personalized caption of this image.",
    "Give a caption of the image.",
    "Can you provide a personalized caption of this photo?",
    "Provide a caption of the given image.",
)
# caption_eval_multi_2.py's and caption_eval_multi_4.py's list, as those scripts are published.
REPIC_QUESTIONS_MULTI = (
    "Give a personalized caption of this image.",
    "Give a personal caption of the image.",
    "Provide a personalized caption of the given image.",
)
# What RePIC's scripts append to the zero-shot (base model) row's question.
ZERO_SHOT_SUFFIX = "Output the final answer including its name."
CONVERSATIONS = ("repic", "ours")     # params caption.conversation
QUESTION_LISTS = ("released", "scripts")  # params caption.question_list (conversation repic)
ROW_PROMPTS = ("plain", "zero_shot")  # params models.<row>.prompt

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


def question_list(setting: str, conversation: str, question_list: str = "released") -> tuple[str, ...]:
    """The questions rotated over a setting's queries (in file order, one counter per run). `ours`: ours;
    `repic`: RePIC's, as its released caption files show them (`released`: the single-concept script's four for
    every setting) or as its multi-concept scripts are published (`scripts`: three for multi2/multi4)."""
    if conversation == "ours":
        return CAPTION_QUESTIONS
    if conversation != "repic":
        raise ValueError(f"conversation: expected {'|'.join(CONVERSATIONS)}, got {conversation!r}")
    if question_list == "scripts" and setting != "single":
        return REPIC_QUESTIONS_MULTI
    if question_list not in QUESTION_LISTS:
        raise ValueError(f"question_list: expected {'|'.join(QUESTION_LISTS)}, got {question_list!r}")
    return REPIC_QUESTIONS_SINGLE


def query_text(question: str, prompt: str = "plain") -> str:
    """The text after the query image: RePIC's 'This is the query image. {question}', with the zero-shot row's
    suffix when the row's `prompt` is `zero_shot`."""
    if prompt not in ROW_PROMPTS:
        raise ValueError(f"prompt: expected {'|'.join(ROW_PROMPTS)}, got {prompt!r}")
    return f"This is the query image. {question}" + (f" {ZERO_SHOT_SUFFIX}" if prompt == "zero_shot" else "")


def repic_reference_lines(references: list[dict[str, Any]]) -> list[str]:
    """RePIC's text after each reference image: its retriever writes `'{i}.<image>\\n Name: <{name}>, Info: {info}\\n'`
    per reference (`name`: the database's display name), the script removes every `'<image>\\n'` and takes line `i`
    of the result (so no trailing newline)."""
    text = "".join(f"{i}.<image>\n Name: <{r['name']}>, Info: {r['info']}\n" for i, r in enumerate(references, 1))
    lines = text.replace("<image>\n", "").split("\n")
    return [lines[i] for i in range(len(references))]


def repic_caption_messages(references: list[dict[str, Any]], question: str, prompt: str = "plain"
                           ) -> list[dict[str, Any]]:
    """RePIC's captioning conversation: its system prompt (a string), then each reference image followed by its
    line (`repic_reference_lines`), then the query image and `query_text`. Images are `{"type": "image"}`
    placeholders, references first, query last."""
    content: list[dict[str, Any]] = []
    for line in repic_reference_lines(references):
        content += [{"type": "image"}, {"type": "text", "text": line}]
    content += [{"type": "image"}, {"type": "text", "text": query_text(question, prompt)}]
    return [{"role": "system", "content": REPIC_CAPTION_SYSTEM_PROMPT}, {"role": "user", "content": content}]


def judge_messages(references: list[dict[str, Any]], caption_a: str, caption_b: str) -> list[dict[str, Any]]:
    """The judge's conversation (repic.eval.judge): the references as in captioning, the query image, captions A
    and B, and the instruction."""
    content: list[dict[str, Any]] = []
    for i, ref in enumerate(references, start=1):
        content += [{"type": "image"}, {"type": "text", "text": reference_line(i, ref)}]
    content += [{"type": "image"}, {"type": "text", "text": "This is the query image.\n"
                                    f"Caption A: {caption_a}\nCaption B: {caption_b}\n{JUDGE_INSTRUCTION}"}]
    return [{"role": "user", "content": content}]


# RePIC's LLM-judge request (evaluation/GPT_eval_single.py, GPT_eval_multi.py: GPT-4o; params judge_llm.protocol
# `repic`): a fixed system prompt, option A the baseline's caption, B RePIC's, each after "Ans:" (A's with a newline,
# as RePIC writes it), one order, one letter asked for. Single-concept: the query image alone; multi-concept: the
# first two ground-truth concepts (key, info, image) before it.
REPIC_JUDGE_SYSTEM = (
    "You are an evaluation expert. Your task is to determine which answer best describes the given image "
    "accurately. Carefully analyze the options and select the most appropriate one as your final choice."
)
REPIC_JUDGE_OPTIONS = ("Options: \n A: Ans: \n{baseline} \n B: Ans: {repic} \nOutput the final answer by choosing one "
                       "of the options with a single alphabet.")


def repic_judge_messages(setting: str, references: list[dict[str, Any]], caption_baseline: str, caption_repic: str
                         ) -> list[dict[str, Any]]:
    """RePIC's judge request for one pair; images are `{"type": "image"}` placeholders: the first two references'
    (multi-concept settings) then the query's. `references`: `{"name": key, "info"}` in ground-truth order."""
    options = {"type": "text", "text": REPIC_JUDGE_OPTIONS.format(baseline=caption_baseline, repic=caption_repic)}
    if setting == "single":
        content = [{"type": "text", "text": "\nThe preferable caption is one that provides a meaningful and accurate "
                                            "description of the image."},
                   {"type": "text", "text": "Which one is more preferable caption to the image?"},
                   {"type": "image"}, options]
    else:
        if len(references) < 2:
            raise ValueError(f"RePIC's multi-concept judge request shows two references, got {len(references)}")
        content = [{"type": "text", "text": "The preferable caption is one that is not merely a duplication of the "
                                            "given information but provides a meaningful and accurate description "
                                            "of the image."}]
        for ref in references[:2]:
            text = f"This is the image of {ref['name']} with the given Info: {ref['info']}."
            content += [{"type": "text", "text": text}, {"type": "image"}]
        content += [{"type": "text", "text": "This is the query image."}, {"type": "image"},
                    {"type": "text", "text": "Which one is more preferable caption to the query image?"}, options]
    return [{"role": "system", "content": REPIC_JUDGE_SYSTEM}, {"role": "user", "content": content}]

