"""Exact-value tests of RePIC's name precision / recall / F1 protocol and its corrected variant."""

from __future__ import annotations

import doctest
import json

import pandas as pd
import pytest

from repic.core.io import RepicError
from repic.data.validate import load_caption_rows
from repic.eval import metrics
from repic.eval.metrics import score_captions, tokenize_caption

from .conftest import SHARED, need_shared

REPIC_DATA = SHARED / "repic_eval" / "data"


def prf(summary: dict) -> tuple[float, float, float]:
    return round(summary["precision"], 3), round(summary["recall"], 3), round(summary["f1"], 3)


def outcomes(records: list[dict]) -> list[str]:
    return [r["outcome"] for r in records]


def test_docstring_examples_hold():
    result = doctest.testmod(metrics)
    assert result.attempted > 0 and result.failed == 0


def test_tokenizer_removes_eos_strips_punctuation_and_drops_empty_tokens():
    caption = '"<Anya>," said (Bond)... -- [<Bluey>]! ; </s>'
    assert tokenize_caption(caption, lowercase=False) == ["<Anya>", "said", "Bond", "<Bluey>"]
    assert tokenize_caption("Hi <BO>!</s>", lowercase=True) == ["hi", "<bo>"]
    # only the ends are stripped: internal punctuation and the possessive 's stay
    assert tokenize_caption("<mr.krab> <Anya>'s", lowercase=False) == ["<mr.krab>", "<Anya>'s"]


# ---------------------------------------------------------------- the repic protocol

MULTI2_ROWS = [
    ["q0.jpg", ["<Anya>", "<Bond>"], "<Anya> plays with Bond.", "Give a caption."],
    ["q1.jpg", ["<Bluey>", "<Bingo>"], "<Bluey> and <Anya> run</s>", "Give a caption."],
    ["q2.jpg", ["<Bluey>", "<Bingo>"], "Two dogs -- and a ball.", "Give a caption."],
    ["q3.jpg", ["<Anya>", "<Bond>"], "(Bingo!)", "Give a caption."],
]


def test_multi2_counts_correct_miss_and_none():
    summary, records = score_captions(MULTI2_ROWS, "multi2")
    assert outcomes(records) == ["correct", "correct", "correct", "miss", "none", "none", "miss", "miss"]
    # correct 3, predicted 3 + 3 MISS, 8 slots
    assert prf(summary) == (50.0, 37.5, round(100 * 2 * 0.5 * 0.375 / 0.875, 3))
    assert summary["n_slots"] == 8 and summary["n_rows"] == 4
    assert summary["n_correct"] == 3 and summary["n_miss"] == 3


def test_per_slot_records_fit_a_dataframe():
    _, records = score_captions(MULTI2_ROWS, "multi2")
    frame = pd.DataFrame(records)
    assert list(frame.columns) == ["query_image", "row", "slot", "key", "outcome"]
    assert frame.loc[3].to_dict() == {"query_image": "q1.jpg", "row": 1, "slot": 1, "key": "<Bingo>",
                                      "outcome": "miss"}


def test_multi2_is_case_sensitive_but_single_and_multi4_are_not():
    rows2 = [["q.jpg", ["<Anya>", "<Bond>"], "anya and BOND", "?"]]
    summary, records = score_captions(rows2, "multi2")
    assert outcomes(records) == ["none", "none"] and summary["f1"] == 0.0

    rows1 = [["q.jpg", ["<Anya>"], "ANYA smiles", "?"]]
    assert outcomes(score_captions(rows1, "single")[1]) == ["correct"]

    rows4 = [["q.jpg", ["<Thor>", "<hulk>", "<kim>", "<lee>"], "<THOR> with Hulk, KIM and <Lee>.", "?"]]
    summary4, records4 = score_captions(rows4, "multi4")
    assert outcomes(records4) == ["correct"] * 4 and prf(summary4) == (100.0, 100.0, 100.0)


def test_bare_and_bracketed_forms_match_but_partial_forms_do_not():
    rows = [
        ["a.jpg", ["<bo>"], "Here is bo.", "?"],
        ["b.jpg", ["<bo>"], "Here is <bo>.", "?"],
        ["c.jpg", ["<bo>"], "Here is <bo and a bowl.", "?"],  # unclosed bracket, and "bowl" is not "bo"
        ["d.jpg", ["<mam>"], "Here is <bo>.", "?"],  # a pool key outside this row's gt: MISS
    ]
    summary, records = score_captions(rows, "single")
    assert outcomes(records) == ["correct", "correct", "none", "miss"]
    assert prf(summary) == (round(200 / 3, 3), 50.0, round(100 * 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5), 3))


