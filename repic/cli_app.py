r"""repic: personalized captions of your own photos, with your own concepts (RePIC's inference, packaged).

Concepts: a folder with one subfolder per concept (its images, and optionally info.yaml or info.txt with `name`,
`info`, `category`; the name defaults to the subfolder's, shown to the model as `<name>`), or a RePIC
database_mod.json. Queries: image files, folders or globs. Either you say which concepts are in each photo
(--concepts-in: RePIC's skip-retrieval) or retrieval finds them (detector crops -> image embeddings -> exact faiss
over the concept images, the pipeline's own code; the index is built on first use and cached by the concepts'
content). Writes <out>/captions.json (one record per photo) and <out>/index.html, and prints a one-line summary.

Examples:
  repic caption --concepts my_concepts --model Qwen/Qwen2.5-VL-7B-Instruct --adapter RePIC_LoRA photos/
  repic caption --concepts my_concepts --model Qwen/Qwen2.5-VL-7B-Instruct --adapter RePIC_LoRA \
      --concepts-in 'photos/park.jpg=bo,mia' photos/park.jpg
  repic caption --concepts data/world/data/database_tot/database_synthetic/database_mod.json --setting multi4 \
      'scenes/*.png'
  (inside the project after `make repro`, --model and --adapter default to the pipeline's base model and adapter)
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import html
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from repic.core.io import RepicError, atomic_dir, write_json, write_text

log = logging.getLogger("repic")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INFO_FILES = ("info.yaml", "info.yml", "info.txt")
INFO_KEYS = ("name", "info", "category")
DEFAULT_CATEGORY = "object"  # the open-vocabulary detector's prompt for a concept without a category
CAPTIONS_FILE = "captions.json"
PAGE_FILE = "index.html"
DATABASE_FILE = "database_mod.json"


def defaults() -> dict[str, Any]:
    """The packaged defaults (repic/defaults.yaml): RePIC's inference settings of configs/paper.yaml."""
    from importlib.resources import files

    return yaml.safe_load(files("repic").joinpath("defaults.yaml").read_text(encoding="utf-8"))


# ================================================================================================ concepts
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def _check_image(path: Path) -> None:
    """A RepicError naming `path` when it cannot be decoded (retrieval's reader: EXIF-aware, one-line errors)."""
    from repic.data.retrieval import open_image

    open_image(path)


def concept_key(name: str) -> str:
    """RePIC's concept key: the name in angle brackets (`<bo>`), kept as is when already bracketed."""
    return name if name.startswith("<") and name.endswith(">") else f"<{name}>"


