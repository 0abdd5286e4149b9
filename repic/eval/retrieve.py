"""Retrieval of each query's reference concepts, once per dataset and setting (stage retrieve@<setting>).

The detector and the embedder run here and nowhere else in the evaluation: every model row's caption stage reads
the `retrieval.json` written from `retrieve_setting`'s report (`repic.eval.queries.with_retrieval`), so every row
shows the same references, and a new model row does not retrieve again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from repic.core.io import open_rgb, read_json
from repic.eval.queries import attach_retrieval, per_query_entries, valid_queries


def make_retriever(index_dir: str | os.PathLike, root: str | os.PathLike, params: dict[str, Any], k: int,
                   *, database: str | os.PathLike | None = None, device: str = "auto") -> Any:
    """`image -> {"keys", "hits"}` over the index built by `build_db` (its embedder is read from the index
    meta, so queries are always embedded as the database was embedded). Hits whose image is missing
    are reported in `hits` and left out of `keys`, as are unlisted images (`build_index(..., unlisted=True)`).
    `params["retrieval"]`: `box_pad`, `whole_image`, `on_empty` (`retrieve`'s `pad`, `include_whole_image`,
    `on_empty`). An open-vocabulary detector is prompted with the categories
    of `database` (default: the one the index was built from); detector and embedder run on `device`."""
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


def retrieve_setting(setting: str, queries_path: str, database_path: str, root: str, index_dir: str, *,
                     params: dict[str, Any], k: int, device: str = "auto") -> dict[str, Any]:
    """The retrieve stage's report of one query map (its `retrieval.json`): the valid queries' retrieved references
    (each hit with its score and crop), recall@k, the entries left out as invalid and the hits that show no reference.
    `params`: `make_retriever`'s (`detector`, `detector_kwargs`, `retrieval`); `k`: the setting's top-k."""
    from repic.core.progress import Progress
    from repic.data.retrieval import retrieval_recall

    database = read_json(database_path)
    query_map = read_json(queries_path)
    queries, left_out, n_left_out = valid_queries(setting, queries_path, query_map, database, root)
    retriever = make_retriever(index_dir, root, params, k=k, database=database_path, device=device)
    with Progress(len({q.image for q in queries}), f"retrieve {setting}", unit="image") as bar:
        def retrieve_one(image: str) -> dict[str, Any]:
            hit = retriever(open_rgb(root, image))
            bar.update()
            return hit

        retrieved = attach_retrieval(queries, retrieve_one)
    missing = sorted({h["image"] for q in retrieved for h in q.retrieval["hits"] if h.get("missing")})
    unlisted = [h["image"] for q in retrieved for h in q.retrieval["hits"] if h.get("key") is None]
    return {
        "setting": setting,
        "k": k,
        "recall_at_k": retrieval_recall([q.ref_keys for q in retrieved], [q.gt_keys for q in retrieved]),
        "n_queries": len(queries),
        "n_query_images_left_out": n_left_out,
        "left_out": left_out,
        "missing_images": missing,
        # hits on an image the database does not list (in the index with build_db.index_unlisted, as RePIC's):
        # each kept its rank and gave no reference (per query, so a 4-concept photo counts once per subset)
        "n_unlisted_hits": len(unlisted),
        "unlisted_images_hit": sorted(set(unlisted)),
        "n_queries_without_references": sum(not q.ref_keys for q in retrieved),
        "per_query": per_query_entries(retrieved),
    }
