"""Sources of real inputs for fetch_data, each pinned by a checksum declared in params.

Three kinds, one spec each (a dict from params.yaml):

- ``hf``: a Hugging Face hub repo, ``{kind: hf, repo_id, repo_type: model|dataset, revision: <40-hex commit>,
  allow_patterns: [..]}``. The commit sha is the pin: hub content at a commit is immutable, so it is the checksum.
  Downloaded with ``huggingface_hub.snapshot_download`` (which resumes its own partial files).
- ``url``: one HTTP(S) file, ``{kind: url, url, sha256, filename?, extract?: bool, subdir?}``. Google-Drive share
  links are rewritten to their direct-download form; GitHub archive links work as they are. Resumable (HTTP Range on
  a ``.part`` file), verified (sha256) before it is renamed into place; archives (zip, tar.*) are extracted into the
  destination folder, atomically, optionally keeping only one folder of the archive (``subdir``).
- ``local``: a folder already in RePIC's layout, ``{kind: local, path, sha256, mode?: copy|symlink, require?}``,
  copied (or mirrored with file symlinks) into the destination and checked against a tree hash (`tree_sha256`).

Every failure is a one-line `RepicError` that names the source and what was expected. A mismatching checksum prints
the actual one, so a new pin is a copy-paste away. Partial-download policy: a ``.part`` file interrupted mid-way is
kept so that the next call resumes it; a complete ``.part`` whose hash is wrong is deleted (resuming it could never
succeed), so after a checksum error nothing is left at the destination or beside it.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from repic.io import RepicError, atomic_dir, atomic_path

log = logging.getLogger(__name__)

KINDS = ("hf", "url", "local")
USER_AGENT = "repic-pipeline/0.1 (+urllib)"
CHUNK = 1 << 20
# Status codes worth another try: the server or a proxy is momentarily unable, not the request wrong.
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GDRIVE_FILE = re.compile(r"^https?://drive\.google\.com/file/d/([A-Za-z0-9_-]+)")
_GDRIVE_OPEN = re.compile(r"^https?://drive\.google\.com/(?:open|uc)\?(?:.*&)?id=([A-Za-z0-9_-]+)")

# JSON schema of one source spec in params (fetch_data.sources.<name>). if/then per kind rather than oneOf, so a
# validation error names the offending key instead of "not valid under any of the given schemas".
_STR = {"type": "string"}
_HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_KIND_PROPS: dict[str, dict[str, Any]] = {
    "hf": {"repo_id": _STR, "repo_type": {"enum": ["model", "dataset"]},
           "revision": {"type": "string", "pattern": "^[0-9a-f]{40}$"},
           "allow_patterns": {"type": "array", "items": _STR}, "endpoint": _STR},
    "url": {"url": {"type": "string", "pattern": "^https?://"}, "sha256": _HEX64, "filename": _STR,
            "extract": {"type": "boolean"}, "subdir": _STR, "retries": {"type": "integer", "minimum": 0},
            "timeout_s": {"type": "number", "exclusiveMinimum": 0}, "backoff_s": {"type": "number", "minimum": 0}},
    "local": {"path": _STR, "sha256": _HEX64, "mode": {"enum": ["copy", "symlink"]},
              "require": {"type": "array", "items": _STR}},
}
_KIND_REQUIRED = {"hf": ["repo_id", "revision"], "url": ["url", "sha256"], "local": ["path", "sha256"]}
SOURCE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "dest"],
    "properties": {"kind": {"enum": list(KINDS)}, "dest": _STR},
    "allOf": [
        {"if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
         "then": {"required": _KIND_REQUIRED[kind], "additionalProperties": False,
                  "properties": {"kind": {"const": kind}, "dest": _STR, **props}}}
        for kind, props in _KIND_PROPS.items()
    ],
}


# ============================================================================================== public entry
def fetch_source(spec: Mapping[str, Any], dest: str | os.PathLike, *, name: str | None = None,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Materialise one source at `dest` (a folder; a file for a non-archive `url`) and return `dest`.

    `cache_dir` (optional, outside any DVC output) keeps downloads between runs, so a rerun of the stage neither
    downloads again nor loses a half-finished download; `dest` then receives hard links (copies across
    filesystems). Without it, partial files live beside `dest`.
    """
    label = f"source {name!r}" if name else f"source {_describe(spec)}"
    kind = spec.get("kind")
    if kind not in KINDS:
        raise RepicError(f"{label}: kind: expected one of {list(KINDS)}, got {kind!r}")
    dest = Path(dest)
    cache = Path(cache_dir) if cache_dir is not None else None
    if kind == "hf":
        return fetch_hf(spec, dest, label=label, cache_dir=cache)
    if kind == "url":
        return fetch_url(spec, dest, label=label, cache_dir=cache, progress=progress)
    return fetch_local(spec, dest, label=label)


