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
from repic.core.prompts import CAPTION_QUESTIONS, caption_messages, question_list, repic_caption_messages


@dataclass
class Query:
    """One captioning request: a query image, its ground-truth keys and the reference keys shown."""

    image: str
    gt_keys: list[str]
    question: str
    ref_keys: list[str] = field(default_factory=list)
    retrieval: dict[str, Any] = field(default_factory=dict)


def expand_queries(query_map: dict[str, Any], setting: str, source: str = "queries",
                   questions: tuple[str, ...] = CAPTION_QUESTIONS) -> list[Query]:
    """RePIC query maps -> queries. 4-concept maps hold a list of 4-key subsets per image: one query each. The
    `questions` rotate over the queries in file order, one counter for the whole map, as in RePIC's scripts."""
    from repic.data.validate import entry_subsets, is_key_list

    subsets_per_image = check_setting(setting).subsets_per_image
    queries: list[Query] = []
    for image, keys in query_map.items():
        for subset in entry_subsets(keys, setting):
            if not is_key_list(subset):
                raise RepicError(f"{source}: entry {image!r} must map to a list of keys"
                                 + (" per subset (list of lists)" if subsets_per_image else ""))
            question = questions[len(queries) % len(questions)]
            queries.append(Query(image=image, gt_keys=list(subset), question=question))
    return queries


def skip_references(gt_keys: list[str], database: dict[str, Any], conversation: str) -> list[str]:
    """The references of a skip-retrieval query: RePIC's retriever takes the concepts of `concept_dict` that are
    among the ground-truth keys, in database order (`repic`); ours keeps the query map's order (`ours`)."""
    if conversation == "repic":
        return [k for k in database["concept_dict"] if k in gt_keys]
    return list(gt_keys)


def conversation_of(query: Query, database: dict[str, Any], *, conversation: str = "ours", prompt: str = "plain"
                    ) -> tuple[list[dict], list[str]]:
    """Messages + image paths as stored in the JSON files (references in order, query last) for one query.

    `conversation` `repic`: RePIC's system prompt, reference lines with the database's display names, and the row's
    `prompt` (`zero_shot` appends RePIC's zero-shot instruction); `ours`: our conversation, keys as names."""
    concepts = database["concept_dict"]
    refs, paths = [], []
    for key in query.ref_keys:
        entry = concepts.get(key)
        if entry is None:
            raise RepicError(f"database: reference key {key!r} of query {query.image!r} is not in concept_dict")
        refs.append({"name": entry["name"] if conversation == "repic" else key, "info": entry["info"]})
        paths.append(entry["image"])
    paths.append(query.image)
    if conversation == "repic":
        return repic_caption_messages(refs, query.question, prompt), paths
    if prompt != "plain":
        raise RepicError(f"a model row's prompt {prompt!r} needs caption.conversation: repic (RePIC's zero-shot "
                         "instruction belongs to RePIC's conversation)")
    return caption_messages(refs, query.question), paths


