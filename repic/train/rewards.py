"""RePIC's three verifiable rewards (OCT, VLT, ICT), open-r1 style, routed by `accu_reward_method`.

Each reward is a pure function `(completions, solution, accu_reward_method, **kwargs) -> list[float | None]`.
It scores only the samples of its own type and returns `None` for the others: TRL's GRPOTrainer turns
`None` into NaN and logs a nan-mean per reward function, which yields one learning curve per reward type.

Two protocols, chosen through the factories of `REWARD_REGISTRY` (params `train_grpo_lora.rewards` names them,
`repic.core.layout.REWARDS`):

- `repic` reproduces the original training code (RePIC `training/src/open-r1-multimodal/src/open_r1/
  grpo_multitask_multi_img_no_format.py`) including its quirks:
  * yes/no is the first *substring* `yes|no`, so "I don't know" reads as "no" and "not" as "no";
  * IoU uses the original's inclusive-pixel arithmetic: an overlap only 1 px wide or tall counts as 0, and
    the union is floored at 1;
  * the ground-truth box stays in the original image's pixel coordinates even when the image the model sees
    was resized.
- `strict` fixes those three: whole-word yes/no, standard IoU, and the gt box rescaled to the resized image
  when the sample carries `image_size` and `resized_size` (each `[w, h]`).

ICT (`yes_no_name`, `yes_no_name_multi`) has no listed quirk and is identical under both protocols. Its name
check is RePIC's *substring* test (`name_score`, `names_fraction`: `<bo>` counts in `<bo>'s` and in `<bob>`),
which differs on purpose from the evaluation scorer's whole-token match (`repic.eval.metrics`, RePIC's eval
scripts): each side reproduces its own original, so a trained policy is rewarded as RePIC's was and scored as
RePIC's was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from repic.core.io import RepicError
from repic.core.layout import PROTOCOLS

MIN_CONTENT_LEN = 100  # ICT: shorter answers get 0, so the policy cannot win by emitting just the name
IOU_THRESHOLD = 0.5
# The original's box pattern: first `[x1, y1, x2, y2]` of non-negative integers anywhere in the answer.
BBOX_PATTERN = re.compile(r"\[(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\]")
_YES_NO_SUBSTRING = re.compile(r"(yes|no)")
_YES_NO_WORD = re.compile(r"\b(yes|no)\b")

RewardFunc = Callable[..., list[float | None]]


# ---------------------------------------------------------------- inputs


def completion_text(completion: Any) -> str:
    """The answer text of one completion, plain or in TRL's conversational form.

    >>> completion_text("yes")
    'yes'
    >>> completion_text([{"role": "assistant", "content": [{"type": "text", "text": "no"}]}])
    'no'
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion:
        if isinstance(message, str):
            parts.append(message)
            continue
        # Tool results (role "tool") are not the model's words; anything without a role is taken as its own.
        if message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
    return "".join(parts)


def _decode_list(value: Any) -> Any:
    """Lists may travel as JSON strings (an Arrow column cannot mix str and list); decode those, and a name that
    travels as JSON text (`'"<bo>"'`, as `repic.train.build_examples` stores every solution) too."""
    if isinstance(value, str) and value.lstrip().startswith(("[", '"')):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise RepicError(f"reward protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")


def _per_sample(kwargs: dict, key: str, n: int) -> list:
    values = kwargs.get(key)
    return list(values) if values is not None else [None] * n


# ---------------------------------------------------------------- single-sample scores


def yes_no_answer(text: str, protocol: str) -> str:
    """The first yes/no in `text` (lowercased), or '' if none.

    `repic` searches substrings, as the original does, so "know" yields "no"; `strict` needs whole words.

    >>> yes_no_answer("I don't know", "repic"), yes_no_answer("I don't know", "strict")
    ('no', '')
    """
    pattern = _YES_NO_SUBSTRING if protocol == "repic" else _YES_NO_WORD
    m = pattern.search(text.lower())
    return m.group(1) if m else ""


