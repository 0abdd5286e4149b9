"""score stage library: every setting x dataset x mode x model row caption file -> metrics, per-slot records."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from repic.core.io import RepicError
from repic.core.layout import MODES, Layout, caption_file, caption_folder
from repic.data.validate import load_caption_rows
from repic.eval.metrics import score_captions


def score_runs(captions_dir: str | os.PathLike, protocol: str, layout: Layout, models: Sequence[str]
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score `<captions_dir>/<setting>/<model>/<dataset>/<model>_<mode>.json` for every setting and dataset of
    `layout`, every mode and model row of `models` (params `models`, in table order). Returns
    `{setting: {dataset: {mode: {model: summary}}}}` and the per-slot records."""
    metrics: dict[str, Any] = {}
    slots: list[dict[str, Any]] = []
    for setting, datasets in layout.items():
        for dataset, database in datasets:
            for mode in MODES:
                for model in models:
                    path = caption_folder(captions_dir, setting, model, dataset) / caption_file(model, mode)
                    if not path.is_file():
                        raise RepicError(f"{path}: caption file not found (expected one per setting/model row/dataset/"
                                         "mode: is the row's caption stage run?)")
                    summary, records = score_captions(load_caption_rows(path), setting, protocol, database,
                                                      source=path)
                    metrics.setdefault(setting, {}).setdefault(dataset, {}).setdefault(mode, {})[model] = summary
                    slots += [{"setting": setting, "dataset": dataset, "mode": mode, "model": model, **r}
                              for r in records]
    return metrics, slots
