"""Build the retrieval database: image embeddings of every database image in an exact faiss index + id map.

Example: python -m stages.build_db --database D.json --root data/world --out data/db
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from repic.cli import params_of, parser, run
from repic.io import atomic_dir
from repic.retrieval import build_index, make_embedder, missing_database_images, save_index


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    for name in ("--database", "--root", "--out"):
        p.add_argument(name, required=True)
    args = p.parse_args(argv)
    cfg = params_of(args)["build_db"]
    embedder = make_embedder(cfg["embedder"], **cfg["embedder_kwargs"])
    index, id_map = build_index(Path(args.database), Path(args.root), embedder)
    meta = {"embedder": cfg["embedder"], "embedder_kwargs": cfg["embedder_kwargs"], "database": args.database,
            "missing_images": missing_database_images(Path(args.database), Path(args.root))}
    with atomic_dir(args.out) as tmp:
        save_index(tmp, index, id_map, meta)


if __name__ == "__main__":
    sys.exit(run(main))
