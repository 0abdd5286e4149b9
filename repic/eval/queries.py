"""The queries of one setting's query map, and the references retrieved for them.

Shared by the retrieve stage (`repic.eval.retrieve`: it retrieves for these queries and writes `retrieval.json`)
and every model row's caption stage (`repic.eval.captioning`: it reads that file back, checked against the same
queries). Nothing here loads a model, a detector or an embedder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repic.core.io import RepicError
from repic.core.layout import VALIDATION_REPORT, check_setting
from repic.core.prompts import CAPTION_QUESTIONS

log = logging.getLogger(__name__)


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


def valid_queries(setting: str, queries_path: str, query_map: dict[str, Any], database: dict[str, Any],
                  root: str | os.PathLike, questions: tuple[str, ...] = CAPTION_QUESTIONS
                  ) -> tuple[list[Query], list[dict[str, Any]], int]:
    """(the queries of the valid entries of `query_map`, the entries left out with why, the number of query images
    left out): a warning names the left-out ones, a RepicError says when none is left."""
    from repic.data.validate import describe_left_out, filter_valid_queries, left_out_entries

    valid = filter_valid_queries(query_map, database, root, setting)
    left_out = left_out_entries(query_map, database, root, setting)
    # fetch_data's validation.json exists for a real source only; the retrieve stage's retrieval.json always lists
    # them.
    report = Path(root) / VALIDATION_REPORT
    where = "'left_out' of the retrieve stage's retrieval.json" + (f" and in {report}" if report.is_file() else "")
    if not valid:
        raise RepicError(f"{queries_path}: no valid query left, all {len(left_out)} entries left out: "
                         f"{describe_left_out(left_out)}" + (f" (see {report})" if report.is_file() else ""))
    if left_out:
        log.warning("%s: %d of %d query images left out (%d invalid entries, all listed in %s): %s", queries_path,
                    len(query_map) - len(valid), len(query_map), len(left_out), where, describe_left_out(left_out))
    return (expand_queries(valid, setting, source=queries_path, questions=questions), left_out,
            len(query_map) - len(valid))


def attach_retrieval(queries: list[Query], retrieve_keys: Any) -> list[Query]:
    """Copies of `queries` whose references are the retrieved concepts (`retrieve_keys(image) -> dict`, called once
    per distinct image)."""
    cache: dict[str, dict[str, Any]] = {}
    out = []
    for q in queries:
        if q.image not in cache:
            cache[q.image] = retrieve_keys(q.image)
        hit = cache[q.image]
        out.append(Query(image=q.image, gt_keys=q.gt_keys, question=q.question,
                         ref_keys=list(hit["keys"]), retrieval=hit))
    return out


def per_query_entries(retrieved: list[Query]) -> list[dict[str, Any]]:
    """`retrieval.json`'s `per_query`: each query's image and ground truth, the keys retrieved (the references a
    caption shows) and every hit with its rank, score and crop."""
    return [{"query_image": q.image, "gt_keys": q.gt_keys, "retrieved": q.ref_keys, "hits": q.retrieval["hits"]}
            for q in retrieved]


def with_retrieval(queries: list[Query], report: dict[str, Any], setting: str, source: str) -> list[Query]:
    """Copies of `queries` with the references the retrieve stage wrote for them (`report`, its retrieval.json,
    read from `source`): the same queries, in the same order, or a RepicError saying which one differs."""
    if report.get("setting") != setting:
        raise RepicError(f"{source}: retrieval of setting {report.get('setting')!r}, expected {setting!r}")
    entries = report.get("per_query")
    if not isinstance(entries, list) or len(entries) != len(queries):
        got = len(entries) if isinstance(entries, list) else "no"
        raise RepicError(f"{source}: per_query: {got} entries for {len(queries)} queries (retrieved for other "
                         "queries: run its retrieve stage again)")
    out = []
    for i, (q, entry) in enumerate(zip(queries, entries)):
        if [entry.get("query_image"), entry.get("gt_keys")] != [q.image, q.gt_keys]:
            raise RepicError(f"{source}: per_query[{i}] is {entry.get('query_image')!r} {entry.get('gt_keys')}, the "
                             f"query map's is {q.image!r} {q.gt_keys} (retrieved for other queries: run its retrieve "
                             "stage again)")
        out.append(Query(image=q.image, gt_keys=q.gt_keys, question=q.question, ref_keys=list(entry["retrieved"]),
                         retrieval={"keys": list(entry["retrieved"]), "hits": entry["hits"]}))
    return out
