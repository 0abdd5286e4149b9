"""Personalized captioning (inference): one code path for single-, 2- and 4-concept queries.

Greedy decoding, batched by similar prompt size, left padding. Each query gets its reference concepts either
from the ground truth (skip-retrieval) or from the retrieve stage's `retrieval.json` (repic.eval.retrieve: the
detector and the embedder run there, once per dataset and setting, not here); captions are written in RePIC's
caption format `[query_image, [gt keys], caption, question]`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from repic.core.io import RepicError
from repic.core.layout import RETRIEVAL, SKIP, run_name
from repic.core.prompts import caption_messages, question_list, repic_caption_messages
from repic.eval.queries import Query, valid_queries, with_retrieval


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


def caption_all(model: Any, processor: Any, queries_by_mode: dict[str, list[Query]], database: dict[str, Any],
                root: str | os.PathLike, *, batch_size: int, max_new_tokens: int, backend: str = "hf",
                desc: str = "caption", hit_limit: dict[str, int] | None = None, conversation: str = "ours",
                prompt: str = "plain", preprocess: str = "processor") -> dict[str, list[list[Any]]]:
    """Caption every mode's queries with one model; returns RePIC caption rows per mode. `hit_limit`, when
    given, receives per mode how many captions stopped at `max_new_tokens` (cut off, no EOS). `conversation`,
    `prompt`, `preprocess`: `build_conversation`'s."""
    from repic.vlm.generation import generate_captions
    from repic.vlm.image_memo import images_processed_once

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


def run_setting(setting: str, queries_path: str, database_path: str, root: str, retrieval: dict[str, Any],
                row: str, *, model: str | None = None, adapter: str | None = None, base_model: str | None = None,
                params: dict[str, Any], device: str = "auto", dtype: str = "auto", prompt: str = "plain",
                retrieval_source: str = "retrieval.json") -> tuple[dict[str, list[list[Any]]], dict[str, Any]]:
    """Everything `caption_<setting>@<row>` does: valid queries, their references (skip: the ground truth;
    retrieval: `retrieval`, the retrieve stage's report read from `retrieval_source`), the row's captions in both
    modes (`<row>_skip`, `<row>_retrieval`) and its report (captions cut at `max_new_tokens`). The row's weights:
    `model` (a folder), or `adapter` on `base_model`. `params`: the caption options (`batch_size`,
    `max_new_tokens`, `backend`, `conversation`, `question_list`, `preprocess`, `max_pixels`); `prompt`: the row's
    (`caption.prompts`), `zero_shot` for RePIC's zero-shot row. No detector or embedder is loaded."""
    from repic.core.io import read_json

    database = read_json(database_path)
    query_map = read_json(queries_path)
    conversation = params.get("conversation", "ours")
    questions = question_list(setting, conversation, params.get("question_list", "released"))
    queries, _, _ = valid_queries(setting, queries_path, query_map, database, root, questions)
    for q in queries:
        q.ref_keys = skip_references(q.gt_keys, database, conversation)
    retrieved = with_retrieval(queries, retrieval, setting, retrieval_source)
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
        "row": row,
        "n_queries": len(queries),
        # captions cut at max_new_tokens (no EOS), per run file: RePIC allows 1024 new tokens
        "max_new_tokens": params["max_new_tokens"],
        "hit_max_new_tokens": {run_name(row, mode): n for mode, n in hit_limit.items()},
    }
    return rows, summary
