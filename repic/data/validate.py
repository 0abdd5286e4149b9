"""RePIC's file formats, checked in one place: databases (`database_mod.json`), query maps, the training JSON and
caption files; for fetched data, a JSON-serialisable report naming every defect, and the valid part.

Real data has defects (RePIC's released evaluation data): images a database lists but nobody shipped (Yo'LLaVA),
image files nobody listed (squidgame's sim, sky, sunghoon), query images not downloaded. The pipeline reports them
and goes on with what is valid (`filter_valid_queries`); ``strict`` turns any error into a failure.

Errors make an entry unusable, so ``ok`` is False: a listed image that does not exist, a query key the database
lacks, a key whose reference image is missing or whose concept lacks a field, a malformed entry. A database image
that exists but cannot be decoded (truncated, not an image) is an error too, which `build_db` stops on, naming the
file (decoding every image is left to this report, not to the filter each caption run applies). Warnings change
nothing the pipeline uses: image files in the database folder without an entry, path_to_concept rows naming keys
absent from concept_dict.

Image paths in the JSON files are relative to the data root (RePIC's repo root: ``./data/...``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from repic.core.io import RepicError, read_json, resolve_image
from repic.core.layout import REWARD_METHODS, SETTINGS, check_setting

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CONCEPT_FIELDS = ("name", "image", "info", "category")
NO_IMAGE, MALFORMED = "reference image missing", "malformed concept"


# ================================================================================================ database
def load_database(database_json: str | os.PathLike) -> dict[str, Any]:
    """Read a ``database_mod.json``; a file without the expected top-level shape is an error (nothing to keep)."""
    db = read_json(database_json)
    if not isinstance(db, dict) or not isinstance(db.get("concept_dict"), dict):
        raise RepicError(f"{database_json}: expected an object with 'concept_dict' (and 'path_to_concept')")
    if not isinstance(db.get("path_to_concept", {}), dict):
        raise RepicError(f"{database_json}: path_to_concept: expected an object image path -> key")
    return db


def validate_database(database_json: str | os.PathLike, root: str | os.PathLike) -> dict[str, Any]:
    """Report on one database: concepts, missing images, malformed concepts, unknown keys, unlisted images.

    Unlisted images are image files anywhere under the database's folder (RePIC's 4-concept database keeps them in
    per-group subfolders, beside ``db/output_*.json`` sub-databases that are not images) that neither
    ``concept_dict`` nor ``path_to_concept`` names.
    """
    database_json, root = Path(database_json), Path(root)
    db = load_database(database_json)
    concepts: dict[str, Any] = db["concept_dict"]
    path_to_concept: dict[str, Any] = db.get("path_to_concept") or {}

    malformed = [f"{key}: " + _concept_problem(concept) for key, concept in concepts.items()
                 if _concept_problem(concept)]
    listed = {c["image"] for c in concepts.values() if isinstance(c, dict) and isinstance(c.get("image"), str)}
    listed |= {p for p in path_to_concept if isinstance(p, str)}
    missing = sorted(p for p in listed if not resolve_image(root, p).is_file())
    unreadable = [f"{p}: {why}" for p in sorted(set(listed) - set(missing))
                  if (why := unreadable_image(resolve_image(root, p)))]
    known = {_norm(resolve_image(root, p)) for p in listed}
    on_disk = sorted(p for p in database_json.parent.rglob("*")
                     if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    unlisted = [_as_stored(p, root) for p in on_disk if _norm(p) not in known]
    unknown = sorted({k for k in path_to_concept.values() if k not in concepts}, key=str)

    report = {
        "database": _display(database_json, root),
        "concepts": len(concepts),
        "images_listed": len(listed),
        "missing_images": missing,
        "unreadable_images": unreadable,
        "keys_without_image": sorted(k for k, why in _unusable_keys(db, root).items() if why == NO_IMAGE),
        "malformed": malformed,
        "unknown_keys": unknown,
        "unlisted_images": unlisted,
    }
    report["errors"] = len(missing) + len(unreadable) + len(malformed)
    report["warnings"] = len(unlisted) + len(unknown)
    report["ok"] = report["errors"] == 0
    return report


def unreadable_image(path: Path) -> str:
    """Why the image file at `path` cannot be decoded (a truncated download, not an image), or '' if it can."""
    try:
        with Image.open(path) as im:
            im.load()  # decode it all: a truncated file opens fine and fails only here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return str(exc) or type(exc).__name__
    return ""


def _concept_problem(concept: Any) -> str:
    if not isinstance(concept, dict):
        return "expected an object with " + ", ".join(CONCEPT_FIELDS)
    absent = [f for f in CONCEPT_FIELDS if not isinstance(concept.get(f), str)]
    return f"missing or non-string {absent}" if absent else ""


def _unusable_keys(database: Mapping[str, Any], root: Path) -> dict[str, str]:
    """Keys that cannot be shown as a reference (image and info go into the prompt) -> why."""
    out = {}
    for key, concept in database["concept_dict"].items():
        if _concept_problem(concept):
            out[key] = MALFORMED
        elif not resolve_image(root, concept["image"]).is_file():
            out[key] = NO_IMAGE
    return out


# ================================================================================================= queries
def _entry_problems(query_map: Any, database: Mapping[str, Any], root: Path, setting: str, source: str
                    ) -> tuple[dict[str, list[tuple[list[str], str]]], dict[str, Any]]:
    """Per query image: (entry, problem or '') for each ground-truth entry (4-concept: each 4-key subset), plus
    the defects found. One place decides validity, for the report and for the filter alike."""
    subsets_per_image = check_setting(setting).subsets_per_image
    if not isinstance(query_map, dict):
        raise RepicError(f"{source}: expected an object query image -> keys")
    concepts = database["concept_dict"]
    unusable = _unusable_keys(database, root)
    arity = SETTINGS[setting].n_concepts
    entries: dict[str, list[tuple[list[str], str]]] = {}
    found: dict[str, Any] = {"missing_images": [], "unknown_keys": set(), "unusable_keys": {}, "malformed": []}
    for image, value in query_map.items():
        subsets = entry_subsets(value, setting)
        image_missing = not resolve_image(root, image).is_file()
        if image_missing:
            found["missing_images"].append(image)
        rows: list[tuple[list[str], str]] = []
        for keys in subsets:
            if not is_key_list(keys) or len(keys) != arity:
                shape = f"a list of {arity}-key lists" if subsets_per_image else f"a list of {arity} key(s)"
                found["malformed"].append(f"{image}: expected {shape}, got {keys!r}")
                rows.append(([], f"malformed entry (expected {shape}, got {keys!r})"))
                continue
            unknown = [k for k in keys if k not in concepts]
            bad = {k: unusable[k] for k in keys if k in unusable}
            found["unknown_keys"].update(unknown)
            found["unusable_keys"].update(bad)
            # These reasons reach the user (`left_out_entries`): say what is wrong in the data, not a code.
            problem = (f"query image not found ({resolve_image(root, image)})" if image_missing
                       else f"keys not in the database: {', '.join(unknown)}" if unknown
                       else "keys without a usable reference: " + ", ".join(f"{k} ({why})" for k, why in bad.items())
                       if bad else "")
            rows.append((keys, problem))
        entries[image] = rows
    return entries, found


def validate_queries(query_json: str | os.PathLike, database: Mapping[str, Any], root: str | os.PathLike,
                     setting: str) -> dict[str, Any]:
    """Report on one query file against its (loaded) database: missing query images, keys the database lacks,
    keys whose reference image is missing, malformed entries; how many entries remain valid."""
    root = Path(root)
    entries, found = _entry_problems(read_json(query_json), database, root, setting, str(query_json))
    rows = [problem for image_rows in entries.values() for _, problem in image_rows]
    valid = sum(1 for problem in rows if not problem)
    report = {
        "queries": _display(Path(query_json), root),
        "setting": setting,
        "images": len(entries),
        "entries": len(rows),
        "valid_entries": valid,
        "dropped_entries": len(rows) - valid,
        "missing_images": sorted(found["missing_images"]),
        "unknown_keys": sorted(found["unknown_keys"]),
        "unusable_keys": dict(sorted(found["unusable_keys"].items())),  # key -> why (image missing, malformed)
        "malformed": found["malformed"],
    }
    report["errors"] = len(rows) - valid
    report["warnings"] = 0
    report["ok"] = report["errors"] == 0
    return report


def filter_valid_queries(query_map: Mapping[str, Any], database: Mapping[str, Any], root: str | os.PathLike,
                         setting: str) -> dict[str, Any]:
    """The query map restricted to valid entries, in the same format (4-concept: per image, its valid subsets;
    an image left with none is dropped)."""
    entries, _ = _entry_problems(dict(query_map), database, Path(root), setting, "queries")
    out: dict[str, Any] = {}
    for image, rows in entries.items():
        kept = [keys for keys, problem in rows if not problem]
        if kept:
            out[image] = kept if SETTINGS[setting].subsets_per_image else kept[0]
    return out


def left_out_entries(query_map: Mapping[str, Any], database: Mapping[str, Any], root: str | os.PathLike,
                     setting: str) -> list[dict[str, Any]]:
    """The entries `filter_valid_queries` leaves out, each `{"query_image", "gt_keys", "reason"}`."""
    entries, _ = _entry_problems(dict(query_map), database, Path(root), setting, "queries")
    return [{"query_image": image, "gt_keys": keys, "reason": problem}
            for image, rows in entries.items() for keys, problem in rows if problem]


def describe_left_out(left_out: list[dict[str, Any]], limit: int = 5) -> str:
    """One line naming the first `limit` left-out entries and why, e.g. for a log line or an error."""
    shown = [f"{e['query_image']} {e['gt_keys']}: {e['reason']}" for e in left_out[:limit]]
    more = f"; and {len(left_out) - limit} more" if len(left_out) > limit else ""
    return "; ".join(shown) + more


# ================================================================================================= dataset
def validate_dataset(root: str | os.PathLike, database_json: str | os.PathLike | Mapping[str, str | os.PathLike],
                     queries: Mapping[str, str | os.PathLike], *, strict: bool = False) -> dict[str, Any]:
    """Validate the database(s) and every setting's query file. `database_json` is one path for all settings or
    a mapping setting -> path (RePIC's settings use different databases). With `strict`, a report that is not
    ``ok`` raises RepicError (its one-line summary); otherwise the caller goes on with the valid part."""
    root = Path(root)
    per_setting = ({s: Path(database_json[s]) for s in queries} if isinstance(database_json, Mapping)
                   else {s: Path(database_json) for s in queries})
    databases: dict[str, dict[str, Any]] = {}
    query_reports: dict[str, dict[str, Any]] = {}
    for setting, query_json in queries.items():
        db_path = per_setting[setting]
        if _display(db_path, root) not in databases:
            databases[_display(db_path, root)] = validate_database(db_path, root)
        query_reports[setting] = validate_queries(query_json, load_database(db_path), root, setting)
    return _combined(root, databases, query_reports, strict=strict)


def validate_datasets(root: str | os.PathLike, datasets: list[Mapping[str, Any]], *, strict: bool = False
                      ) -> dict[str, Any]:
    """`validate_dataset` for every evaluation dataset of params `base.data.datasets` (`{name, database,
    queries}`), merged into one report; query reports are keyed `<dataset>/<setting>`."""
    parts = [(d["name"], validate_dataset(root, d["database"], d["queries"])) for d in datasets]
    databases = {k: v for _, r in parts for k, v in r["databases"].items()}  # a shared database counted once
    queries = {f"{name}/{setting}": q for name, r in parts for setting, q in r["queries"].items()}
    return _combined(Path(root), databases, queries, strict=strict)


def _combined(root: Path, databases: dict[str, Any], queries: dict[str, Any], *, strict: bool) -> dict[str, Any]:
    """One report of database and query reports: ok when every part is, errors and warnings summed."""
    every = [*databases.values(), *queries.values()]
    report = {
        "root": str(root),
        "ok": all(r["ok"] for r in every),
        "errors": sum(r["errors"] for r in every),
        "warnings": sum(r["warnings"] for r in every),
        "databases": databases,
        "queries": queries,
    }
    if strict and not report["ok"]:
        raise RepicError(f"data validation failed (strict: true): {summary(report)}")
    return report


def summary(report: Mapping[str, Any]) -> str:
    """One line naming each file's defects, e.g. for the stage log and the strict-mode error."""
    bits = []
    for db in report.get("databases", {}).values():
        bits += _count_bits(db["database"], db, ("missing_images", "unreadable_images", "malformed", "unknown_keys",
                                                 "unlisted_images"))
    for q in report.get("queries", {}).values():
        b = _count_bits(q["queries"], q, ("missing_images", "unknown_keys", "unusable_keys", "malformed"))
        if q["dropped_entries"]:
            b.append(f"{q['queries']}: {q['dropped_entries']} of {q['entries']} entries dropped")
        bits += b
    return "; ".join(bits) if bits else "no defects"


def _count_bits(name: str, part: Mapping[str, Any], fields: tuple[str, ...]) -> list[str]:
    out = []
    for field in fields:
        items = list(part.get(field) or [])
        if items:
            example = ", ".join(map(str, items[:3])) + (", ..." if len(items) > 3 else "")
            out.append(f"{name}: {len(items)} {field.replace('_', ' ')} ({example})")
    return out


# ================================================================================================= helpers
def _norm(path: Path) -> str:
    # abspath, not resolve(): a symlink mirror (repic.data.sources, mode symlink) must compare by its own paths.
    return os.path.normpath(os.path.abspath(path))


def _display(path: Path, root: Path) -> str:
    """A JSON file named relative to the data root when under it: reports do not depend on where the root lies
    (fetch_data validates inside a temporary folder that is renamed afterwards)."""
    try:
        return Path(_norm(path)).relative_to(_norm(root)).as_posix()
    except ValueError:
        return str(path)


def _as_stored(path: Path, root: Path) -> str:
    """A file path the way RePIC's JSON files write it (``./data/...``) when under `root`, else absolute."""
    try:
        return "./" + Path(_norm(path)).relative_to(_norm(root)).as_posix()
    except ValueError:
        return _norm(path)


# ================================================================================================ query maps
def entry_subsets(value: Any, setting: str) -> list[Any]:
    """The ground-truth key lists of one query-map entry: RePIC's 4-concept maps hold a list of key subsets per
    image (`subsets_per_image`), the other settings one list."""
    return value if SETTINGS[setting].subsets_per_image and isinstance(value, list) else [value]


def is_key_list(keys: Any) -> bool:
    return isinstance(keys, list) and all(isinstance(k, str) for k in keys)


# ================================================================================================ training
TRAINING_FIELDS = ("image", "problem", "solution", "accu_reward_method")


def validate_training(samples: Any, source: str) -> list[dict[str, Any]]:
    """Check RePIC's training schema; raise naming the sample index and the missing/bad key."""
    if not isinstance(samples, list):
        raise RepicError(f"{source}: expected a JSON list of training samples")
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise RepicError(f"{source}: sample {i}: expected an object")
        for key in TRAINING_FIELDS:
            if key not in s:
                raise RepicError(f"{source}: sample {i}: missing key {key!r}")
        if s["accu_reward_method"] not in REWARD_METHODS:
            raise RepicError(f"{source}: sample {i}: accu_reward_method {s['accu_reward_method']!r} "
                             f"not one of {REWARD_METHODS}")
    return samples


# ================================================================================================ captions
def load_caption_rows(path: str | os.PathLike) -> list[list[Any]]:
    """Read a caption file (ours or RePIC's): a JSON list of `[query_image, [gt keys], caption, question]`.

    The question is optional, as RePIC's own scorers ignore it. A malformed row raises `RepicError` naming
    the file, the row index and what was expected; so does an empty list.
    """
    data = read_json(path)
    expected = "[query_image: str, [gt keys: str, ...], caption: str, question: str]"
    if not isinstance(data, list):
        raise RepicError(f"{path}: expected a JSON list of rows {expected}, got {type(data).__name__}")
    if not data:
        # An F1 of 0 over nothing reads like a real score; an empty file is a broken run, not a result.
        raise RepicError(f"{path}: no caption rows (an empty list), nothing to score")
    rows = []
    for i, row in enumerate(data):
        ok = (
            isinstance(row, list)
            and len(row) in (3, 4)
            and isinstance(row[0], str)
            and isinstance(row[1], list)
            and len(row[1]) > 0
            and all(isinstance(k, str) for k in row[1])
            and isinstance(row[2], str)
            and (len(row) == 3 or isinstance(row[3], str))
        )
        if not ok:
            raise RepicError(f"{path}: row {i}: expected {expected}, got {str(row)[:120]}")
        rows.append(row)
    return rows
