"""score stage library: every setting x dataset x mode x model caption file -> metrics, per-slot records."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from repic.captioning import SETTINGS, eval_datasets
from repic.io import RepicError, read_json
from repic.metrics import load_caption_rows, score_captions

MODES = ("skip", "retrieval")
MODELS = ("base", "trained")

# {setting: [(dataset name, its database or None)]}
Layout = dict[str, list[tuple[str, dict[str, Any] | None]]]


def layout_of(data: dict[str, Any]) -> Layout:
    """Which caption folders the configured datasets (params `base.data`) produce, with their databases."""
    layout = {s: [(d["name"], read_json(d["database"])) for d in eval_datasets(data, s)] for s in SETTINGS}
    return {s: datasets for s, datasets in layout.items() if datasets}


def score_runs(captions_dir: str | os.PathLike, protocol: str, layout: Layout
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score `<captions_dir>/<setting>/<dataset>/<model>_<mode>.json` for every setting and dataset of `layout`,
    every mode and model. Returns `{setting: {dataset: {mode: {model: summary}}}}` and the per-slot records."""
    metrics: dict[str, Any] = {}
    slots: list[dict[str, Any]] = []
    for setting, datasets in layout.items():
        for dataset, database in datasets:
            for mode in MODES:
                for model in MODELS:
                    path = Path(captions_dir) / setting / dataset / f"{model}_{mode}.json"
                    if not path.is_file():
                        raise RepicError(f"{path}: caption file not found (expected one per setting/dataset/mode/"
                                         "model)")
                    summary, records = score_captions(load_caption_rows(path), setting, protocol, database)
                    metrics.setdefault(setting, {}).setdefault(dataset, {}).setdefault(mode, {})[model] = summary
                    slots += [{"setting": setting, "dataset": dataset, "mode": mode, "model": model, **r}
                              for r in records]
    return metrics, slots
