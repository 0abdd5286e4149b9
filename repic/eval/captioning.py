"""Personalized captioning (inference): one code path for single-, 2- and 4-concept queries.

Greedy decoding, batched by similar prompt size, left padding. Each query gets its reference concepts either
from the ground truth (skip-retrieval) or from the retrieval database; captions are written in RePIC's caption
format `[query_image, [gt keys], caption, question]`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from repic.core.io import RepicError, open_rgb
from repic.core.layout import RETRIEVAL, SKIP, VALIDATION_REPORT, check_setting, run_name
from repic.core.prompts import CAPTION_QUESTIONS, caption_messages


@dataclass
class Query:
    """One captioning request: a query image, its ground-truth keys and the reference keys shown."""

    image: str
    gt_keys: list[str]
    question: str
    ref_keys: list[str] = field(default_factory=list)
    retrieval: dict[str, Any] = field(default_factory=dict)


def expand_queries(query_map: dict[str, Any], setting: str, source: str = "queries") -> list[Query]:
    """RePIC query maps -> queries. 4-concept maps hold a list of 4-key subsets per image: one query each."""
    from repic.data.validate import entry_subsets, is_key_list

    subsets_per_image = check_setting(setting).subsets_per_image
    queries: list[Query] = []
    for image, keys in query_map.items():
        for subset in entry_subsets(keys, setting):
            if not is_key_list(subset):
                raise RepicError(f"{source}: entry {image!r} must map to a list of keys"
                                 + (" per subset (list of lists)" if subsets_per_image else ""))
            question = CAPTION_QUESTIONS[len(queries) % len(CAPTION_QUESTIONS)]
            queries.append(Query(image=image, gt_keys=list(subset), question=question))
    return queries


def build_conversation(query: Query, database: dict[str, Any], root: str | os.PathLike
                       ) -> tuple[list[dict], list[Image.Image]]:
    """Messages + images (references in order, query last) for one query."""
    concepts = database["concept_dict"]
    refs, images = [], []
    for key in query.ref_keys:
        entry = concepts.get(key)
        if entry is None:
            raise RepicError(f"database: reference key {key!r} of query {query.image!r} is not in concept_dict")
        refs.append({"name": key, "info": entry["info"]})
        images.append(open_rgb(root, entry["image"]))
    images.append(open_rgb(root, query.image))
    return caption_messages(refs, query.question), images


def caption_rows(queries: list[Query], captions: list[str]) -> list[list[Any]]:
    """RePIC's caption file rows: `[query_image, [gt keys], caption, question]`."""
    return [[q.image, q.gt_keys, c, q.question] for q, c in zip(queries, captions)]


def attach_retrieval(queries: list[Query], retrieve_keys: Any) -> list[Query]:
    """Copies of `queries` whose references are the retrieved concepts (`retrieve_keys(image) -> dict`)."""
    cache: dict[str, dict[str, Any]] = {}
    out = []
    for q in queries:
        if q.image not in cache:
            cache[q.image] = retrieve_keys(q.image)
        hit = cache[q.image]
        out.append(Query(image=q.image, gt_keys=q.gt_keys, question=q.question,
                         ref_keys=list(hit["keys"]), retrieval=hit))
    return out


def caption_all(model: Any, processor: Any, queries_by_mode: dict[str, list[Query]], database: dict[str, Any],
                root: str | os.PathLike, *, batch_size: int, max_new_tokens: int, backend: str = "hf",
                desc: str = "caption", hit_limit: dict[str, int] | None = None) -> dict[str, list[list[Any]]]:
    """Caption every mode's queries with one model; returns RePIC caption rows per mode. `hit_limit`, when
    given, receives per mode how many captions stopped at `max_new_tokens` (cut off, no EOS)."""
    from repic.vlm.generation import generate_captions

    rows = {}
    for mode, queries in queries_by_mode.items():
        conversations = [build_conversation(q, database, root) for q in queries]
        cut: list[bool] = []
        captions = generate_captions(model, processor, conversations, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, backend=backend, desc=f"{desc} {mode}",
                                     hit_limit=cut)
        rows[mode] = caption_rows(queries, captions)
        if hit_limit is not None:
            hit_limit[mode] = sum(cut)
    return rows


def make_retriever(index_dir: str | os.PathLike, root: str | os.PathLike, params: dict[str, Any], k: int,
                   *, database: str | os.PathLike | None = None, device: str = "auto") -> Any:
    """`image -> {"keys", "hits"}` over the index built by `build_db` (its embedder is read from the index
    meta, so captioning always embeds queries as the database was embedded). Hits whose image is missing
    are reported in `hits` and left out of `keys`. An open-vocabulary detector is prompted with the categories
    of `database` (default: the one the index was built from); detector and embedder run on `device`."""
    from pathlib import Path

    from repic.data.retrieval import database_categories, load_index, make_detector, make_embedder, retrieve
    from repic.vlm.models import pick_device

    index, id_map, meta = load_index(Path(index_dir))
    device = pick_device(device)
    embedder = make_embedder(meta["embedder"], device=device, **meta.get("embedder_kwargs", {}))
    db_path = database if database is not None else meta.get("database")
    classes = database_categories(Path(db_path)) if db_path else []
    detector = make_detector(params["detector"], classes=classes, device=device, **params["detector_kwargs"])

    def retrieve_keys(image: Image.Image) -> dict[str, Any]:
        hits = retrieve(image, index, id_map, embedder, detector, k, root=Path(root))
        return {"keys": [h["key"] for h in hits if not h["missing"]], "hits": hits}

    return retrieve_keys


