"""The paper-style metrics table and its dependency-free markdown rendering."""

from __future__ import annotations

import doctest
import math

import pandas as pd

from repic.eval import tables
from repic.eval.tables import metrics_table, to_markdown


def cell(p: float, r: float, f: float) -> dict:
    return {"precision": p, "recall": r, "f1": f, "n_slots": 10}


METRICS = {
    # deliberately out of the paper's order: the table must reorder
    "multi2": {"skip": {"trained": cell(90.0, 80.0, 84.7058), "base": cell(70.04, 60.06, 64.66)}},
    "single": {
        "retrieval": {"base": cell(50.0, 40.0, 44.4444)},
        "skip": {"base": cell(81.27, 50.0, 61.904), "trained": cell(95.0, 93.33, 94.16)},
    },
}


def test_docstring_examples_hold():
    result = doctest.testmod(tables)
    assert result.attempted > 0 and result.failed == 0


def test_layout_follows_the_paper_order():
    df = metrics_table(METRICS, {"base": "base", "trained": "trained"})
    assert list(df.index) == ["base", "trained"] and df.index.name == "model"
    assert list(df.columns) == [
        ("single", "skip", "P"), ("single", "skip", "R"), ("single", "skip", "F1"),
        ("single", "retrieval", "P"), ("single", "retrieval", "R"), ("single", "retrieval", "F1"),
        ("multi2", "skip", "P"), ("multi2", "skip", "R"), ("multi2", "skip", "F1"),
    ]
    assert list(df.columns.names) == ["setting", "mode", "metric"]


def test_values_have_one_decimal_and_missing_cells_are_nan():
    df = metrics_table(METRICS)
    assert df.loc["base", ("single", "skip", "P")] == 81.3
    assert df.loc["trained", ("multi2", "skip", "F1")] == 84.7
    assert df.loc["base", ("multi2", "skip", "R")] == 60.1
    assert math.isnan(df.loc["trained", ("single", "retrieval", "P")])


def test_unknown_models_and_settings_come_after_the_known_ones():
    df = metrics_table({"single": {"skip": {"new-7b": cell(1, 2, 3), "base": cell(4, 5, 6)}},
                        "custom": {"skip": {"base": cell(7, 8, 9)}}}, {"base": "base"})
    assert list(df.index) == ["base", "new-7b"]
    assert [c[0] for c in df.columns[::3]] == ["single", "custom"]


def test_rows_follow_the_params_models_order_with_their_labels():
    """One row per params `models` entry, in its order (the paper's), shown by label; a row without metrics is
    all NaN rather than missing."""
    labels = {"base": "Qwen2.5-VL-7B (zero-shot)", "repic_lora": "RePIC (released LoRA)", "trained": "Ours"}
    df = metrics_table({"single": {"skip": {"trained": cell(1, 2, 3), "base": cell(4, 5, 6)}}}, labels)
    assert list(df.index) == ["Qwen2.5-VL-7B (zero-shot)", "RePIC (released LoRA)", "Ours"]
    assert df.loc["Ours", ("single", "skip", "P")] == 1.0
    assert df.loc["RePIC (released LoRA)"].isna().all()
    md = tables.paper_tables({"single": {"d": {"skip": {"trained": cell(1, 2, 3)}}}}, "repic", labels)
    assert [line.split(" | ")[0] for line in md["table1_single"]["md"].splitlines()[4:]] == [
        "| Qwen2.5-VL-7B (zero-shot)", "| RePIC (released LoRA)", "| Ours"]


def test_markdown_is_a_valid_table_with_labelled_columns():
    text = to_markdown(metrics_table(METRICS, {"base": "base", "trained": "trained"}))
    lines = text.splitlines()
    assert text.endswith("\n") and len(lines) == 4
    assert lines[0].startswith("| model | Single skip-retrieval P | Single skip-retrieval R |")
    assert lines[0].endswith("| 2-concept skip-retrieval F1 |")
    assert lines[1] == "|---|" + "|".join(["---:"] * 9) + "|"
    assert lines[2] == "| base | 81.3 | 50.0 | 61.9 | 50.0 | 40.0 | 44.4 | 70.0 | 60.1 | 64.7 |"
    assert lines[3] == "| trained | 95.0 | 93.3 | 94.2 | - | - | - | 90.0 | 80.0 | 84.7 |"
    assert all(line.count("|") == 11 for line in lines)