def fetch_sources(sources: Mapping[str, Mapping[str, Any]], outs: Mapping[str, str | os.PathLike], *,
                  cache_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, str]:
    """Fetch every named source into its output folder: spec ``dest`` is ``"<out>"`` or ``"<out>/<path>"`` where
    ``<out>`` is a key of `outs` (e.g. ``data``, ``model``). Shallow destinations go first, so a whole-root
    ``local`` copy never replaces what a later source extracted inside it. Returns name -> path fetched."""
    plan: list[tuple[int, str, Path]] = []
    for name, spec in sources.items():
        out, _, rel = str(spec.get("dest", "")).partition("/")
        if out not in outs:
            raise RepicError(f"source {name!r}: dest: expected '<out>[/path]' with <out> one of {sorted(outs)}, "
                             f"got {spec.get('dest')!r}")
        rel_path = Path(rel) if rel else Path()
        if rel_path.is_absolute() or ".." in rel_path.parts:
            raise RepicError(f"source {name!r}: dest: must stay inside {out!r}, got {spec.get('dest')!r}")
        plan.append((len(rel_path.parts), name, Path(outs[out]) / rel_path))
    done: dict[str, str] = {}
    for _, name, dest in sorted(plan):
        done[name] = str(fetch_source(sources[name], dest, name=name, cache_dir=cache_dir, progress=progress))
    return done


def gdrive_direct_url(url: str) -> str:
    """Google-Drive share link -> direct download link (``confirm=t`` skips the "can't scan for viruses" page of
    large files); any other URL is returned unchanged.

    >>> gdrive_direct_url("https://drive.google.com/file/d/1AbC_-9/view?usp=sharing")
    'https://drive.usercontent.google.com/download?id=1AbC_-9&export=download&confirm=t'
    """
    match = _GDRIVE_FILE.match(url) or _GDRIVE_OPEN.match(url)
    if not match:
        return url
    return f"https://drive.usercontent.google.com/download?id={match.group(1)}&export=download&confirm=t"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(folder: str | os.PathLike) -> str:
    """Checksum of a folder: sha256 over sorted ``relative/path NUL sha256(content)`` lines of every file
    (symlinks followed), so a copy and a symlink mirror of the same tree hash alike."""
    folder = Path(folder)
    lines = []
    for dirpath, _, filenames in os.walk(folder, followlinks=True):
        for fname in filenames:
            path = Path(dirpath) / fname
            lines.append(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n")
    return hashlib.sha256("".join(sorted(lines)).encode("utf-8")).hexdigest()


# ================================================================================================ hub (hf)
def fetch_hf(spec: Mapping[str, Any], dest: Path, *, label: str, cache_dir: Path | None = None) -> Path:
    """Snapshot of a hub repo at a pinned commit into `dest` (atomic: `dest` appears only when complete)."""
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    repo_id, revision = spec.get("repo_id"), str(spec.get("revision", ""))
    repo_type = spec.get("repo_type", "model")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise RepicError(f"{label}: repo_id: expected 'owner/name', got {repo_id!r}")
    if repo_type not in ("model", "dataset"):
        raise RepicError(f"{label}: repo_type: expected 'model' or 'dataset', got {repo_type!r}")
    if not _SHA1.match(revision):
        # A branch name would make the fetched content drift under an unchanged params.yaml.
        raise RepicError(f"{label}: revision: expected a 40-hex commit sha (the pin), got {revision!r}")
    patterns = spec.get("allow_patterns")
    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import), so tests and mirrors can set it late.
    endpoint = spec.get("endpoint") or os.environ.get("HF_ENDPOINT") or None
    where = f"{repo_type} {repo_id}@{revision[:12]}"

    # A stable staging folder: snapshot_download resumes its own partial files there on the next call.
    if cache_dir is not None:
        staging = cache_dir / "hf" / f"{repo_type}s" / repo_id.replace("/", "--") / revision
    else:
        staging = dest.parent / f".{dest.name}.partial"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_dir=staging,
                          allow_patterns=patterns, endpoint=endpoint)
    except (errors.HTTPError, errors.XetDownloadError, OSError, ValueError) as exc:
        # HTTPError covers the hub's status errors and httpx2's transport errors; OSError the local-entry ones.
        # Partial files stay in `staging` for the next call to resume; a staging folder with none goes.
        if not any(p.is_file() for p in staging.rglob("*") if not _is_hf_metadata(staging, p)):
            shutil.rmtree(staging, ignore_errors=True)
        # Offline mode still serves a complete snapshot from cache_dir; only a real miss lands here.
        if constants.is_offline_mode():
            raise RepicError(f"{label}: cannot download {where}: HF_HUB_OFFLINE is set and no complete copy is "
                             "cached (run with HF_HUB_OFFLINE=0)") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RepicError(f"{label}: cannot download {where} from {endpoint or constants.ENDPOINT} "
                         f"({type(exc).__name__}: {reason})") from None
    # A cached staging folder may hold files of an earlier, wider allow_patterns: take only what is asked now.
    rels = [p.relative_to(staging).as_posix() for p in _walk_files(staging) if not _is_hf_metadata(staging, p)]
    files = [staging / rel for rel in filter_repo_objects(rels, allow_patterns=patterns)]
    if not files:
        raise RepicError(f"{label}: {where} has no file matching allow_patterns={patterns!r}")

    with atomic_dir(dest) as tmp:
        for src in files:
            rel = src.relative_to(staging)
            if cache_dir is not None:
                _link_or_copy(src, tmp / rel)
            else:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, tmp / rel)
    if cache_dir is None:
        # Its .cache/huggingface metadata holds timestamps: never part of an output DVC hashes.
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _is_hf_metadata(root: Path, path: Path) -> bool:
    return path.relative_to(root).parts[:2] == (".cache", "huggingface")