def find_adapter(path: str | os.PathLike) -> Path:
    """The PEFT adapter folder at `path`, or the one folder below it holding `adapter_config.json` (a released
    checkpoint zip unpacks into a folder of its own); a RepicError when there is none or more than one."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return path
    found = sorted(p.parent for p in path.rglob("adapter_config.json")) if path.is_dir() else []
    if len(found) != 1:
        raise RepicError(f"{path}: expected one PEFT adapter folder (with adapter_config.json) at or below it, "
                         f"found {len(found)}" + (f": {', '.join(map(str, found))}" if found else ""))
    return found[0]


def load_row_model(*, model: str | None, adapter: str | None, base_model: str | None, device: str, dtype: str,
                   max_pixels: int | None) -> tuple[Any, Any]:
    """(model, processor) of one model row: a model folder, or a LoRA adapter applied to `base_model`. The
    processor is the row's own when its folder has one (a hub release), else the base model's."""
    from peft import PeftModel

    from repic.vlm.models import load_model, load_processor

    if (model is None) == (adapter is None):
        raise RepicError("a model row is a model folder or a LoRA adapter on the base model, exactly one of them")
    weights = model if model is not None else base_model
    if weights is None:
        raise RepicError("a LoRA adapter row needs the base model it applies to")
    own = Path(weights) / "preprocessor_config.json"
    processor = load_processor(weights if own.is_file() or base_model is None else base_model, max_pixels=max_pixels)
    loaded = load_model(weights, device=device, dtype=dtype)
    if adapter is not None:
        loaded = PeftModel.from_pretrained(loaded, str(find_adapter(adapter))).eval()
    return loaded, processor


def run_setting(setting: str, queries_path: str, database_path: str, root: str, index_dir: str, row: str, *,
                model: str | None = None, adapter: str | None = None, base_model: str | None = None,
                params: dict[str, Any], device: str = "auto", dtype: str = "auto"
                ) -> tuple[dict[str, list[list[Any]]], dict[str, Any]]:
    """Everything `caption_<setting>@<row>` does: valid queries, retrieval, the row's captions in both modes
    (`<row>_skip`, `<row>_retrieval`). The row's weights: `model` (a folder), or `adapter` on `base_model`."""
    import logging

    from repic.core.io import read_json
    from repic.data.retrieval import retrieval_recall
    from repic.data.validate import describe_left_out, filter_valid_queries, left_out_entries

    database = read_json(database_path)
    query_map = read_json(queries_path)
    valid = filter_valid_queries(query_map, database, root, setting)
    left_out = left_out_entries(query_map, database, root, setting)
    # fetch_data's validation.json exists for a real source only; the stage's retrieval.json always lists them.
    report = Path(root) / VALIDATION_REPORT
    where = "'left_out' of the stage's retrieval.json" + (f" and in {report}" if report.is_file() else "")
    if not valid:
        raise RepicError(f"{queries_path}: no valid query left, all {len(left_out)} entries left out: "
                         f"{describe_left_out(left_out)}" + (f" (see {report})" if report.is_file() else ""))
    if left_out:
        logging.getLogger(__name__).warning(
            "%s: %d of %d query images left out (%d invalid entries, all listed in %s): %s", queries_path,
            len(query_map) - len(valid), len(query_map), len(left_out), where, describe_left_out(left_out))
    queries = expand_queries(valid, setting, source=queries_path)
    for q in queries:
        q.ref_keys = list(q.gt_keys)
    from repic.core.progress import Progress

    retriever = make_retriever(index_dir, root, params, k=params["top_k"][setting], database=database_path,
                               device=device)
    with Progress(len({q.image for q in queries}), f"retrieve {setting}", unit="image") as bar:
        def retrieve_one(image: str) -> dict[str, Any]:
            hit = retriever(open_rgb(root, image))
            bar.update()
            return hit

        retrieved = attach_retrieval(queries, retrieve_one)
    missing = sorted({h["image"] for q in retrieved for h in q.retrieval["hits"] if h.get("missing")})
    by_mode = {SKIP: queries, RETRIEVAL: retrieved}
    gen = dict(batch_size=params["batch_size"], max_new_tokens=params["max_new_tokens"], backend=params["backend"])
    net, processor = load_row_model(model=model, adapter=adapter, base_model=base_model, device=device, dtype=dtype,
                                    max_pixels=params.get("max_pixels"))
    hit_limit: dict[str, int] = {}
    rows = {run_name(row, m): r for m, r in caption_all(net, processor, by_mode, database, root,
                                                         desc=f"{setting} {row}", hit_limit=hit_limit, **gen).items()}
    summary = {
        "setting": setting,
        "k": params["top_k"][setting],
        "recall_at_k": retrieval_recall([q.ref_keys for q in retrieved], [q.gt_keys for q in retrieved]),
        "n_queries": len(queries),
        "n_query_images_left_out": len(query_map) - len(valid),
        "left_out": left_out,
        "missing_images": missing,
        "per_query": [{"query_image": q.image, "gt_keys": q.gt_keys, "retrieved": q.ref_keys} for q in retrieved],
        # captions cut at max_new_tokens (no EOS), per run file: RePIC allows 1024 new tokens
        "max_new_tokens": params["max_new_tokens"],
        "hit_max_new_tokens": {run_name(row, mode): n for mode, n in hit_limit.items()},
    }
    return rows, summary
