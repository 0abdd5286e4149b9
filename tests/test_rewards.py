"""Exact-value tests of the three verifiable rewards under both protocols."""

from __future__ import annotations

import doctest
import json

import pytest

from repic.core.io import RepicError
from repic.train import rewards
from repic.train.rewards import (
    REWARD_REGISTRY,
    completion_text,
    iou_repic,
    iou_standard,
)


def make_rewards(protocol: str) -> dict:
    """The three rewards of `protocol`, by registry name (as train_grpo_lora builds them)."""
    return {name: factory(protocol) for name, factory in REWARD_REGISTRY.items()}


REPIC = make_rewards("repic")
STRICT = make_rewards("strict")
# 100 characters of neutral caption text: long enough for the ICT length gate on its own.
FILLER = (
    "A small brown dog sits on a green lawn next to a red ball while the late afternoon sun warms a yard."
)
assert len(FILLER) == 100


def conv(text: str) -> list[dict]:
    """TRL's conversational completion with list-of-parts content."""
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


# ---------------------------------------------------------------- plumbing


def test_docstring_examples_hold():
    result = doctest.testmod(rewards)
    assert result.attempted > 0 and result.failed == 0


def test_completion_text_accepts_plain_and_conversational_forms():
    assert completion_text("yes") == "yes"
    assert completion_text([{"role": "assistant", "content": "no"}]) == "no"
    assert completion_text(conv("a [1, 2, 3, 4]")) == "a [1, 2, 3, 4]"
    # image parts and tool results are not the model's answer text
    mixed = [
        {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "yes"}]},
        {"role": "tool", "content": "no"},
    ]
    assert completion_text(mixed) == "yes"
    assert completion_text(None) == ""


def test_registry_names_match_function_names_for_trl_logging():
    from repic.core.layout import REWARDS

    assert tuple(REWARD_REGISTRY) == REWARDS == ("object_consistency", "visual_localization", "identity_consistency")
    for protocol in ("repic", "strict"):
        funcs = make_rewards(protocol)
        assert list(funcs) == list(REWARD_REGISTRY)
        for name, func in funcs.items():
            assert func.__name__ == name
            assert REWARD_REGISTRY[name](protocol).__name__ == name


def test_unknown_protocol_is_a_user_error():
    for factory in REWARD_REGISTRY.values():
        with pytest.raises(RepicError, match="reward protocol 'lenient'"):
            factory("lenient")


def test_each_reward_scores_only_its_own_type():
    completions = ["yes", "[0, 0, 10, 10]", FILLER + " <bo>", FILLER + " <bo> <mam>", "yes"]
    solution = ["yes", [0, 0, 10, 10], "<bo>", ["<bo>", "<mam>"], "yes"]
    methods = ["yes_no", "iou", "yes_no_name", "yes_no_name_multi", "mcq"]
    assert REPIC["object_consistency"](completions, solution, methods) == [1.0, None, None, None, None]
    assert REPIC["visual_localization"](completions, solution, methods) == [None, 1.0, None, None, None]
    assert REPIC["identity_consistency"](completions, solution, methods) == [None, None, 1.0, 1.0, None]


def test_rewards_accept_the_extra_kwargs_trl_passes():
    out = STRICT["object_consistency"](
        prompts=[[{"role": "user", "content": "Is it <bo>?"}]],
        completions=conv("No."),
        solution=["no"],
        accu_reward_method=["yes_no"],
        completion_ids=[[1, 2]],
        log_extra=lambda *a: None,
        log_metric=lambda *a: None,
        trainer_state=None,
    )
    assert out == [1.0]


# ---------------------------------------------------------------- object consistency (yes_no)


@pytest.mark.parametrize(
    ("answer", "solution", "repic", "strict"),
    [
        ("Yes.", "yes", 1.0, 1.0),
        ("no", "yes", 0.0, 0.0),
        ("NO, it is a different dog.", "no", 1.0, 1.0),
        # quirk: "know" contains "no"
        ("I don't know", "no", 1.0, 0.0),
        ("I don't know", "yes", 0.0, 0.0),
        # quirk: "not" contains "no"
        ("It is not the same toy.", "no", 1.0, 0.0),
        # quirk: "yesterday" contains "yes" and comes before the real answer
        ("Unlike yesterday, no.", "no", 0.0, 1.0),
        ("", "no", 0.0, 0.0),
        # a solution with no yes/no never pays, even for an identical answer
        ("maybe", "maybe", 0.0, 0.0),
    ],
)
def test_object_consistency(answer, solution, repic, strict):
    assert REPIC["object_consistency"]([answer], [solution], ["yes_no"]) == [repic]
    assert STRICT["object_consistency"]([conv(answer)], [solution], ["yes_no"]) == [strict]


# ---------------------------------------------------------------- visual localization (iou)