# ===================================================================================================== url
class _Interrupted(Exception):
    """A transfer that stopped early for a passing reason (dropped connection, 503): worth another try, .part kept."""


def fetch_url(spec: Mapping[str, Any], dest: Path, *, label: str, cache_dir: Path | None = None,
              progress: bool = True) -> Path:
    """One hashed HTTP(S) file at `dest`, or, with ``extract: true``, its archive's content as folder `dest`."""
    url = spec.get("url")
    if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise RepicError(f"{label}: url: expected an http(s) URL, got {url!r}")
    sha256 = str(spec.get("sha256", "")).lower()
    if not _SHA256.match(sha256):
        raise RepicError(f"{label}: sha256: expected 64 hex digits (the pin), got {spec.get('sha256')!r}")
    direct = gdrive_direct_url(url)
    filename = spec.get("filename") or _filename_of(direct)
    extract = bool(spec.get("extract", False))
    opts = {"retries": int(spec.get("retries", 3)), "timeout_s": float(spec.get("timeout_s", 60)),
            "backoff_s": float(spec.get("backoff_s", 2.0)), "progress": progress}

    if cache_dir is not None:
        target = cache_dir / "url" / sha256 / filename   # content-addressed: a new pin never reuses an old file
    elif extract:
        target = dest.parent / f".{dest.name}.{filename}"
    else:
        target = dest
    download(direct, target, sha256, label=label, **opts)
    if extract:
        extract_archive(target, dest, subdir=spec.get("subdir"), label=label)
        if cache_dir is None:
            target.unlink(missing_ok=True)
    elif target != dest:
        with atomic_path(dest) as tmp:
            tmp.unlink()
            _link_or_copy(target, tmp)
    return dest


