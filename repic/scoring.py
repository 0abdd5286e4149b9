"""score stage library: every setting x mode x model caption file -> metrics, per-slot records, table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from repic.captioning import SETTINGS
from repic.io import RepicError
from repic.metrics import load_caption_rows, score_captions

MODES = ("skip", "retrieval")
MODELS = ("base", "trained")


def score_runs(captions_dir: str | os.PathLike, protocol: str, database: dict[str, Any] | None
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score `<captions_dir>/<setting>/<model>_<mode>.json` for all settings, modes and models."""
    metrics: dict[str, Any] = {}
    slots: list[dict[str, Any]] = []
    for setting in SETTINGS:
        for mode in MODES:
            for model in MODELS:
                path = Path(captions_dir) / setting / f"{model}_{mode}.json"
                if not path.is_file():
                    raise RepicError(f"{path}: caption file not found (expected one per setting/mode/model)")
                summary, records = score_captions(load_caption_rows(path), setting, protocol, database)
                metrics.setdefault(setting, {}).setdefault(mode, {})[model] = summary
                slots += [{"setting": setting, "mode": mode, "model": model, **r} for r in records]
    return metrics, slots
