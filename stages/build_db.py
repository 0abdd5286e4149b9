"""Build the retrieval databases: image embeddings of every database image in an exact faiss index + id map,
one index per evaluation dataset (`base.data.datasets`), at `<out>/<dataset>/`.

Example: python -m stages.build_db --root data/world --out data/db
One database:  python -m stages.build_db --database D.json --root data/world --out data/db/mine
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from repic.core.cli import parser, run
from repic.core.io import atomic_dir, write_json
from repic.core.layout import DB_MANIFEST, eval_datasets
from repic.core.params import params_of
from repic.data.retrieval import build_index, database_entries, make_embedder, missing_database_images, save_index
from repic.vlm.models import pick_device, use_threads

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--database", help="index this one database_mod.json into --out (default: every dataset)")
    p.add_argument("--root", required=True, help="data root the database image paths are relative to")
    p.add_argument("--out", required=True,
                   help="output folder: <dataset>/ index + id map per dataset and manifest.json (built, skipped)")
    args = p.parse_args(argv)
    params = params_of(args)
    use_threads(params["base"]["threads"])
    cfg = params["build_db"]
    embedder = make_embedder(cfg["embedder"], device=pick_device(params["base"]["device"]), **cfg["embedder_kwargs"])
    # (database, index folder name); one --database goes straight into --out
    jobs = ([(args.database, None)] if args.database else
            [(d["database"], d["name"]) for d in eval_datasets(params["base"]["data"]["datasets"])])
    skipped = {}
    with atomic_dir(args.out) as tmp:  # all datasets or none: no stale index of a dataset since removed
        for database, name in jobs:
            missing = missing_database_images(Path(database), Path(args.root))
            if name and missing and len(missing) == len(database_entries(Path(database))):
                # e.g. a copy without Yo'LLaVA's images: the other datasets still get their indexes
                skipped[name] = f"{database}: none of its {len(missing)} images exist under {args.root}"
                log.warning("build_db: dataset %s skipped: %s", name, skipped[name])
                continue
            # index_unlisted: also the image files of the database folder it does not list, as RePIC's index
            index, id_map = build_index(Path(database), Path(args.root), embedder, unlisted=cfg["index_unlisted"])
            meta = {"embedder": cfg["embedder"], "embedder_kwargs": cfg["embedder_kwargs"], "database": database,
                    "missing_images": missing,
                    "unlisted_images": [e["image"] for e in id_map if e["key"] is None]}
            save_index(tmp / name if name else tmp, index, id_map, meta)
        if not args.database:
            write_json(tmp / DB_MANIFEST,
                       {"built": [name for _, name in jobs if name not in skipped], "skipped": skipped})


if __name__ == "__main__":
    sys.exit(run(main))