def download(url: str, target: Path, sha256: str, *, label: str, retries: int = 3, timeout_s: float = 60.0,
             backoff_s: float = 2.0, progress: bool = True) -> Path:
    """Download `url` to `target`: resumable through ``<target>.part``, renamed onto `target` only after its
    sha256 matches. An existing `target` with the right hash is kept as it is (no request)."""
    if target.is_file() and file_sha256(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    restarted = False
    while True:
        resumed = part.is_file() and part.stat().st_size > 0
        for attempt in range(retries + 1):
            try:
                _transfer(url, part, label=label, timeout_s=timeout_s, progress=progress)
                break
            except _Interrupted as exc:
                size = part.stat().st_size if part.exists() else 0
                if attempt == retries:
                    raise RepicError(f"{label}: download of {url} interrupted ({exc}); {size} bytes kept in "
                                     f"{part}: run again to resume") from None
                log.warning("%s: %s; retrying from byte %d", label, exc, size)
                time.sleep(backoff_s * 2**attempt)
        digest = file_sha256(part)
        if digest == sha256:
            os.replace(part, target)
            return target
        if resumed and not restarted:
            # The .part may predate a changed pin or be corrupt: one clean download before blaming the source.
            log.warning("%s: resumed download hashes wrong; downloading %s again from the start", label, url)
            part.unlink()
            restarted = True
            continue
        hint = " (the server sent an HTML page, not the file)" if _looks_like_html(part) else ""
        part.unlink()
        raise RepicError(f"{label}: sha256 mismatch for {url}: expected {sha256}, got {digest}{hint}")


def _transfer(url: str, part: Path, *, label: str, timeout_s: float, progress: bool) -> None:
    """One request: append to `part` from its current size (HTTP Range) or rewrite it when the server ignores
    the range. Raises _Interrupted when fewer bytes arrive than announced or the connection fails."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310 (scheme checked by caller)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return  # the .part already holds every byte; the hash decides
        if exc.code in TRANSIENT_STATUS:
            raise _Interrupted(f"HTTP {exc.code} {exc.reason}") from None
        raise RepicError(f"{label}: HTTP {exc.code} {exc.reason} for {url} (expected the file)") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Interrupted(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None

    with response:
        content_range = response.headers.get("Content-Range", "")
        if offset and response.status == 206 and content_range.startswith(f"bytes {offset}-"):
            mode, total = "ab", _int_or_none(content_range.rpartition("/")[2])
        else:
            # 200 to a Range request: the server cannot resume, so the file starts over.
            offset, mode = 0, "wb"
            total = _int_or_none(response.headers.get("Content-Length"))
        content_type = response.headers.get("Content-Type", "")
        if "drive.usercontent.google.com" in url and content_type.startswith("text/html"):
            raise RepicError(f"{label}: Google Drive answered {url} with an HTML page instead of the file "
                             "(quota exceeded, not shared publicly, or a changed link)")
        received = 0
        with open(part, mode) as fh, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                          desc=label, disable=not progress, leave=False) as bar:
            try:
                while block := response.read(CHUNK):
                    fh.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as exc:
                raise _Interrupted(f"{type(exc).__name__}: {exc}") from None
    # http.client returns short reads at a premature EOF instead of raising: compare with what was announced.
    if total is not None and offset + received < total:
        raise _Interrupted(f"connection closed after {offset + received} of {total} bytes")


def extract_archive(archive: Path, dest: Path, *, subdir: str | None = None, label: str = "archive") -> Path:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into folder `dest`, atomically; with `subdir`, only the content
    of that folder of the archive (e.g. GitHub's ``<repo>-<sha>/``) becomes `dest`."""
    with atomic_dir(dest) as tmp:
        raw = tmp / ".repic-extract"
        raw.mkdir()
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                # macOS zips carry __MACOSX/._name resource forks: they would pass for unlisted images.
                members = [m for m in zf.namelist() if not m.startswith("__MACOSX/")]
                zf.extractall(raw, members=members)  # zipfile drops '..' and leading '/' itself
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                tf.extractall(raw, filter="data")  # refuses links/paths that leave `raw`
        else:
            raise RepicError(f"{label}: {archive.name}: expected a zip or tar archive")
        src = raw / subdir if subdir else raw
        if not src.is_dir():
            top = sorted(p.name for p in raw.iterdir())
            raise RepicError(f"{label}: archive has no folder {subdir!r} (top level: {top})")
        for child in list(src.iterdir()):
            os.replace(child, tmp / child.name)
        shutil.rmtree(raw)
    return dest


def _filename_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    if "id" in query:  # Google Drive: the path says nothing, the id names the file
        return f"gdrive-{query['id'][0]}"
    name = Path(urllib.parse.unquote(parts.path)).name
    return name or "download"


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "", "*") else None
    except ValueError:
        return None


def _looks_like_html(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


# =================================================================================================== local
def fetch_local(spec: Mapping[str, Any], dest: Path, *, label: str) -> Path:
    """Copy (or mirror with file symlinks) a folder in RePIC's layout to `dest`, then check its tree hash."""
    src = Path(str(spec.get("path", "")))
    if not spec.get("path") or not src.is_dir():
        raise RepicError(f"{label}: path: expected an existing folder, got {str(src)!r}")
    for rel in spec.get("require", ["data"]):
        if not (src / rel).exists():
            raise RepicError(f"{label}: {src} lacks {rel!r} (expected a folder in RePIC's layout)")
    sha256 = str(spec.get("sha256", "")).lower()
    if not _SHA256.match(sha256):
        raise RepicError(f"{label}: sha256: expected 64 hex digits (the pin, see tree_sha256), "
                         f"got {spec.get('sha256')!r}")
    mode = spec.get("mode", "copy")
    if mode not in ("copy", "symlink"):
        raise RepicError(f"{label}: mode: expected 'copy' or 'symlink', got {mode!r}")
    with atomic_dir(dest) as tmp:
        for path in _walk_files(src):
            out = tmp / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            if mode == "symlink":
                # File-level links under real folders: a later source extracting into dest/data/... writes here,
                # never into the (possibly shared, read-only) source folder.
                out.symlink_to(path.resolve())
            else:
                # copyfile, not copy2: a read-only source must not make the copy read-only (it gets replaced).
                shutil.copyfile(path, out)
        digest = tree_sha256(tmp)
        if digest != sha256:
            raise RepicError(f"{label}: tree sha256 mismatch for {src}: expected {sha256}, got {digest}")
    return dest


# ================================================================================================= helpers
def _walk_files(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames))
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link when possible (a 16 GB model is not copied twice on one disk), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _describe(spec: Mapping[str, Any]) -> str:
    return str(spec.get("repo_id") or spec.get("url") or spec.get("path") or dict(spec))