def test_candidate_pool_is_only_the_files_gt_keys():
    # <mam> is a concept elsewhere, but not a gt key in this file, so naming it is not a MISS
    rows = [["a.jpg", ["<bo>"], "Here is <mam>.", "?"], ["b.jpg", ["<dug>"], "A dog.", "?"]]
    summary, records = score_captions(rows, "single")
    assert outcomes(records) == ["none", "none"]
    assert prf(summary) == (0.0, 0.0, 0.0)


def test_all_miss_gives_zero_f1():
    rows = [["a.jpg", ["<bo>"], "<dug>", "?"], ["b.jpg", ["<dug>"], "<bo>", "?"]]
    summary, records = score_captions(rows, "single")
    assert outcomes(records) == ["miss", "miss"]
    assert prf(summary) == (0.0, 0.0, 0.0) and summary["n_miss"] == 2


def test_empty_file_scores_zero_without_dividing_by_zero():
    summary, records = score_captions([], "multi4")
    assert records == [] and prf(summary) == (0.0, 0.0, 0.0) and summary["n_slots"] == 0


# ---------------------------------------------------------------- strict protocol

AVENGERS_DB = {
    "concept_dict": {
        "<ironman>": {"name": "Iron Man", "image": "i.jpg", "info": "", "category": "person"},
        "<black widow>": {"name": "Black Widow", "image": "b.jpg", "info": "", "category": "person"},
        "<quick silver>": {"name": "Quicksilver", "image": "q.jpg", "info": "", "category": "person"},
        "<thor>": {"name": "Thor", "image": "t.jpg", "info": "", "category": "person"},
    },
    "path_to_concept": {},
}
AVENGERS_ROW = [
    "g.jpg",
    ["<thor>", "<ironman>", "<black widow>", "<quick silver>"],
    "<Thor>'s hammer, <Iron Man>, <Black Widow> and Quicksilver's speed.</s>",
    "?",
]


def test_repic_misses_possessives_multiword_keys_and_display_names():
    summary, records = score_captions([AVENGERS_ROW], "multi4", "repic", database=AVENGERS_DB)
    assert outcomes(records) == ["none"] * 4
    assert prf(summary) == (0.0, 0.0, 0.0)


def test_strict_matches_possessives_and_multiword_keys():
    _, records = score_captions([AVENGERS_ROW], "multi4", "strict")
    # <ironman> / <quick silver> are written by display name, unknown without the database
    assert outcomes(records) == ["correct", "none", "correct", "none"]


def test_strict_with_database_matches_display_names():
    summary, records = score_captions([AVENGERS_ROW], "multi4", "strict", database=AVENGERS_DB)
    assert outcomes(records) == ["correct"] * 4
    assert prf(summary) == (100.0, 100.0, 100.0)


def test_strict_keeps_bare_possessive_and_case_rule_of_multi2():
    rows = [["q.jpg", ["<Anya>", "<Bond>"], "Anya's dog and <Bond>'s ball; bond.", "?"]]
    assert outcomes(score_captions(rows, "multi2", "repic")[1]) == ["none", "none"]
    assert outcomes(score_captions(rows, "multi2", "strict")[1]) == ["correct", "correct"]
    lower = [["q.jpg", ["<Anya>", "<Bond>"], "anya's dog", "?"]]
    assert outcomes(score_captions(lower, "multi2", "strict")[1]) == ["none", "none"]


def test_strict_miss_rule_sees_multiword_wrong_keys():
    rows = [
        ["a.jpg", ["<thor>", "<hulk>", "<kim>", "<lee>"], "<Thor> and Black Widow.", "?"],
        ["b.jpg", ["<black widow>", "<hulk>", "<kim>", "<lee>"], "A team photo.", "?"],
    ]
    assert outcomes(score_captions(rows, "multi4", "repic")[1])[:4] == ["correct", "none", "none", "none"]
    assert outcomes(score_captions(rows, "multi4", "strict")[1])[:4] == ["correct", "miss", "miss", "miss"]


# ---------------------------------------------------------------- validation and loading


def test_wrong_number_of_gt_keys_or_unknown_setting_is_a_user_error():
    with pytest.raises(RepicError, match="caption row 0: setting multi2 expects 2 gt key"):
        score_captions([["q.jpg", ["<Anya>"], "Anya", "?"]], "multi2")
    with pytest.raises(RepicError, match="scoring setting 'multi3'"):
        score_captions([], "multi3")
    with pytest.raises(RepicError, match="scoring protocol 'loose'"):
        score_captions([], "single", "loose")


