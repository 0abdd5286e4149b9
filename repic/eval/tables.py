"""Paper-style results tables: rows = model rows (params `models`, in order, by label), column groups = setting x
mode x P/R/F1, one decimal."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import pandas as pd

from repic.core.layout import DATASET_LABELS, MODE_LABELS, MODES, PAPER_TABLES, SETTINGS

METRICS = (("precision", "P"), ("recall", "R"), ("f1", "F1"))


def column_groups(metrics: dict, settings: Iterable[str] | None = None) -> dict[str, dict]:
    """Flatten the score stage's `{setting: {dataset: {mode: {model: cell}}}}` into the table's column groups
    `{group: {mode: {model: cell}}}`: a setting with one dataset is one group named by the setting (`single`),
    a setting with several gives one group per dataset (`single/myvlm`, `single/yollava`, ...), as in the
    paper's Table 1.

    >>> m = {"single": {"myvlm": {"skip": {}}, "yollava": {"skip": {}}}, "multi2": {"two": {"skip": {}}}}
    >>> list(column_groups(m))
    ['single/myvlm', 'single/yollava', 'multi2']
    """
    groups = {}
    for setting in _ordered(metrics, tuple(SETTINGS)):
        if settings is not None and setting not in settings:
            continue
        datasets = metrics[setting]
        for dataset, modes in datasets.items():
            groups[setting if len(datasets) == 1 else f"{setting}/{dataset}"] = modes
    return groups


def group_label(group: str) -> str:
    """`single` -> "Single", `single/myvlm` -> "Single MyVLM", `multi4` -> "4-concept"."""
    setting, _, dataset = group.partition("/")
    label = SETTINGS[setting].label if setting in SETTINGS else setting
    return f"{label} {DATASET_LABELS.get(dataset, dataset)}" if dataset else label


def _ordered(found: Iterable[str], preferred: tuple[str, ...]) -> list[str]:
    """Known names in the paper's order, then any others (a new model or setting) in first-seen order."""
    found = list(dict.fromkeys(found))
    return [x for x in preferred if x in found] + [x for x in found if x not in preferred]


def metrics_table(metrics: dict, labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Build the table from `{group: {mode: {model: {"precision", "recall", "f1", ...}}}}` (percent), groups
    being settings or `setting/dataset` (see `column_groups`).

    Rows: the model rows of `labels` (params `models`, name -> label) in its order, each shown by its label, then
    any other model found; without `labels`, the models found, by name, in first-seen order. Columns are a
    MultiIndex (setting, mode, metric) with metric in P/R/F1; a cell the input lacks is NaN.

    >>> t = metrics_table({"single": {"skip": {"base": {"precision": 81.27, "recall": 50.0, "f1": 61.9}}}})
    >>> float(t.loc["base", ("single", "skip", "P")])
    81.3
    """
    labels = dict(labels or {})
    found = [m for s in metrics.values() for md in s.values() for m in md]
    models = list(labels) + [m for m in dict.fromkeys(found) if m not in labels]
    columns, data = [], []
    found = list(metrics)
    rank = {s: i for i, s in enumerate(SETTINGS)}
    groups = sorted(found, key=lambda g: (rank.get(g.partition("/")[0], len(rank)), found.index(g)))
    for setting in groups:
        for mode in _ordered(metrics[setting], MODES):
            for key, label in METRICS:
                columns.append((setting, mode, label))
                data.append([metrics[setting][mode].get(model, {}).get(key, math.nan) for model in models])
    frame = pd.DataFrame(
        dict(zip(columns, data, strict=True)),
        index=pd.Index([labels.get(m, m) for m in models], name="model"),
    )
    frame.columns = pd.MultiIndex.from_tuples(columns, names=["setting", "mode", "metric"])
    return frame.astype(float).round(1)


def _header(column: object) -> str:
    if isinstance(column, tuple):
        if len(column) == 3:
            setting, mode, metric = column
            return f"{group_label(setting)} {MODE_LABELS.get(mode, mode)} {metric}"
        return " ".join(str(c) for c in column)
    return str(column)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def to_markdown(df: pd.DataFrame) -> str:
    """Render `df` (index as first column) as a GitHub markdown table, floats with one decimal."""
    headers = [str(df.index.name or "")] + [_header(c) for c in df.columns]
    align = ["---"] + ["---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    for index, row in zip(df.index, df.itertuples(index=False), strict=True):
        cells = [_cell(index)] + [_cell(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The paper's two tables: Table 1 single-concept (one column group per dataset when there are several),
# Table 2 multi-concept (2- and 4-concept), each x skip-retrieval / retrieval x P/R/F1 (layout.Setting.paper_table).
TABLE_SETTINGS = {t: tuple(s for s in SETTINGS if SETTINGS[s].paper_table == t) for t in PAPER_TABLES}


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "%": r"\%", "&": r"\&", "#": r"\#", "_": r"\_", "$": r"\$",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    r"""`text` as LaTeX prints it literally (a bare `%` would comment out the rest of the line, braces included).

    >>> print(latex_escape("P/R/F1 (%), 50_50 & #1"))
    P/R/F1 (\%), 50\_50 \& \#1
    """
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def to_latex(df: pd.DataFrame, caption: str) -> str:
    """A booktabs LaTeX table with multicolumn headers (setting, mode, metric); the caption, the row labels and
    the headers escaped (a `%` or `_` in a model's label is printed, not interpreted)."""
    flat = df.copy()
    flat.columns = pd.MultiIndex.from_tuples(
        [(group_label(s), MODE_LABELS.get(m, m), k) for s, m, k in df.columns])
    return flat.to_latex(float_format="%.1f", na_rep="-", multicolumn=True, multicolumn_format="c",
                         caption=latex_escape(caption), position="t", escape=True)


def paper_tables(metrics: dict, protocol: str, labels: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """{table name: {"md", "csv", "tex"}} for the paper's Tables 1 and 2 from the score stage's metrics
    (`{setting: {dataset: {mode: {model: cell}}}}`) of one protocol; rows: the model rows of `labels`."""
    out = {}
    for name, settings in TABLE_SETTINGS.items():
        subset = column_groups(metrics, settings)
        if not subset:
            continue
        df = metrics_table(subset, labels)
        title = f"{PAPER_TABLES[name]} personalized captioning, name P/R/F1 (%), protocol {protocol}"
        out[name] = {"md": f"{title}\n\n{to_markdown(df)}", "csv": df.to_csv(float_format="%.1f"),
                     "tex": to_latex(df, title)}
    return out