def yes_no_score(text: str, solution: Any, protocol: str) -> float:
    """1.0 if the answer's first yes/no equals the solution's (both must have one), else 0.0."""
    gt = yes_no_answer(str(solution), protocol)
    out = yes_no_answer(text, protocol)
    return 1.0 if gt and out and gt == out else 0.0


def iou_repic(box1: Sequence[float], box2: Sequence[float]) -> float:
    """IoU with the original's inclusive-pixel arithmetic (quirk kept on purpose).

    The original computes the intersection's far corner as `min(x2) - 1` and its width as `far - near + 1`,
    which equals the standard width, but tests `near < far` strictly: an overlap 1 px wide (or tall) counts
    as no overlap. The union is floored at 1 to avoid division by zero.

    >>> iou_repic([0, 0, 2, 10], [1, 0, 2, 10]), iou_standard([0, 0, 2, 10], [1, 0, 2, 10])
    (0.0, 0.5)
    """
    x11, y11, x12, y12 = box1
    x21, y21, x22, y22 = box2
    ix1, iy1 = max(x11, x21), max(y11, y21)
    ix2, iy2 = min(x12 - 1, x22 - 1), min(y12 - 1, y22 - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    area1 = max(0, x12 - x11) * max(0, y12 - y11)
    area2 = max(0, x22 - x21) * max(0, y22 - y21)
    return float(inter) / float(max(1, area1 + area2 - inter))


def iou_standard(box1: Sequence[float], box2: Sequence[float]) -> float:
    """Standard IoU of two `[x1, y1, x2, y2]` boxes in continuous coordinates (0.0 for an empty union)."""
    x11, y11, x12, y12 = box1
    x21, y21, x22, y22 = box2
    inter = max(0, min(x12, x22) - max(x11, x21)) * max(0, min(y12, y22) - max(y11, y21))
    area1 = max(0, x12 - x11) * max(0, y12 - y11)
    area2 = max(0, x22 - x21) * max(0, y22 - y21)
    union = area1 + area2 - inter
    return float(inter) / float(union) if union > 0 else 0.0


def rescale_box(
    box: Sequence[float], image_size: Sequence[float], resized_size: Sequence[float]
) -> list[float]:
    """Map a box from the original image's pixels (`image_size` w,h) onto the resized image's."""
    sx = resized_size[0] / image_size[0]
    sy = resized_size[1] / image_size[1]
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


def iou_score(
    text: str,
    solution: Any,
    protocol: str,
    image_size: Sequence[float] | None = None,
    resized_size: Sequence[float] | None = None,
) -> float:
    """1.0 if the first `[x1, y1, x2, y2]` in `text` has IoU >= 0.5 with the gt box, else 0.0.

    `solution` is 4 ints or their JSON string. Under `strict` the gt box is rescaled to the resized image when
    both sizes are given; `repic` ignores the sizes, as the original did.
    """
    gt = _decode_list(solution)
    if not isinstance(gt, (list, tuple)) or len(gt) != 4:
        return 0.0
    m = BBOX_PATTERN.search(text)
    if not m:
        return 0.0
    pred = [int(g) for g in m.groups()]
    if protocol == "repic":
        return 1.0 if iou_repic(pred, gt) >= IOU_THRESHOLD else 0.0
    if image_size is not None and resized_size is not None:
        gt = rescale_box(gt, image_size, resized_size)
    return 1.0 if iou_standard(pred, gt) >= IOU_THRESHOLD else 0.0


def name_score(text: str, solution: Any) -> float:
    """Single-concept ICT: 1.0 if the exact name occurs and its closing form (`</bo>`) does not.

    Under 100 characters the answer scores 0. The closing-form check stops the policy from being paid for
    wrapping text in pseudo-tags (`<bo>...</bo>`). Matching is case-sensitive, as in the original.
    """
    sol = str(_decode_list(solution))
    if len(text) < MIN_CONTENT_LEN:
        return 0.0
    found = sol in text
    if sol.startswith("<") and sol.replace("<", "</") in text:
        return 0.0
    return 1.0 if found else 0.0


def names_fraction(text: str, solution: Any) -> float:
    """Multi-concept ICT: the fraction of the listed names that occur (0 under 100 characters).

    As in the original there is no closing-tag check here, and a non-list solution counts as one name.
    """
    names = _decode_list(solution)
    if not isinstance(names, (list, tuple)):
        names = [str(names)]
    if len(text) < MIN_CONTENT_LEN or not names:
        return 0.0
    return sum(1 for n in names if str(n) in text) / len(names)


# ---------------------------------------------------------------- reward factories


def make_object_consistency(protocol: str = "repic") -> RewardFunc:
    """Factory for the OCT reward (`accu_reward_method == "yes_no"`)."""
    _check_protocol(protocol)

    def object_consistency(
        completions: Sequence[Any], solution: Sequence[Any], accu_reward_method: Sequence[str], **kwargs: Any
    ) -> list[float | None]:
        """OCT: 1.0 if the answer's first yes/no equals the solution; None for other reward types.

        >>> oct_repic = make_object_consistency("repic")
        >>> oct_repic(["Yes.", "I don't know", "[1, 2, 3, 4]"], ["yes", "no", "[1, 2, 3, 4]"],
        ...           ["yes_no", "yes_no", "iou"])
        [1.0, 1.0, None]
        >>> make_object_consistency("strict")(["I don't know"], ["no"], ["yes_no"])
        [0.0]
        """
        return [
            yes_no_score(completion_text(c), sol, protocol) if method == "yes_no" else None
            for c, sol, method in zip(completions, solution, accu_reward_method, strict=True)
        ]

    return object_consistency


def make_visual_localization(protocol: str = "repic") -> RewardFunc:
    """Factory for the VLT reward (`accu_reward_method == "iou"`)."""
    _check_protocol(protocol)

    def visual_localization(
        completions: Sequence[Any], solution: Sequence[Any], accu_reward_method: Sequence[str], **kwargs: Any
    ) -> list[float | None]:
        """VLT: 1.0 if the first box in the answer has IoU >= 0.5 with the gt box; None for other types.

        kwargs `image_size` / `resized_size` (per sample `[w, h]` or None) are used by `strict` only.

        >>> vlt = make_visual_localization("repic")
        >>> vlt(['{"bbox_2d": [0, 0, 10, 5]}', "yes"], [[0, 0, 10, 10], "yes"], ["iou", "yes_no"])
        [1.0, None]
        """
        n = len(completions)
        sizes = _per_sample(kwargs, "image_size", n)
        resized = _per_sample(kwargs, "resized_size", n)
        return [
            iou_score(completion_text(c), sol, protocol, size, rsize) if method == "iou" else None
            for c, sol, method, size, rsize in zip(completions, solution, accu_reward_method, sizes, resized,
                                                   strict=True)
        ]

    return visual_localization


def make_identity_consistency(protocol: str = "repic") -> RewardFunc:
    """Factory for the ICT reward (`yes_no_name` and `yes_no_name_multi`); same under both protocols."""
    _check_protocol(protocol)

    def identity_consistency(
        completions: Sequence[Any], solution: Sequence[Any], accu_reward_method: Sequence[str], **kwargs: Any
    ) -> list[float | None]:
        """ICT: name present (single) or fraction of names present (multi), 0 under 100 characters.

        >>> ict = make_identity_consistency()
        >>> long = "In this photo " + "a dog sits on the grass " * 4
        >>> ict([long + "<bo>", long + "<bo>", "<bo>"], ["<bo>", ["<bo>", "<mam>"], "<bo>"],
        ...     ["yes_no_name", "yes_no_name_multi", "yes_no_name"])
        [1.0, 0.5, 0.0]
        """
        out: list[float | None] = []
        for c, sol, method in zip(completions, solution, accu_reward_method, strict=True):
            if method == "yes_no_name":
                out.append(name_score(completion_text(c), sol))
            elif method == "yes_no_name_multi":
                out.append(names_fraction(completion_text(c), sol))
            else:
                out.append(None)
        return out

    return identity_consistency


REWARD_REGISTRY: dict[str, Callable[[str], RewardFunc]] = {
    "object_consistency": make_object_consistency,
    "visual_localization": make_visual_localization,
    "identity_consistency": make_identity_consistency,
}