def test_load_caption_rows_accepts_ours_and_rows_without_question(tmp_path):
    path = tmp_path / "captions.json"
    rows = [["q.jpg", ["<bo>"], "<bo> sleeps", "Give a caption."], ["r.jpg", ["<bo>"], "a dog"]]
    path.write_text(json.dumps(rows))
    assert load_caption_rows(path) == rows


@pytest.mark.parametrize(
    "bad_row",
    [
        ["q.jpg", "<bo>", "caption", "?"],  # gt not a list
        ["q.jpg", [], "caption", "?"],  # no gt key
        ["q.jpg", ["<bo>"], None, "?"],  # no caption
        ["q.jpg", ["<bo>"]],  # too short
        {"image": "q.jpg"},  # not a row
    ],
)
def test_load_caption_rows_names_file_and_row_of_a_malformed_row(tmp_path, bad_row):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps([["ok.jpg", ["<bo>"], "fine", "?"], bad_row]))
    with pytest.raises(RepicError) as err:
        load_caption_rows(path)
    message = str(err.value)
    assert str(path) in message and "row 1" in message and "expected [query_image" in message


def test_load_caption_rows_rejects_a_non_list_file(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"q.jpg": ["<bo>"]}))
    with pytest.raises(RepicError, match="expected a JSON list"):
        load_caption_rows(path)


# ---------------------------------------------------------------- real RePIC keys


def test_real_4_concept_keys_with_synthetic_captions():
    need_shared(REPIC_DATA)
    queries = json.loads((REPIC_DATA / "query_tot" / "4_concept_query_templates.json").read_text())
    database_path = REPIC_DATA / "database_tot" / "database_4_concepts" / "database_mod.json"
    database = json.loads(database_path.read_text())
    rows = [
        [image, keys, f"From left: {', '.join(keys)}.", "Give a personalized caption of this image."]
        for image, subsets in queries.items()
        for keys in subsets
    ]
    # 105 subsets x 4 slots; 51 slots hold a multi-word key (e.g. <black widow>) that no token can equal
    summary, records = score_captions(rows, "multi4", "repic")
    counts = (summary["n_rows"], summary["n_slots"], summary["n_correct"], summary["n_miss"])
    assert counts == (105, 420, 369, 0)
    recall = 369 / 420
    assert prf(summary) == (100.0, round(100 * recall, 3), round(100 * 2 * recall / (1 + recall), 3))
    assert {r["key"] for r in records if r["outcome"] == "none"} == {
        "<black widow>", "<captain america>", "<scarlet witch>", "<quick silver>"}

    strict, _ = score_captions(rows, "multi4", "strict", database=database)
    assert prf(strict) == (100.0, 100.0, 100.0)

    # naming one wrong pool key turns every unmatched slot of the row into a MISS
    single_word_pool = sorted({k for _, keys, _, _ in rows for k in keys if " " not in k})
    wrong = []
    for img, keys, cap, q in rows:
        intruder = next(k for k in single_word_pool if k not in keys)
        wrong.append([img, keys, f"{cap} Also {intruder}.", q])
    wrong_summary, _ = score_captions(wrong, "multi4", "repic")
    assert (wrong_summary["n_correct"], wrong_summary["n_miss"]) == (369, 51)
    assert round(wrong_summary["precision"], 3) == round(100 * 369 / 420, 3)


# ---------------------------------------------------------------- scaling


@pytest.mark.parametrize("protocol", ["repic", "strict"])
def test_scoring_is_linear_in_rows_when_the_pool_grows_with_the_file(protocol):
    """Every row brings its own key, so the pool is as large as the file: 20k rows must not cost rows x pool
    (the per-row walk over the pool took 61 s for 2k rows under strict; indexed, 20k rows take ~0.3 s)."""
    import time

    n = 20_000
    rows = [[f"q{i}.png", [f"<k{i}>"], f"<k{i}>'s toy and k{(i + 1) % n} play with <k{i + n}>.", "?"]
            for i in range(n)]
    start = time.perf_counter()
    summary, _ = score_captions(rows, "single", protocol)
    elapsed = time.perf_counter() - start
    # strict reads the possessive; repic does not, yet sees the next row's key -> a miss for every slot
    expected = (n, 0) if protocol == "strict" else (0, n)
    assert (summary["n_correct"], summary["n_miss"]) == expected
    assert elapsed < 5.0, f"{protocol}: {n} rows took {elapsed:.1f} s"
