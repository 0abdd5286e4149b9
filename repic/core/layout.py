"""The pipeline's vocabulary and on-disk layout, in one place.

Vocabulary: the evaluation settings (with their number of concepts per query), the retrieval modes, the model
rows every setting is captioned with (read from params `models`), the scoring protocols and RePIC's reward
methods. Layout: the folder each stage writes (the paths `dvc.yaml` passes as `--out`, checked equal to its `outs`
by tests/test_layout.py) and the name of every file inside it, e.g. a caption file
`<out>/<dataset>/<model>_<mode>.json`.

Every module and stage takes these names from here. Adding a setting is a change here plus the params (and its
caption stage and an item of the retrieve stage's `foreach` in dvc.yaml); adding a model row is one params entry
(see the README's development notes); everything that loops over settings, modes or models follows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repic.core.io import RepicError, read_json


# ---- vocabulary
@dataclass(frozen=True)
class Setting:
    """An evaluation setting: `n_concepts` ground-truth keys per query (and per scored caption row)."""

    name: str
    n_concepts: int
    label: str  # column-group header of the paper tables
    paper_table: str  # which of the paper's tables reports it
    # RePIC's 4-concept query maps hold a list of key subsets per image (one query each); the others one list
    subsets_per_image: bool = False
    # RePIC's scorer lowercases captions and keys, except its 2-concept script (kept as is: protocol `repic`)
    case_sensitive: bool = False


# The paper's results tables (file name stem -> title): Table 1 single-concept, Table 2 multi-concept
PAPER_TABLES = {"table1_single": "Single-concept", "table2_multi": "Multi-concept"}

SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("single", 1, "Single", "table1_single"),
    Setting("multi2", 2, "2-concept", "table2_multi", case_sensitive=True),
    Setting("multi4", 4, "4-concept", "table2_multi", subsets_per_image=True),
)}

# references from the ground truth (skip-retrieval) or from the retrieval database
SKIP, RETRIEVAL = "skip", "retrieval"
MODES = (SKIP, RETRIEVAL)
MODE_LABELS = {SKIP: "skip-retrieval", RETRIEVAL: "retrieval"}

# The model rows: params `models` (name -> {label, kind, path}), in table order; every setting x dataset x mode is
# captioned once per row, and scored, judged and reported per row. Adding a row is one params entry.
MODEL_KINDS = ("model", "adapter")  # `path` is a model folder | a PEFT LoRA adapter on `base.base_model`


@dataclass(frozen=True)
class ModelRow:
    """One model row of every table: `name` (caption files, metrics keys, DVC stage `caption_<setting>@<name>`),
    `label` (tables, report), and its weights: a model folder (`kind: model`) or a LoRA adapter (`kind: adapter`)
    applied to params `base.base_model`."""

    name: str
    label: str
    kind: str
    path: str


def model_rows(params: dict[str, Any]) -> list[ModelRow]:
    """The model rows of params (`models`), in their order (the tables' order)."""
    return [ModelRow(name, row["label"], row["kind"], row["path"]) for name, row in params["models"].items()]


def model_labels(params: dict[str, Any]) -> dict[str, str]:
    """Row name -> label of params `models`, in table order."""
    return {name: row["label"] for name, row in params["models"].items()}


PROTOCOLS = ("repic", "strict")  # RePIC's exact scoring / reward rules, and the corrected ones beside them
PROTOCOL_DEFAULT = "repic"

# RePIC's training JSON routes each sample to a reward by its `accu_reward_method`
REWARD_METHODS = ("yes_no", "iou", "yes_no_name", "yes_no_name_multi")
# The rewards params `train_grpo_lora.rewards` may name (repic.train.rewards.REWARD_REGISTRY; a test keeps
# both equal): OCT (yes_no), VLT (iou), ICT (yes_no_name, yes_no_name_multi)
REWARDS = ("object_consistency", "visual_localization", "identity_consistency")

# Display names of RePIC's datasets in the tables (any other dataset is shown by its params name)
DATASET_LABELS = {"myvlm": "MyVLM", "yollava": "Yo'LLaVA", "dreambooth": "DreamBooth"}


def check_setting(setting: str) -> Setting:
    """The named setting, or a RepicError listing the known ones."""
    if setting not in SETTINGS:
        raise RepicError(f"setting: expected one of {', '.join(SETTINGS)}, got {setting!r}")
    return SETTINGS[setting]


def run_name(model: str, mode: str) -> str:
    """One caption run: `base_skip`, `trained_retrieval`, ..."""
    return f"{model}_{mode}"


def runs(models: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(model, mode) of every caption run of `models`, mode-major (the report's order: base_skip, trained_skip, ...)."""
    models = list(models)
    for mode in MODES:
        for model in models:
            yield model, mode


# ---- the artifact layout: the folder each stage writes (dvc.yaml's paths) and the files inside it
# fetch_data writes `base.data.root` and `base.base_model` (params); a real source also:
VALIDATION_REPORT = "validation.json"

SUBSET_DIR = "data/subset"
SUBSET_TRAIN = "train_subset.json"
SUBSET_HELDOUT = "heldout.json"  # the rest of the training JSON, never trained on
SUBSET_MANIFEST = "manifest.json"
SUBSET_PARQUET = "train_subset.parquet"

DB_DIR = "data/db"  # one index folder per dataset, and:
DB_MANIFEST = "manifest.json"  # datasets built and skipped
INDEX_FILE = "index.faiss"
ID_MAP_FILE = "id_map.json"
INDEX_META = "meta.json"

TRAIN_DIR = "results/train"
TRAIN_ADAPTER = "adapter"
TRAIN_LOG = "log.jsonl"
TRAIN_CHECKPOINTS = "checkpoints"
TRAIN_SUMMARY = "summary.json"

MERGE_DIR = "results/merged"
MERGED_MODEL = "model"
MERGE_REPORT = "merge_report.json"

# Retrieval, once per setting (DVC stage retrieve@<setting>): <setting>/<dataset>/ with the retrieved references of
# every query (keys, scores, crops) and recall@k; every model row's caption stage of the setting reads it.
RETRIEVAL_DIR = "results/retrieval"
RETRIEVAL_REPORT = "retrieval.json"

CAPTIONS_DIR = "results/captions"  # <setting>/<model>/ (one DVC stage each) -> <dataset>/, each with:
CAPTIONS_PARQUET = "captions.parquet"
CAPTION_REPORT = "caption_report.json"  # captions cut at max_new_tokens; the retrieval.json read (path, sha256)

SCORE_DIR = "results/score"
METRICS_FILES = {"repic": "metrics.json", "strict": "metrics_strict.json"}  # both protocols, always
SCORE_TABLE = "table.md"
RECALL_FILE = "recall.json"  # retrieval recall@k per setting and dataset, from the retrieve stages' retrieval.json
SLOTS = "slots.parquet"
TABLES_DIR = "results/tables"

JUDGE_DIR = "results/judge"
WIN_RATES = "win_rates.json"
VERDICTS = "verdicts.parquet"
JUDGE_CACHE = "cache.jsonl"

REPORT_DIR = "results/report"
REPORT_INDEX = "index.html"
# The data of dvc.yaml's `plots:` (written by the report stage, cache: false: in git, so `dvc plots diff` compares
# commits and experiments): the training curves and, per setting, P/R/F1 of every row and mode.
PLOTS_DIR = "results/plots"
PLOTS_TRAIN = "train.json"


def plots_score_file(setting: str) -> str:
    """`score_single.json`, ... inside the plots folder."""
    return f"score_{setting}.json"


def caption_file(model: str, mode: str) -> str:
    """RePIC's caption file of one run: `<model>_<mode>.json`."""
    return run_file(run_name(model, mode))


def run_file(run: str) -> str:
    """The caption file of a run named by `run_name`."""
    return f"{run}.json"


def retrieval_stage_dir(retrieval_dir: str | Path, setting: str) -> Path:
    """What the retrieve stage of one setting writes (its DVC out): `<retrieval>/<setting>/`."""
    return Path(retrieval_dir) / setting


def retrieval_file(retrieval_dir: str | Path, setting: str, dataset: str) -> Path:
    """The retrieved references of one dataset of a setting: `<retrieval>/<setting>/<dataset>/retrieval.json`."""
    return retrieval_stage_dir(retrieval_dir, setting) / dataset / RETRIEVAL_REPORT


def caption_stage_dir(captions_dir: str | Path, setting: str, model: str) -> Path:
    """What the caption stage of one setting and model row writes (its DVC out): `<captions>/<setting>/<model>/`."""
    return Path(captions_dir) / setting / model


def caption_folder(captions_dir: str | Path, setting: str, model: str, dataset: str) -> Path:
    """Where one model row's captions of one dataset of a setting go: `<captions>/<setting>/<model>/<dataset>/`."""
    return caption_stage_dir(captions_dir, setting, model) / dataset


# The folder each stage is given as --out (score also --tables): it writes the files named above inside it.
# fetch_data writes the params' `base.data.root` and `base.base_model`. A caption stage is one per model row.
def stage_dirs(models: Iterable[str]) -> dict[str, str | tuple[str, ...]]:
    """The --out folder of every stage (caption stages per model row of `models`, params `models`)."""
    return {
        "subset_2k": SUBSET_DIR, "build_db": DB_DIR, "train_grpo_lora": TRAIN_DIR, "merge_lora": MERGE_DIR,
        **{retrieve_stage(s): str(retrieval_stage_dir(RETRIEVAL_DIR, s)) for s in SETTINGS},
        **{caption_stage(s, m): str(caption_stage_dir(CAPTIONS_DIR, s, m)) for s in SETTINGS for m in models},
        "score": (SCORE_DIR, TABLES_DIR), "judge_llm": JUDGE_DIR, "report": REPORT_DIR,
    }


def stage_outs(base: dict[str, Any], models: Iterable[str]) -> dict[str, list[str]]:
    """Every stage's outputs as dvc.yaml must declare them (outs and metrics), given params `base` and the model
    rows `models`; the test of the layout (tests/test_layout.py) checks dvc.yaml against this."""
    def inside(folder: str, *names: str) -> list[str]:
        return [f"{folder}/{n}" for n in names]

    models = list(models)
    return {
        "fetch_data": [base["data"]["root"], base["base_model"]],
        "subset_2k": [SUBSET_DIR],
        "build_db": [DB_DIR],
        # not TRAIN_CHECKPOINTS: written for resuming, not an out (dvc.yaml says why)
        "train_grpo_lora": inside(TRAIN_DIR, TRAIN_ADAPTER, TRAIN_LOG, TRAIN_SUMMARY),
        "merge_lora": inside(MERGE_DIR, MERGED_MODEL, MERGE_REPORT),
        **{retrieve_stage(s): [str(retrieval_stage_dir(RETRIEVAL_DIR, s))] for s in SETTINGS},
        **{caption_stage(s, m): [str(caption_stage_dir(CAPTIONS_DIR, s, m))] for s in SETTINGS for m in models},
        "score": [*inside(SCORE_DIR, SCORE_TABLE, SLOTS, *METRICS_FILES.values(), RECALL_FILE), TABLES_DIR],
        "judge_llm": inside(JUDGE_DIR, VERDICTS, JUDGE_CACHE, WIN_RATES),
        "report": [REPORT_DIR, PLOTS_DIR],
    }


# ---- what a stage depends on
# dvc.yaml lists as a stage's deps its module and every repic module it imports, at any depth
# (tests/test_deps.py computes them and fails on a miss), except the modules below: none of them can change a
# stage's outputs, so an edit to one (a help string, a progress line) reruns nothing (days of GPU for the paper's
# training). The modules they import are still followed (they stay deps). tests/test_deps.py also fails when one
# of them imports anything beyond the standard-library and display modules it allows (argument parsing,
# signals, logging, tqdm, ...), so code that can change an output cannot move in unnoticed.
NOT_STAGE_DEPS: dict[str, str] = {
    "repic/core/cli.py": "argument parsing (`--help` text), one-line errors, exit statuses, SIGINT/SIGTERM handling "
                         "and the logging setup of every stage's entry point: it passes argv to the stage's main "
                         "unchanged; its one output-relevant value, `--params`'s default, is pinned to DVC's params "
                         "file by a test; the params themselves come from repic.core.params (a dep)",
    "repic/core/progress.py": "progress display of long loops: a tqdm bar on a terminal, `Progress.line()` log lines "
                              "otherwise, and the Trainer callback that drives them, which returns nothing and "
                              "never touches the Trainer's control (a test checks it)",
}


def paper_table_file(table: str, protocol: str, ext: str) -> str:
    """`table1_single_repic.md`, ... inside the tables folder."""
    return f"{table}_{protocol}.{ext}"


def retrieve_stage(setting: str | None = None) -> str:
    """The dvc.yaml stage that retrieves the references of a setting's queries (`retrieve@single`), or all of them
    (`retrieve`, a `foreach` over the settings): once per setting, whatever the number of model rows."""
    return "retrieve" if setting is None else f"retrieve@{setting}"


def caption_stage(setting: str, model: str | None = None) -> str:
    """The dvc.yaml stage that captions a setting (a `foreach` group), or one model row of it
    (`caption_single@trained`)."""
    return f"caption_{setting}" if model is None else f"caption_{setting}@{model}"


# ---- params helpers: which datasets a stage covers
def eval_datasets(datasets: list[dict[str, Any]], setting: str | None = None) -> list[dict[str, Any]]:
    """The evaluation datasets of params `base.data.datasets` ([{name, database, queries: {setting: path}}], in
    their order), only those with a query map for `setting` when one is given.

    >>> ds = [{"name": "myvlm", "database": "m.json", "queries": {"single": "q.json"}},
    ...       {"name": "two", "database": "t.json", "queries": {"multi2": "q2.json"}}]
    >>> [d["name"] for d in eval_datasets(ds, "multi2")]
    ['two']
    """
    names = [d["name"] for d in datasets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RepicError(f"base.data.datasets: dataset name {dup[0]!r} appears more than once (names must be unique)")
    return [d for d in datasets if setting is None or setting in d["queries"]]


# {setting: [(dataset name, its database_mod.json)]}
Layout = dict[str, list[tuple[str, dict[str, Any]]]]


def layout_of(datasets: list[dict[str, Any]]) -> Layout:
    """Which caption folders the configured datasets (params `base.data.datasets`) produce, with their
    databases."""
    layout = {s: [(d["name"], read_json(d["database"])) for d in eval_datasets(datasets, s)] for s in SETTINGS}
    return {s: datasets for s, datasets in layout.items() if datasets}