def test_iou_conventions_differ_only_on_one_pixel_overlaps():
    assert iou_repic([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou_standard([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert iou_repic([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    # a 1-px-wide overlap: standard IoU 10 / 20, the original's inclusive arithmetic sees no overlap
    assert iou_standard([0, 0, 2, 10], [1, 0, 2, 10]) == 0.5
    assert iou_repic([0, 0, 2, 10], [1, 0, 2, 10]) == 0.0
    # degenerate boxes: the original floors the union at 1, standard returns 0
    assert iou_repic([3, 3, 3, 3], [3, 3, 3, 3]) == 0.0
    assert iou_standard([3, 3, 3, 3], [3, 3, 3, 3]) == 0.0


@pytest.mark.parametrize(
    ("answer", "gt", "repic", "strict"),
    [
        # IoU exactly 0.5 (50 / 100) passes under both conventions (>= threshold)
        ('{"bbox_2d": [0, 0, 10, 5], "label": "<bo>"}', [0, 0, 10, 10], 1.0, 1.0),
        # IoU 0.4 fails under both
        ("[0, 0, 10, 4]", [0, 0, 10, 10], 0.0, 0.0),
        # IoU exactly 0.5 through a 1-px-wide overlap: only the standard convention passes
        ("[1, 0, 2, 10]", [0, 0, 2, 10], 0.0, 1.0),
        ("[0,0,1,1]", [0, 0, 1, 2], 0.0, 1.0),
        # the first box counts, not the best one
        ("[50, 50, 60, 60] or [0, 0, 10, 10]", [0, 0, 10, 10], 0.0, 0.0),
        # only non-negative integer boxes are parsed
        ("[0.0, 0.0, 10.0, 10.0]", [0, 0, 10, 10], 0.0, 0.0),
        ("no box here", [0, 0, 10, 10], 0.0, 0.0),
        # the solution may arrive as a JSON string; a malformed one scores 0
        ("[0, 0, 10, 10]", "[0, 0, 10, 10]", 1.0, 1.0),
        ("[0, 0, 10, 10]", "[0, 0, 10]", 0.0, 0.0),
    ],
)
def test_visual_localization(answer, gt, repic, strict):
    assert REPIC["visual_localization"]([answer], [gt], ["iou"]) == [repic]
    assert STRICT["visual_localization"]([conv(answer)], [gt], ["iou"]) == [strict]


def test_strict_rescales_gt_box_to_the_resized_image():
    # gt in a 1000x800 original; the model saw it at 500x400 and answers in those pixels
    answer, gt = ["[50, 50, 100, 100]"], [[100, 100, 200, 200]]
    sizes = {"image_size": [[1000, 800]], "resized_size": [[500, 400]]}
    assert STRICT["visual_localization"](answer, gt, ["iou"], **sizes) == [1.0]
    # quirk: the original compares against the unscaled box
    assert REPIC["visual_localization"](answer, gt, ["iou"], **sizes) == [0.0]
    # without sizes (or with None for a sample) strict cannot rescale
    assert STRICT["visual_localization"](answer, gt, ["iou"]) == [0.0]
    assert STRICT["visual_localization"](answer, gt, ["iou"], image_size=[None], resized_size=[None]) == [0.0]


# ---------------------------------------------------------------- identity consistency


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (FILLER + " <bo>", 1.0),
        ("<bo>" + FILLER[:95], 0.0),  # 99 characters: below the length gate
        ("<bo>" + FILLER[:96], 1.0),  # exactly 100 characters
        (FILLER + " <bo> the dog </bo>", 0.0),  # closing form present: pseudo-tag hacking
        (FILLER + " </bo>", 0.0),
        (FILLER + " <Bo>", 0.0),  # case-sensitive exact string
        (FILLER + " bo", 0.0),  # the bare name is not the exact string
        (FILLER + " <bo>'s ball", 1.0),  # substring match, so possessives count
    ],
)
def test_identity_consistency_single(answer, expected):
    for funcs in (REPIC, STRICT):  # ICT has no protocol difference
        assert funcs["identity_consistency"]([answer], ["<bo>"], ["yes_no_name"]) == [expected]
        assert funcs["identity_consistency"]([conv(answer)], ["<bo>"], ["yes_no_name"]) == [expected]


@pytest.mark.parametrize(
    ("answer", "names", "expected"),
    [
        (FILLER + " <bo> and <mam>", ["<bo>", "<mam>", "<dug>"], 2 / 3),
        (FILLER + " <bo> <mam> <dug>", json.dumps(["<bo>", "<mam>", "<dug>"]), 1.0),
        ("<bo> <mam>", ["<bo>", "<mam>"], 0.0),  # short answer
        # no closing-tag check for multi, as in the original
        (FILLER + " <bo></bo>", ["<bo>", "<mam>"], 0.5),
        (FILLER + " <bo>", [], 0.0),
        (FILLER + " <bo>", "<bo>", 1.0),  # a bare string counts as one name
    ],
)
def test_identity_consistency_multi(answer, names, expected):
    for funcs in (REPIC, STRICT):
        out = funcs["identity_consistency"]([answer], [names], ["yes_no_name_multi"])
        assert out == [pytest.approx(expected)]


def test_single_name_solution_as_training_stores_it():
    """`repic.train.build_examples` stores every solution as JSON text: a single name arrives as '"<bo>"'."""
    import json

    from repic.train.rewards import make_identity_consistency

    long = "In this photo " + "a dog sits on the grass " * 4
    ict = make_identity_consistency()
    assert ict([long + "<bo>", long], [json.dumps("<bo>"), json.dumps("<bo>")], ["yes_no_name"] * 2) == [1.0, 0.0]