def build_conversation(query: Query, database: dict[str, Any], root: str | os.PathLike, *,
                       conversation: str = "ours", prompt: str = "plain", preprocess: str = "processor"
                       ) -> tuple[list[dict], list[Image.Image]]:
    """Messages + images (references in order, query last) for one query (`conversation_of`). `preprocess`
    `qwen_vl_utils`: each image as RePIC's scripts hand it to the processor (`repic.vlm.preprocess.fetch_image`);
    `processor`: opened as RGB, the processor alone resizes."""
    from repic.vlm.preprocess import load_for_processor

    messages, paths = conversation_of(query, database, conversation=conversation, prompt=prompt)
    return messages, [load_for_processor(root, p, preprocess) for p in paths]


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
                desc: str = "caption", hit_limit: dict[str, int] | None = None, conversation: str = "ours",
                prompt: str = "plain", preprocess: str = "processor") -> dict[str, list[list[Any]]]:
    """Caption every mode's queries with one model; returns RePIC caption rows per mode. `hit_limit`, when
    given, receives per mode how many captions stopped at `max_new_tokens` (cut off, no EOS). `conversation`,
    `prompt`, `preprocess`: `build_conversation`'s."""
    from repic.train.speed import images_processed_once
    from repic.vlm.generation import generate_captions

    rows = {}
    for mode, queries in queries_by_mode.items():
        conversations = [build_conversation(q, database, root, conversation=conversation, prompt=prompt,
                                            preprocess=preprocess) for q in queries]
        cut: list[bool] = []
        with images_processed_once(processor):  # a reference image in many conversations: preprocessed once
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
    are reported in `hits` and left out of `keys`, as are unlisted images (`build_index(..., unlisted=True)`).
    `params["retrieval"]`: `box_pad`, `whole_image`, `on_empty` (`retrieve`'s `pad`, `include_whole_image`,
    `on_empty`). An open-vocabulary detector is prompted with the categories
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

    opts = params.get("retrieval", {})
    crops = dict(pad=opts.get("box_pad", 0.1), include_whole_image=opts.get("whole_image", True),
                 on_empty=opts.get("on_empty", "whole_image"))

    def retrieve_keys(image: Image.Image) -> dict[str, Any]:
        hits = retrieve(image, index, id_map, embedder, detector, k, root=Path(root), **crops)
        # an unlisted image (key None: in RePIC's index, not in its database) keeps its rank and shows no reference:
        # it has no name or info to show (RePIC's retrieve() would raise a KeyError on it)
        return {"keys": [h["key"] for h in hits if not h["missing"] and h["key"] is not None], "hits": hits}

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
                params: dict[str, Any], device: str = "auto", dtype: str = "auto", prompt: str = "plain"
                ) -> tuple[dict[str, list[list[Any]]], dict[str, Any]]:
    """Everything `caption_<setting>@<row>` does: valid queries, retrieval, the row's captions in both modes
    (`<row>_skip`, `<row>_retrieval`). The row's weights: `model` (a folder), or `adapter` on `base_model`.
    `params`: the `caption` section (its `conversation`, `question_list`, `preprocess` and `retrieval` options);
    `prompt`: the row's (`caption.prompts`), `zero_shot` for RePIC's zero-shot row."""
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
    conversation = params.get("conversation", "ours")
    questions = question_list(setting, conversation, params.get("question_list", "released"))
    queries = expand_queries(valid, setting, source=queries_path, questions=questions)
    for q in queries:
        q.ref_keys = skip_references(q.gt_keys, database, conversation)
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
    unlisted = [h["image"] for q in retrieved for h in q.retrieval["hits"] if h.get("key") is None]
    by_mode = {SKIP: queries, RETRIEVAL: retrieved}
    gen = dict(batch_size=params["batch_size"], max_new_tokens=params["max_new_tokens"], backend=params["backend"])
    net, processor = load_row_model(model=model, adapter=adapter, base_model=base_model, device=device, dtype=dtype,
                                    max_pixels=params.get("max_pixels"))
    hit_limit: dict[str, int] = {}
    rows = {run_name(row, m): r for m, r in caption_all(net, processor, by_mode, database, root,
                                                         desc=f"{setting} {row}", hit_limit=hit_limit,
                                                         conversation=conversation, prompt=prompt,
                                                         preprocess=params.get("preprocess", "processor"),
                                                         **gen).items()}
    summary = {
        "setting": setting,
        "k": params["top_k"][setting],
        "recall_at_k": retrieval_recall([q.ref_keys for q in retrieved], [q.gt_keys for q in retrieved]),
        "n_queries": len(queries),
        "n_query_images_left_out": len(query_map) - len(valid),
        "left_out": left_out,
        "missing_images": missing,
        # hits on an image the database does not list (in the index with build_db.index_unlisted, as RePIC's):
        # each kept its rank and gave no reference (per query, so a 4-concept photo counts once per subset)
        "n_unlisted_hits": len(unlisted),
        "unlisted_images_hit": sorted(set(unlisted)),
        "n_queries_without_references": sum(not q.ref_keys for q in retrieved),
        "per_query": [{"query_image": q.image, "gt_keys": q.gt_keys, "retrieved": q.ref_keys} for q in retrieved],
        # captions cut at max_new_tokens (no EOS), per run file: RePIC allows 1024 new tokens
        "max_new_tokens": params["max_new_tokens"],
        "hit_max_new_tokens": {run_name(row, mode): n for mode, n in hit_limit.items()},
    }
    return rows, summary