def _read_info(folder: Path) -> dict[str, str]:
    """A concept folder's info.yaml / info.txt: `name`, `info`, `category` (a text file that is not `key: value`
    lines is the info itself)."""
    found = [folder / f for f in INFO_FILES if (folder / f).is_file()]
    if len(found) > 1:
        raise RepicError(f"{folder}: one info file expected, found {', '.join(p.name for p in found)}")
    if not found:
        return {}
    path = found[0]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RepicError(f"{path}: cannot read ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if path.suffix == ".txt" and not (isinstance(data, dict) and set(data) <= set(INFO_KEYS)):
        return {"info": text.strip()} if text.strip() else {}
    if data is None:
        return {}
    if not isinstance(data, dict) or not set(data) <= set(INFO_KEYS) or not all(
            isinstance(v, str | int | float) for v in data.values()):
        raise RepicError(f"{path}: expected a mapping with keys among {', '.join(INFO_KEYS)} (text values)")
    return {k: str(v).strip() for k, v in data.items()}


def concepts_from_folder(folder: Path) -> dict[str, Any]:
    """A RePIC database (`concept_dict`, `path_to_concept`, absolute image paths) from a folder of concept folders.
    Each concept's first image (sorted by name) is the reference shown to the model; all its images are indexed."""
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subs:
        raise RepicError(f"{folder}: no concept folders in it (expected one subfolder per concept, with its images)")
    concept_dict: dict[str, dict[str, Any]] = {}
    path_to_concept: dict[str, str] = {}
    owner: dict[str, Path] = {}
    for sub in subs:
        images = sorted(p for p in sub.iterdir() if _is_image(p))
        if not images:
            raise RepicError(f"{sub}: empty concept folder: no image in it (expected {', '.join(IMAGE_EXTS)})")
        info = _read_info(sub)
        key = concept_key(info.get("name") or sub.name)
        if key in owner:
            raise RepicError(f"{sub}: concept name {key} is also the name of {owner[key]} (each concept needs its "
                             "own name: rename a folder or set `name` in its info file)")
        owner[key] = sub
        for image in images:
            _check_image(image)
            path_to_concept[str(image.resolve())] = key
        concept_dict[key] = {"name": key.strip("<>"), "image": str(images[0].resolve()),
                             "info": info.get("info", ""), "category": info.get("category") or DEFAULT_CATEGORY}
    return {"concept_dict": concept_dict, "path_to_concept": path_to_concept}


def _guess_root(db: dict[str, Any], json_path: Path) -> Path:
    """The data root a database's relative image paths resolve from: the JSON's folder or the first of its
    parents where the first image exists (RePIC stores `./data/...` relative to its checkout)."""
    from repic.core.io import resolve_image

    first = next(iter(db["concept_dict"].values()))["image"]
    for cand in [json_path.parent, *json_path.parent.parents]:
        if resolve_image(cand, first).is_file():
            return cand
    raise RepicError(f"{json_path}: its image {first} is found under none of its parent folders; give --root")


def concepts_from_database(json_path: Path, root: Path | None) -> dict[str, Any]:
    """A RePIC database_mod.json with its image paths made absolute (checked to exist and decode)."""
    from repic.core.io import resolve_image
    from repic.data.validate import load_database

    db = load_database(json_path)
    if not db["concept_dict"]:
        raise RepicError(f"{json_path}: concept_dict is empty")
    root = root if root is not None else _guess_root(db, json_path)
    concept_dict, path_to_concept = {}, {}
    for key, entry in db["concept_dict"].items():
        image = resolve_image(root, entry["image"])
        if not image.is_file():
            raise RepicError(f"{json_path}: concept {key}'s image {image} does not exist")
        concept_dict[key] = {**entry, "image": str(image.resolve()),
                             "category": entry.get("category") or DEFAULT_CATEGORY}
    for rel, key in (db.get("path_to_concept") or {}).items():
        image = resolve_image(root, rel)
        if key in concept_dict and image.is_file():
            path_to_concept[str(image.resolve())] = key
    for key, entry in concept_dict.items():
        path_to_concept.setdefault(entry["image"], key)
    for image in path_to_concept:
        _check_image(Path(image))
    return {"concept_dict": concept_dict, "path_to_concept": path_to_concept}


def load_concepts(path: str, root: str | None = None) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        return concepts_from_folder(p)
    if p.is_file() and p.suffix == ".json":
        return concepts_from_database(p, Path(root) if root else None)
    raise RepicError(f"--concepts {path}: expected a folder of concept folders or a RePIC database_mod.json")


# =================================================================================================== index
def cache_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("REPIC_CACHE"):
        return Path(os.environ["REPIC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "repic"


def content_key(database: dict[str, Any], embedder: str, embedder_kwargs: dict[str, Any]) -> str:
    """What the index depends on: the concepts (names, info, image paths), every image's bytes and the embedder."""
    h = hashlib.sha256(json.dumps([database, embedder, embedder_kwargs], sort_keys=True).encode())
    for image in sorted(database["path_to_concept"]):
        with open(image, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:24]


def concept_index(database: dict[str, Any], cache: Path, embedder: str, embedder_kwargs: dict[str, Any],
                  device: str) -> tuple[Path, bool]:
    """(index folder, whether it was built now): build_db's index format (index.faiss, id_map.json, meta.json) over
    the concepts' images, built once per content and kept under `cache`/index/<content key>/."""
    from repic.core.layout import INDEX_META
    from repic.data.retrieval import build_index, make_embedder, save_index

    folder = cache / "index" / content_key(database, embedder, embedder_kwargs)
    if (folder / INDEX_META).is_file():
        return folder, False
    with atomic_dir(folder) as tmp:
        write_json(tmp / "concepts" / DATABASE_FILE, database)  # progress reads "embed concepts"
        index, id_map = build_index(tmp / "concepts" / DATABASE_FILE, Path("/"),
                                    make_embedder(embedder, device=device, **embedder_kwargs))
        # the meta build_db writes; `database` is the copy the index lives beside
        save_index(tmp, index, id_map, {"embedder": embedder, "embedder_kwargs": embedder_kwargs,
                                        "database": str(folder / "concepts" / DATABASE_FILE), "missing_images": []})
    return folder, True


# ================================================================================================= queries
def expand_queries(args: Sequence[str]) -> list[Path]:
    """Query images from files, folders (their images, recursively, sorted) and globs, each once, in order."""
    out: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if _is_image(q))
            if not found:
                raise RepicError(f"{arg}: no image in this folder (expected {', '.join(IMAGE_EXTS)})")
        elif p.is_file():
            found = [p]
        elif glob.has_magic(arg):
            found = sorted(Path(q) for q in glob.glob(arg, recursive=True) if _is_image(Path(q)))
            if not found:
                raise RepicError(f"{arg}: no image matches this pattern")
        else:
            raise RepicError(f"{arg}: no such file or folder")
        out += [q for q in found if q.resolve() not in {o.resolve() for o in out}]
    return out


def _names(value: Any, where: str, database: dict[str, Any]) -> list[str]:
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise RepicError(f"{where}: expected concept names (a list, or names separated by commas)")
    keys = []
    for n in names:
        key = concept_key(n)
        if key not in database["concept_dict"]:
            raise RepicError(f"{where}: no concept named {n!r}; the concepts are "
                             f"{', '.join(sorted(database['concept_dict']))}")
        keys.append(key)
    return keys


def parse_concepts_in(values: Sequence[str], database: dict[str, Any]) -> dict[Path, list[str]]:
    """--concepts-in: `IMAGE=name[,name...]` (relative to the working folder) or a JSON/YAML file mapping image
    paths (relative to the file's folder) to names. Returns resolved image path -> concept keys."""
    out: dict[Path, list[str]] = {}
    for value in values:
        if "=" in value and not Path(value).is_file():
            image, names = value.split("=", 1)
            out[Path(image).resolve()] = _names(names, f"--concepts-in {value}", database)
            continue
        path = Path(value)
        if not path.is_file():
            raise RepicError(f"--concepts-in {value}: expected IMAGE=name[,name...] or a JSON/YAML file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise RepicError(f"{path}: cannot read ({type(exc).__name__})") from None
        if not isinstance(data, dict) or not data:
            raise RepicError(f"{path}: expected a mapping of image paths to concept names")
        for image, names in data.items():
            out[(path.parent / str(image)).resolve()] = _names(names, f"{path}: entry {image!r}", database)
    return out


# ================================================================================================= weights
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_or_folder(spec: str, revision: str | None, what: str) -> str:
    """A local folder as is; a hub id (`owner/name`, optionally `@revision`) downloaded (or taken from the hub
    cache) at that revision, as a local folder."""
    if Path(spec).exists():
        return spec
    repo_id, _, rev = spec.partition("@")
    if not HUB_ID.match(repo_id):
        raise RepicError(f"{what} {spec}: no such folder, and not a hub id (owner/name[@revision])")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=repo_id, revision=rev or revision)
    except Exception as exc:  # noqa: BLE001 - the hub's errors are many; one line names what failed
        raise RepicError(f"{what} {spec}: cannot get it from the hub ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def project_weights() -> tuple[str | None, str | None]:
    """Inside the project (a params.yaml here): its base model and the trained adapter, where `make repro` put
    them; (None, None) elsewhere."""
    path = Path("params.yaml")
    if not path.is_file():
        return None, None
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        base = params["base"]["base_model"]
        rows = params.get("models") or {}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None, None
    adapter = next((r["path"] for r in rows.values() if isinstance(r, dict) and r.get("kind") == "adapter"
                    and Path(r["path"], "adapter_config.json").is_file()), None)
    return (base if Path(base).is_dir() else None), adapter


# ==================================================================================================== page
CSS_EXTRA = """
.name{padding:0 3px;border-radius:3px;font-weight:600} .score{color:#666;font-size:11px}
.mode{color:#666;font-size:12px} .summary{color:#444}
"""
PALETTE = ("#ffe08a", "#b8e1ff", "#c8f7c5", "#ffc9de", "#e0ccff", "#ffd3b0", "#c9f2ee", "#f0f0a0")


def highlight(caption: str, keys: Sequence[str], colours: dict[str, str]) -> str:
    """The caption as HTML, each concept it names (`<bo>` or `bo`, whole words) marked in the concept's colour."""
    forms = sorted({f for k in keys for f in (k, k.strip("<>"))}, key=len, reverse=True)
    if not forms:
        return html.escape(caption)
    pattern = re.compile("|".join(rf"(?<![\w<]){re.escape(f)}(?![\w>])" if not f.startswith("<") else re.escape(f)
                                  for f in forms))
    out, last = [], 0
    for m in pattern.finditer(caption):
        key = concept_key(m.group(0))
        out += [html.escape(caption[last:m.start()]),
                f'<span class="name" style="background:{colours[key]}">{html.escape(m.group(0))}</span>']
        last = m.end()
    return "".join(out) + html.escape(caption[last:])


def write_page(out: Path, records: list[dict[str, Any]], database: dict[str, Any], summary: str) -> None:
    """index.html beside captions.json: each photo with its reference images (names, retrieval scores) and its
    caption, concept names highlighted; thumbnails under images/."""
    from PIL import Image

    from repic.eval.report import CSS, LOAD_SCRIPT

    keys = list(database["concept_dict"])
    colours = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}
    thumbs: dict[str, str] = {}

    def thumb(src: str) -> str:
        if src not in thumbs:
            rel = f"images/{len(thumbs):04d}.png"
            img = Image.open(src).convert("RGB")
            img.thumbnail((192, 192))
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(out / rel, format="PNG")
            thumbs[src] = rel
        return thumbs[src]

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>repic captions</title><style>{CSS}"
             f"{CSS_EXTRA}</style><script>{LOAD_SCRIPT}</script></head><body><h1>Personalized captions</h1>"
             f"<p class='summary'>{html.escape(summary)}</p>"]
    for r in records:
        scores = {h["key"]: h["score"] for h in r["retrieved"]}
        refs = "".join(
            f'<span class="ref"><img src="{thumb(database["concept_dict"][k]["image"])}" alt="{html.escape(k)}"><br>'
            f'<span class="name" style="background:{colours[k]}">{html.escape(k)}</span>'
            + (f'<br><span class="score">score {scores[k]:.3f}</span>' if k in scores else "") + "</span>"
            for k in r["concepts"])
        query = f'<span class="ref"><img src="{thumb(r["path"])}" alt="query"><br>query</span>'
        text = (highlight(r["caption"], r["concepts"], colours) if r["caption"].strip()
                else '<span class="mode">(empty caption)</span>')
        parts.append(f'<div class="query"><div><b>{html.escape(r["image"])}</b> <span class="mode">{r["mode"]}'
                     f'</span></div><div class="imgs">{refs}{query}</div><div class="caption">{text}</div></div>')
    parts.append("</body></html>")
    write_text(out / PAGE_FILE, "\n".join(parts))


# ============================================================================================ the command
def caption_command(args: argparse.Namespace) -> None:
    from repic.core.prompts import CAPTION_QUESTIONS
    from repic.eval.captioning import build_conversation, find_adapter, load_row_model
    from repic.eval.queries import Query
    from repic.vlm.models import check_adapter, pick_device

    start = time.monotonic()
    cfg = defaults()
    device = pick_device(args.device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    batch_size = args.batch_size or cfg["device"][kind]["batch_size"]
    backend = args.backend or cfg["device"][kind]["backend"]
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CAPTIONS_FILE).is_file())):
        raise RepicError(f"--out {out}: exists and is not a folder of repic captions (it would be replaced)")

    # ---- weights (checked before any work)
    model, adapter = args.model, args.adapter
    if model is None:
        model, own_adapter = project_weights()
        adapter = adapter or own_adapter
        if model is None:
            raise RepicError("--model: needed outside the project (a model folder, or a hub id such as "
                             "Qwen/Qwen2.5-VL-7B-Instruct[@revision]); inside it, after `make repro`, the pipeline's "
                             "base model and adapter are the defaults")
    model = hub_or_folder(model, args.revision, "--model")
    if adapter is not None:
        adapter = str(find_adapter(adapter))
        check_adapter(adapter, model)  # an adapter made for another base: one line, before any work
    log.info("model %s%s", model, f" + LoRA adapter {adapter}" if adapter else "")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RepicError(f"--device {args.device}: no CUDA device here (use --device cpu)")

    # ---- concepts and queries
    database = load_concepts(args.concepts, args.root)
    queries = expand_queries(args.queries)
    given = parse_concepts_in(args.concepts_in or [], database)
    if given and not queries:
        queries = list(given)
    if not queries:
        raise RepicError("no query image given (files, folders or globs after the options)")
    for q in queries:
        if not q.is_file():
            raise RepicError(f"{q}: no such query image (named by --concepts-in)")
        _check_image(q)
    mode = "skip" if given else "retrieval"
    if given:
        unnamed = [str(q) for q in queries if q.resolve() not in given]
        if unnamed:
            raise RepicError(f"{unnamed[0]}: no --concepts-in entry for this photo ({len(unnamed)} photos lack one; "
                             "name the concepts in each, or leave --concepts-in out to retrieve them)")
    k = args.top_k or cfg["caption"]["top_k"][args.setting]
    # The caption stages' conversation options, where the packaged settings name them (as configs/paper.yaml's
    # caption section does: tests/test_cli_app.py holds the two equal): RePIC's conversation and question list.
    conv = {key: cfg["caption"][key] for key in ("conversation", "preprocess") if key in cfg["caption"]}
    questions = CAPTION_QUESTIONS
    if "conversation" in conv:
        from repic.core.prompts import question_list

        questions = question_list(args.setting, conv["conversation"], cfg["caption"].get("question_list", "released"))
    items = [Query(image=str(q.resolve()), gt_keys=list(given.get(q.resolve(), [])),
                   question=args.question or questions[i % len(questions)])
             for i, q in enumerate(queries)]

    # ---- retrieval (the pipeline's: build_db's index format, the retrieve stage's retriever, in-process)
    if mode == "skip":
        for q in items:
            q.ref_keys = list(q.gt_keys)
            if "conversation" in conv:  # RePIC's skip-retrieval shows them in database order
                from repic.eval.captioning import skip_references

                q.ref_keys = skip_references(q.gt_keys, database, conv["conversation"])
    else:
        embedder = args.embedder or cfg["build_db"]["embedder"]
        emb_kwargs = dict(cfg["build_db"]["embedder_kwargs"]) if not args.embedder else {}
        if args.embedder_model:
            emb_kwargs["model_id"] = args.embedder_model
        index_dir, built = concept_index(database, cache_dir(args.cache), embedder, emb_kwargs, device)
        log.info("retrieval index %s %s", "built in" if built else "reused from", index_dir)
        detector = args.detector or cfg["caption"]["detector"]
        det_kwargs = dict(cfg["caption"]["detector_kwargs"]) if not args.detector else {}
        if args.detector_model:
            det_kwargs["model_id"] = args.detector_model
        from repic.eval.retrieve import make_retriever

        retriever = make_retriever(index_dir, "/", {**cfg["caption"], "detector": detector,
                                                    "detector_kwargs": det_kwargs}, k, device=device)
        from repic.core.progress import Progress
        from repic.data.retrieval import open_image
        from repic.eval.queries import attach_retrieval

        with Progress(len(items), "retrieve", unit="image") as bar:
            def retrieve_one(image: str) -> dict[str, Any]:
                hit = retriever(open_image(image))
                bar.update()
                return hit

            items = attach_retrieval(items, retrieve_one)

    # ---- captions
    from repic.vlm.generation import generate_captions
    from repic.vlm.image_memo import images_processed_once

    max_pixels = cfg["caption"]["max_pixels"] if args.max_pixels is None else (args.max_pixels or None)
    net, processor = load_row_model(model=None if adapter else model, adapter=adapter,
                                    base_model=model if adapter else None, device=device, dtype=args.dtype,
                                    max_pixels=max_pixels)
    conversations = [build_conversation(q, database, "/", **conv) for q in items]
    cut: list[bool] = []
    with images_processed_once(processor):  # a reference shown in many conversations: preprocessed once
        captions = generate_captions(net, processor, conversations, batch_size=batch_size,
                                     max_new_tokens=args.max_new_tokens or cfg["caption"]["max_new_tokens"],
                                     backend=backend, desc="caption", hit_limit=cut)
    records = []
    for given_path, q, caption, hit_limit in zip(queries, items, captions, cut):
        records.append({
            "image": str(given_path), "path": q.image, "mode": mode, "concepts": q.ref_keys,
            "retrieved": [{"key": h["key"], "score": round(h["score"], 6), "image": h["image"]}
                          for h in q.retrieval.get("hits", [])],
            "question": q.question, "caption": caption, "cut_at_max_new_tokens": hit_limit})
    named = sum(any(k in r["caption"] or re.search(rf"\b{re.escape(k.strip('<>'))}\b", r["caption"])
                    for k in r["concepts"]) for r in records)
    summary = (f"repic caption: {len(records)} photo(s) captioned ({mode}, {len(database['concept_dict'])} concepts, "
               f"{device}), {named} caption(s) name a concept shown; wrote {out / CAPTIONS_FILE} and "
               f"{out / PAGE_FILE} in {time.monotonic() - start:.0f} s")
    with atomic_dir(out) as tmp:
        write_json(tmp / CAPTIONS_FILE, records)
        write_page(tmp, records, database, summary)
    print(summary)


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="repic", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("caption", help="caption photos with your concepts", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("queries", nargs="*", metavar="QUERY", help="query images: files, folders or globs")
    p.add_argument("--concepts", required=True,
                   help="a folder with one subfolder per concept (images + optional info.yaml/info.txt), or a RePIC "
                        "database_mod.json")
    p.add_argument("--root", help="with a database_mod.json: the folder its image paths are relative to "
                                  "(default: the JSON's folder or the first parent where they exist)")
    p.add_argument("--model", help="the model: a folder or a hub id (owner/name[@revision]); inside the project: "
                                   "its base model")
    p.add_argument("--revision", help="the hub revision of --model (a branch, tag or commit)")
    p.add_argument("--adapter", help="a LoRA adapter on --model: its folder, or a folder holding one (the released "
                                     "RePIC LoRA zip, unpacked); inside the project: the trained adapter")
    p.add_argument("--concepts-in", action="append", metavar="IMAGE=NAMES|FILE",
                   help="skip retrieval: the concepts in a photo (IMAGE=bo,mia; repeatable) or a JSON/YAML file "
                        "mapping images to names; without it, retrieval finds them")
    p.add_argument("--setting", choices=("single", "multi2", "multi4"), default="single",
                   help="which of RePIC's settings the photos are like (one concept, two, four or more): its top-k "
                        "(2, 2, 4) and its questions (default single)")
    p.add_argument("--top-k", type=int, help="retrieval: concepts shown per photo (default: the setting's)")
    p.add_argument("--question", help="the question asked (default: RePIC's caption questions in turn)")
    p.add_argument("--out", default="repic-captions", help="output folder (captions.json, index.html, images/)")
    p.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16")
    p.add_argument("--batch-size", type=int, help="captions per batch (default: 16 on GPU, 2 on CPU)")
    p.add_argument("--backend", choices=("hf", "static"), help="decoder (default: static on GPU, hf on CPU)")
    p.add_argument("--max-new-tokens", type=int, help="caption length limit (default 1024, RePIC's)")
    p.add_argument("--max-pixels", type=int, help="image size cap (default 802816 = 1024*28*28, RePIC's; 0: the "
                                                  "model's own)")
    p.add_argument("--embedder", help="retrieval embedder: clip (default, the paper's) | color_layout")
    p.add_argument("--embedder-model", help="the embedder's checkpoint (default openai/clip-vit-large-patch14-336)")
    p.add_argument("--detector", help="retrieval detector: owlv2 (default) | foreground | yolo_world")
    p.add_argument("--detector-model", help="the detector's checkpoint (default google/owlv2-base-patch16-ensemble)")
    p.add_argument("--cache", help="where retrieval indexes are kept (default $REPIC_CACHE or ~/.cache/repic)")
    return top


def _main(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # which SIMD build it loads is no news to a user
    if args.command == "caption":
        caption_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    """The `repic` console script: one-line errors (exit status 2) for bad input, as the stages."""
    from repic.core.cli import run

    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