def test_markdown_of_a_plain_frame_escapes_pipes_and_keeps_ints():
    df = pd.DataFrame({"name": ["a|b"], "n": [3], "x": [0.26]}, index=pd.Index(["r"], name="id"))
    expected = ["| id | name | n | x |", "|---|---|---:|---:|", "| r | a\\|b | 3 | 0.3 |"]
    assert to_markdown(df).splitlines() == expected


def test_paper_tables_in_three_formats():
    from repic.eval.tables import paper_tables

    cell = {"precision": 80.04, "recall": 50.0, "f1": 61.55, "n_slots": 10}
    metrics = {s: {"synthetic": {m: {"base": cell, "trained": cell} for m in ("skip", "retrieval")}}
               for s in ("single", "multi2", "multi4")}
    tables = paper_tables(metrics, "repic")
    assert set(tables) == {"table1_single", "table2_multi"}
    t2 = tables["table2_multi"]
    assert "2-concept skip-retrieval P" in t2["md"] and "4-concept retrieval F1" in t2["md"]
    assert t2["csv"].splitlines()[0].startswith("setting,multi2,multi2")
    assert "\\begin{table}" in t2["tex"] and "\\multicolumn" in t2["tex"] and "80.0" in t2["tex"]
    assert "multi2" not in tables["table1_single"]["csv"]


def test_table1_has_one_column_group_per_single_concept_dataset():
    from repic.eval.tables import column_groups, paper_tables

    def c(f1: float) -> dict:
        return {"precision": f1, "recall": f1, "f1": f1, "n_slots": 3}

    metrics = {  # the score stage's layout: setting -> dataset -> mode -> model
        "multi2": {"2_concepts": {"skip": {"base": c(10.0)}}},
        "single": {ds: {m: {"base": c(i + 0.25), "trained": c(i + 50.0)} for m in ("skip", "retrieval")}
                   for i, ds in enumerate(("myvlm", "yollava", "dreambooth"))},
    }
    assert list(column_groups(metrics)) == ["single/myvlm", "single/yollava", "single/dreambooth", "multi2"]
    df = metrics_table(column_groups(metrics, ("single",)))
    assert [c[0] for c in df.columns[::3]] == ["single/myvlm"] * 2 + ["single/yollava"] * 2 + ["single/dreambooth"] * 2
    assert df.loc["base", ("single/yollava", "retrieval", "F1")] == 1.2  # 1.25 rounded half to even
    assert df.loc["trained", ("single/dreambooth", "skip", "P")] == 52.0
    t1 = paper_tables(metrics, "repic")["table1_single"]
    header = t1["md"].splitlines()[2]
    assert header.startswith("| model | Single MyVLM skip-retrieval P |")
    assert "Single Yo'LLaVA retrieval F1" in header and header.endswith("| Single DreamBooth retrieval F1 |")
    assert t1["md"].splitlines()[4].startswith("| base | 0.2 | 0.2 | 0.2 | 0.2 | 0.2 | 0.2 | 1.2 |")
    assert "Single Yo'LLaVA" in t1["tex"] and "2_concepts" not in t1["csv"]
    assert "2-concept skip-retrieval P" in paper_tables(metrics, "repic")["table2_multi"]["md"]


def test_latex_tables_escape_the_caption_and_labels():
    """A bare % in LaTeX comments out the rest of the line (here the caption's closing brace); `_`, `&`, `#` in a
    model's label would break the tabular: all are printed literally."""
    from repic.eval.tables import paper_tables

    cell = {"precision": 80.04, "recall": 50.0, "f1": 61.55, "n_slots": 10}
    metrics = {"single": {"synthetic": {m: {"base": cell} for m in ("skip", "retrieval")}}}
    tex = paper_tables(metrics, "repic", {"base": "Qwen_7B 50% & #1"})["table1_single"]["tex"]
    assert "\\caption{Single-concept personalized captioning, name P/R/F1 (\\%), protocol repic}\n" in tex
    assert "\nQwen\\_7B 50\\% \\& \\#1 & 80.0 & 50.0 & 61.6 & 80.0" in tex
    for line in tex.splitlines():  # no unescaped %, which would comment out the rest of the line
        assert "%" not in line.replace("\\%", "")
