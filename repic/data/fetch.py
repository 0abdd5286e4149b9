"""fetch_data: produce the inputs of the pipeline (data root in RePIC's layout + base model checkpoint)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from repic.core.io import RepicError, atomic_dir, write_json
from repic.core.prompts import (
    CAPTION_QUESTIONS,
    CAPTION_SYSTEM_PROMPT,
    ICT_SUFFIXES,
    JUDGE_INSTRUCTION,
    OCT_SUFFIX,
    VLT_SUFFIX,
)


def world_texts(root: Path) -> Iterator[str]:
    """Every string the pipeline will show the tiny model: tokenizer training corpus."""
    yield from (CAPTION_SYSTEM_PROMPT, OCT_SUFFIX, VLT_SUFFIX, JUDGE_INSTRUCTION, *CAPTION_QUESTIONS,
                *(s for _, s in ICT_SUFFIXES))
    yield "This is the query image. Name: Info: system user assistant You are a helpful assistant."
    for path in sorted(root.rglob("*.json")):
        yield json.dumps(json.loads(path.read_text(encoding="utf-8")), ensure_ascii=False)


def fetch_synthetic(out_data: str | os.PathLike, out_model: str | os.PathLike, params: dict[str, Any],
                    seed: int, threads: int | None = None) -> dict[str, Any]:
    """Seeded concept world + tiny Qwen2.5-VL (tokenizer trained on the world's and the warm-up's text,
    then the supervised warm-up of repic.synthetic.warmup, on `threads` torch threads: params `base.threads`)."""
    from repic.core.progress import Progress
    from repic.synthetic.tiny_model import build_tiny_model, check_single_tokens
    from repic.synthetic.warmup import naming_drills, warmup, warmup_examples, warmup_names
    from repic.synthetic.world import make_world

    world, wcfg = params["world"], params["warmup"]
    common = dict(seed=seed, n_concepts=world["n_concepts"], n_train_concepts=None)
    rates = dict(n_distractors=world["n_distractors"], image_size=world["image_size"], n_names=wcfg["names"],
                 name_rate=wcfg["name_rate"], name_rate_asked=wcfg["name_rate_asked"])
    examples = warmup_examples(**common, **rates, n_examples=wcfg["examples"])
    judge = warmup_examples(**common, **rates, n_examples=wcfg["judge"], kinds=("judge",), tag="judge")
    drills = naming_drills(**common, n=wcfg["drills"], n_names=wcfg["names"], n_distractors=world["n_distractors"],
                           image_size=world["image_size"])
    with atomic_dir(out_data) as data_tmp:
        summary = make_world(data_tmp, seed=seed, **world)
        world_keys = [*summary["concepts"], *summary["train_concepts"]]
        names = [*world_keys, *warmup_names(seed, wcfg["names"], avoid=set(world_keys))]
        # Every name repeated, so that BPE gives each one a token of its own: naming is then copying one token.
        texts = [*world_texts(data_tmp), *(json.dumps(e["messages"]) + e["target"] for e in examples),
                 *(json.dumps(e["messages"]) + e["target"] for e in drills[:500]), " ".join(names * 30)]
        with atomic_dir(out_model) as model_tmp:
            build_tiny_model(model_tmp, texts, params["tiny_model"], seed=seed, names=names)
            check_single_tokens(model_tmp, names)
            with Progress(wcfg["drill_steps"] + wcfg["steps"], "warm-up", unit="step") as bar:
                losses = warmup(model_tmp, examples, steps=wcfg["steps"], batch_size=wcfg["batch_size"],
                                learning_rate=wcfg["learning_rate"], seed=seed, drills=drills, judge=judge,
                                drill_batch_size=wcfg["drill_batch_size"], drill_steps=wcfg["drill_steps"],
                                warmup_steps=wcfg["warmup_steps"], freeze_embeddings=True, threads=threads,
                                callback=lambda *_: bar.update())
    return {**summary, "warmup_loss": [losses[0], losses[-1]] if losses else None}


def fetch_real(out_data: str | os.PathLike, out_model: str | os.PathLike, params: dict[str, Any],
               data_paths: dict[str, Any], seed: int, rerecord: Sequence[str] = ()) -> dict[str, Any]:
    """Declared sources (hub repos, hashed URLs, local folders in RePIC's layout) into the data root and the
    model folder, then validation of every database and query file (`validation.json` in the data root).

    Without a source for `model/`, the tiny Qwen2.5-VL is built as a stand-in (tokenizer trained on the
    fetched JSON text), so the data path can be exercised end to end without the 7B weights."""
    from repic.core.layout import VALIDATION_REPORT, eval_datasets
    from repic.data.sources import fetch_sources
    from repic.data.validate import summary, validate_datasets
    from repic.synthetic.tiny_model import build_tiny_model

    if not params["sources"]:
        raise RepicError("fetch_data.sources is empty: source 'real' fetches only declared sources (hub repos with "
                         "a revision, URLs or local copies with a sha256); declare them, or use source: synthetic")
    data_root = Path(data_paths["root"])

    def inside(path: str, tmp: Path) -> Path:
        return tmp / Path(path).relative_to(data_root)

    with atomic_dir(out_data) as data_tmp, atomic_dir(out_model) as model_tmp:
        fetched = fetch_sources(params["sources"], {"data": data_tmp, "model": model_tmp}, cache_dir=params["cache"],
                                lock=params.get("lock"), rerecord=rerecord, progress=sys.stderr.isatty())
        if not any(str(spec["dest"]).split("/")[0] == "model" for spec in params["sources"].values()):
            build_tiny_model(model_tmp, world_texts(data_tmp), params["tiny_model"], seed=seed)
        datasets = [{"name": d["name"], "database": inside(d["database"], data_tmp),
                     "queries": {s: inside(q, data_tmp) for s, q in d["queries"].items()}}
                    for d in eval_datasets(data_paths["datasets"])]
        report = validate_datasets(data_tmp, datasets, strict=params["strict"])
        report["root"] = str(out_data)
        write_json(data_tmp / VALIDATION_REPORT, report)
    return {"fetched": sorted(fetched), "validation": summary(report), "ok": report["ok"]}
