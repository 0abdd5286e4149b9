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
- ``git``: files of a git repository at a pinned commit, ``{kind: git, repo: owner/name, commit: <40 hex>,
  manifest: <file>, subdir?, lfs?: bool}``. GitHub's archive of the commit is downloaded (an archive is not
  byte-stable, so it has no sha256), and every file the manifest lists under `subdir` must land with the manifest's
  git blob id (sha1 of ``blob <len>\0`` + content); nothing else lands. With ``lfs: true`` (a repository whose
  images are LFS objects: the archive holds only pointers) each listed file is fetched from GitHub's LFS media
  host and checked against the manifest's LFS sha256. Manifests: ``git ls-tree -r -l`` output, or a TSV with a
  ``*_repo_path`` column and a ``git_blob`` or ``lfs_sha256`` column (configs/pins/).

Inputs with no public pin take ``record: true`` instead of ``revision``/``sha256``: the first fetch resolves the
revision (hub) or hashes the file (url), writes it into the lock file (`fetch_data.lock`, committed) and says so in
one line; every later fetch uses the recorded value and stops, naming both values, if the content differs.
Re-recording is deliberate: ``--re-record NAME`` (or ``REPIC_RERECORD=NAME,...`` under ``dvc repro``).

``expect`` (hf and url sources): a file of the paths RePIC expects (``./data/<dest>/...``, e.g.
``configs/pins/myvlm_expected_files.txt``); each must land, and an hf snapshot downloads only those.

Network: ``HF_ENDPOINT`` points the hub client elsewhere; ``REPIC_URL_MIRRORS`` maps URL prefixes to mirrors
(``"https://github.com=http://mirror/github https://drive.usercontent.google.com=http://mirror/drive"``): every
HTTP request of a source (and the judge's API base URL) goes to the first matching mirror. `make paper-rehearsal`
points both at loopback servers. Google Drive's "can't scan this file for viruses" page of large files is answered
like a browser does (its download form: confirm + uuid).

Every failure is a one-line `RepicError` that names the source and what was expected. A mismatching checksum prints
the actual one, so a new pin is a copy-paste away. Partial-download policy: a ``.part`` file interrupted mid-way is
kept so that the next call resumes it; a complete ``.part`` whose hash is wrong is deleted (resuming it could never
succeed), so after a checksum error nothing is left at the destination or beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import html.parser
import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from repic.core.io import RepicError, atomic_dir, atomic_path, file_sha256
from repic.core.params import SOURCE_KINDS, SOURCE_PIN

log = logging.getLogger(__name__)

MIRRORS_ENV = "REPIC_URL_MIRRORS"
RERECORD_ENV = "REPIC_RERECORD"
GITHUB_ARCHIVE = "https://github.com/{repo}/archive/{commit}.tar.gz"
GITHUB_LFS_MEDIA = "https://media.githubusercontent.com/media/{repo}/{commit}/{path}"
USER_AGENT = "repic-pipeline/0.1 (+urllib)"
CHUNK = 1 << 20
# Status codes worth another try: the server or a proxy is momentarily unable, not the request wrong.
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GDRIVE_FILE = re.compile(r"^https?://drive\.google\.com/file/d/([A-Za-z0-9_-]+)")
_GDRIVE_OPEN = re.compile(r"^https?://drive\.google\.com/(?:open|uc)\?(?:.*&)?id=([A-Za-z0-9_-]+)")

# ============================================================================================== public entry
def fetch_source(spec: Mapping[str, Any], dest: str | os.PathLike, *, name: str | None = None,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True,
                 lock: SourceLock | None = None, rerecord: bool = False, layout_path: str | None = None) -> Path:
    """Materialise one source at `dest` (a folder; a file for a non-archive `url`) and return `dest`.

    `cache_dir` (optional, outside any DVC output) keeps downloads between runs, so a rerun of the stage neither
    downloads again nor loses a half-finished download; `dest` then receives hard links (copies across
    filesystems). Without it, partial files live beside `dest`. A ``record: true`` source needs `lock` (the lock
    file); `rerecord` replaces its recorded value. `layout_path` is `dest` in RePIC's layout (``data/myvlm_data``),
    which the ``expect`` files are written against.
    """
    label = f"source {name!r}" if name else f"source {_describe(spec)}"
    kind = spec.get("kind")
    if kind not in SOURCE_KINDS:
        raise RepicError(f"{label}: kind: expected one of {list(SOURCE_KINDS)}, got {kind!r}")
    dest = Path(dest)
    cache = Path(cache_dir) if cache_dir is not None else None
    if kind in SOURCE_PIN and spec.get("record"):
        if spec.get(SOURCE_PIN[kind]):
            raise RepicError(f"{label}: give either {SOURCE_PIN[kind]} (a pin) or record: true, not both")
        if lock is None or name is None:
            raise RepicError(f"{label}: record: true needs a lock file (fetch_data.lock) to record into")
        return _fetch_recorded(spec, dest, name=name, label=label, cache_dir=cache, progress=progress, lock=lock,
                               rerecord=rerecord, layout_path=layout_path)
    if kind == "hf":
        return fetch_hf(spec, dest, label=label, cache_dir=cache, layout_path=layout_path)
    if kind == "url":
        return fetch_url(spec, dest, label=label, cache_dir=cache, progress=progress, layout_path=layout_path)
    if kind == "git":
        return fetch_git(spec, dest, label=label, cache_dir=cache, progress=progress)
    return fetch_local(spec, dest, label=label)


def fetch_sources(sources: Mapping[str, Mapping[str, Any]], outs: Mapping[str, str | os.PathLike], *,
                  cache_dir: str | os.PathLike | None = None, progress: bool = True,
                  lock: str | os.PathLike | None = None, rerecord: Sequence[str] = ()) -> dict[str, str]:
    """Fetch every named source into its output folder: spec ``dest`` is ``"<out>"`` or ``"<out>/<path>"`` where
    ``<out>`` is a key of `outs` (e.g. ``data``, ``model``). Shallow destinations go first, so a whole-root
    ``local`` copy never replaces what a later source extracted inside it. Returns name -> path fetched.

    `lock` is the lock file of the ``record: true`` sources; `rerecord` names sources whose recorded value is to be
    replaced (``all``: every one)."""
    unknown = sorted(set(rerecord) - set(sources) - {"all"})
    if unknown:
        raise RepicError(f"--re-record: no source named {unknown[0]!r} (sources: {sorted(sources)})")
    recording = [n for n, spec in sources.items() if spec.get("record")]
    if recording and lock is None:
        raise RepicError(f"source {recording[0]!r}: record: true needs fetch_data.lock (the lock file to record in)")
    lock_file = SourceLock(lock) if lock is not None else None
    plan: list[tuple[int, str, Path, str]] = []
    for name, spec in sources.items():
        out, _, rel = str(spec.get("dest", "")).partition("/")
        if out not in outs:
            raise RepicError(f"source {name!r}: dest: expected '<out>[/path]' with <out> one of {sorted(outs)}, "
                             f"got {spec.get('dest')!r}")
        rel_path = Path(rel) if rel else Path()
        if rel_path.is_absolute() or ".." in rel_path.parts:
            raise RepicError(f"source {name!r}: dest: must stay inside {out!r}, got {spec.get('dest')!r}")
        plan.append((len(rel_path.parts), name, Path(outs[out]) / rel_path, rel_path.as_posix()))
    from repic.core.progress import Progress

    done: dict[str, str] = {}
    with Progress(len(plan), "fetch", unit="source", every=1) as bar:
        for _, name, dest, rel in sorted(plan):
            again = name in rerecord or "all" in rerecord
            done[name] = str(fetch_source(sources[name], dest, name=name, cache_dir=cache_dir, progress=progress,
                                          lock=lock_file, rerecord=again, layout_path=rel))
            bar.update()
    return done


def rerecord_from_env() -> list[str]:
    """Source names in ``REPIC_RERECORD`` (comma or space separated): `dvc repro` runs a fixed command."""
    return [n for n in re.split(r"[,\s]+", os.environ.get(RERECORD_ENV, "")) if n]


# ========================================================================================= mirrors and lock
def mirror_url(url: str) -> str:
    """`url` with its prefix replaced by the first matching mirror of ``REPIC_URL_MIRRORS`` (space-separated
    ``PREFIX=REPLACEMENT`` pairs); unchanged when none matches.

    >>> os.environ[MIRRORS_ENV] = "https://github.com=http://127.0.0.1:9/gh"
    >>> mirror_url("https://github.com/o/r/archive/abc.tar.gz"), mirror_url("https://example.org/x")
    ('http://127.0.0.1:9/gh/o/r/archive/abc.tar.gz', 'https://example.org/x')
    >>> del os.environ[MIRRORS_ENV]
    """
    for pair in os.environ.get(MIRRORS_ENV, "").split():
        prefix, sep, replacement = pair.partition("=")
        if not sep or not prefix:
            raise RepicError(f"{MIRRORS_ENV}: expected space-separated PREFIX=REPLACEMENT pairs, got {pair!r}")
        if url.startswith(prefix):
            return replacement + url[len(prefix):]
    return url


class SourceLock:
    """The lock file of values recorded on first download: JSON ``{"sources": {name: {kind, id, pin: value}}}``,
    rewritten atomically after each recording (a kill leaves the previous, valid file)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
            except json.JSONDecodeError as exc:
                raise RepicError(f"{self.path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
            if not isinstance(data, dict) or not isinstance(data.get("sources", {}), dict):
                raise RepicError(f"{self.path}: expected {{\"sources\": {{name: {{...}}}}}}")
            self.entries = dict(data.get("sources", {}))

    def get(self, name: str) -> dict[str, Any] | None:
        return self.entries.get(name)

    def record(self, name: str, entry: dict[str, Any]) -> None:
        from repic.core.io import write_text

        self.entries[name] = entry
        body = {"about": "Values recorded on first download by fetch_data (sources with record: true). Commit this "
                         "file; later fetches must match it. Re-record: --re-record NAME / REPIC_RERECORD=NAME.",
                "sources": dict(sorted(self.entries.items()))}
        write_text(self.path, json.dumps(body, indent=2) + "\n")


def _identity(spec: Mapping[str, Any]) -> dict[str, Any]:
    if spec["kind"] == "hf":
        return {"kind": "hf", "repo_id": spec.get("repo_id"), "repo_type": spec.get("repo_type", "model")}
    return {"kind": "url", "url": spec.get("url")}


def _fetch_recorded(spec: Mapping[str, Any], dest: Path, *, name: str, label: str, cache_dir: Path | None,
                    progress: bool, lock: SourceLock, rerecord: bool, layout_path: str | None) -> Path:
    """A ``record: true`` source: fetched at its recorded value, or recorded now (first download / --re-record)."""
    kind, key = spec["kind"], SOURCE_PIN[spec["kind"]]
    entry, ident = lock.get(name), _identity(spec)
    if entry is not None and not rerecord:
        if {k: entry.get(k) for k in ident} != ident:
            raise RepicError(f"{label}: {lock.path} recorded {key} for {entry.get('repo_id') or entry.get('url')!r}, "
                             f"the source now names {ident.get('repo_id') or ident.get('url')!r}: re-record it "
                             f"deliberately with --re-record {name}")
        value = entry.get(key)
        if not isinstance(value, str) or not (_SHA1 if kind == "hf" else _SHA256).match(value):
            shape = "a 40-hex commit sha" if kind == "hf" else "64 hex digits"
            raise RepicError(f"{lock.path}: sources.{name}.{key}: expected {shape} (the recorded value), got "
                             f"{value!r}; restore the file from git, or record again with --re-record {name}")
        pinned = {**spec, key: value}
        pinned.pop("record")
        try:
            if kind == "hf":
                return fetch_hf(pinned, dest, label=label, cache_dir=cache_dir, layout_path=layout_path)
            return fetch_url(pinned, dest, label=label, cache_dir=cache_dir, progress=progress,
                             layout_path=layout_path)
        except RepicError as exc:
            raise RepicError(f"{exc} (the value recorded in {lock.path}; if the source changed on purpose, "
                             f"re-record with --re-record {name})") from None
    if kind == "hf":
        value = resolve_hf_revision(spec, label=label)
        fetch_hf({**spec, "revision": value}, dest, label=label, cache_dir=cache_dir, layout_path=layout_path)
    else:
        value = fetch_url(spec, dest, label=label, cache_dir=cache_dir, progress=progress, layout_path=layout_path,
                          record=True)
    old = entry.get(key) if entry else None
    lock.record(name, {**ident, key: value})
    what = f"re-recorded {key} {value} (was {old})" if old and old != value else f"recorded {key} {value}"
    print(f"{label}: {what} in {lock.path} (first download; later fetches must match)", flush=True)
    return dest


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
def resolve_hf_revision(spec: Mapping[str, Any], *, label: str) -> str:
    """The commit the hub's default branch points at now (what a ``record: true`` hub source records)."""
    from huggingface_hub import HfApi, errors

    repo_id, repo_type = spec.get("repo_id"), spec.get("repo_type", "model")
    endpoint = spec.get("endpoint") or os.environ.get("HF_ENDPOINT") or None
    try:
        info = HfApi(endpoint=endpoint).repo_info(repo_id, repo_type=repo_type, revision="main")
    except (errors.HTTPError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RepicError(f"{label}: cannot resolve the current revision of {repo_type} {repo_id} "
                         f"({type(exc).__name__}: {reason})") from None
    if not info.sha or not _SHA1.match(info.sha):
        raise RepicError(f"{label}: the hub gave no commit sha for {repo_type} {repo_id} (got {info.sha!r})")
    return info.sha


def fetch_hf(spec: Mapping[str, Any], dest: Path, *, label: str, cache_dir: Path | None = None,
             layout_path: str | None = None) -> Path:
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
    expected = expected_files(spec["expect"], layout_path, label=label) if spec.get("expect") else None
    if expected is not None and patterns is None:
        patterns = expected  # download exactly what RePIC expects, not the rest of the repo
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
    if expected is not None:
        _check_expected(set(rels), expected, label=label, where=where, expect=spec["expect"])

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


def expected_files(expect: str | os.PathLike, layout_path: str | None, *, label: str) -> list[str]:
    """Paths of an expect file (``./data/myvlm_data/cat/cat_1.jpg`` lines, RePIC-root relative) relative to the
    source's destination (`layout_path`, e.g. ``data/myvlm_data``)."""
    path = Path(expect)
    if not path.is_file():
        raise RepicError(f"{label}: expect: file {str(path)!r} not found")
    prefix = (layout_path or "").strip("/") + "/"
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rel = line.removeprefix("./")
        if not rel.startswith(prefix) or ".." in Path(rel).parts:
            raise RepicError(f"{path}:{n}: {line!r} is not inside this source's destination ./{prefix}")
        out.append(rel[len(prefix):])
    if not out:
        raise RepicError(f"{path}: lists no file")
    return out


def _check_expected(have: set[str], expected: list[str], *, label: str, where: str, expect: str) -> None:
    missing = [rel for rel in expected if rel not in have]
    if missing:
        raise RepicError(f"{label}: {len(missing)} of the {len(expected)} files listed in {expect} are missing "
                         f"from {where}, e.g. {missing[:3]}")


# ===================================================================================================== url
class _Interrupted(Exception):
    """A transfer that stopped early for a passing reason (dropped connection, 503): worth another try, .part kept."""


class _DriveForm(Exception):
    """Google Drive answered with its "can't scan for viruses" page: the file is at the page's form URL."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


def fetch_url(spec: Mapping[str, Any], dest: Path, *, label: str, cache_dir: Path | None = None,
              progress: bool = True, layout_path: str | None = None, record: bool = False) -> Any:
    """One hashed HTTP(S) file at `dest`, or, with ``extract: true``, its archive's content as folder `dest`.
    Returns `dest`; with `record` (no sha256 yet: first download of a ``record: true`` source) the file's sha256."""
    url = spec.get("url")
    if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise RepicError(f"{label}: url: expected an http(s) URL, got {url!r}")
    sha256: str | None = str(spec.get("sha256", "")).lower()
    if record:
        sha256 = None
    elif not _SHA256.match(sha256 or ""):
        raise RepicError(f"{label}: sha256: expected 64 hex digits (the pin), got {spec.get('sha256')!r}")
    direct = gdrive_direct_url(url)
    filename = spec.get("filename") or _filename_of(direct)
    extract = bool(spec.get("extract", False))
    subdir = spec.get("subdir")
    if subdir is not None:
        _check_inside(subdir, label=label, key="subdir")
    expected = expected_files(spec["expect"], layout_path, label=label) if spec.get("expect") else None
    opts = {"retries": int(spec.get("retries", 3)), "timeout_s": float(spec.get("timeout_s", 60)),
            "backoff_s": float(spec.get("backoff_s", 2.0)), "progress": progress}

    if cache_dir is not None:
        # content-addressed: a new pin never reuses an old file; an unpinned download waits under its URL's hash
        key = sha256 or "unpinned-" + hashlib.sha256(url.encode()).hexdigest()[:16]
        target = cache_dir / "url" / key / filename
    elif extract:
        target = dest.parent / f".{dest.name}.{filename}"
    else:
        target = dest.parent / f".{dest.name}.download" if record else dest
    try:
        digest = download(direct, target, sha256, label=label, whole=record, **opts)
        if cache_dir is not None and sha256 is None:
            final = cache_dir / "url" / digest / filename
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(target, final)
            shutil.rmtree(target.parent, ignore_errors=True)
            target = final
        if extract:
            extract_archive(target, dest, subdir=subdir, label=label, expect=expected,
                            expect_name=spec.get("expect"))
        elif target != dest:
            with atomic_path(dest) as tmp:
                tmp.unlink()
                _link_or_copy(target, tmp)
    finally:
        # Without a cache the downloaded archive (or record-mode file) is scratch: never left beside dest,
        # whether extraction worked or refused a hostile archive.
        if cache_dir is None and target != dest:
            target.unlink(missing_ok=True)
    return digest if record else dest


def download(url: str, target: Path, sha256: str | None, *, label: str, retries: int = 3, timeout_s: float = 60.0,
             backoff_s: float = 2.0, progress: bool = True, whole: bool = False) -> str:
    """Download `url` to `target`: resumable through ``<target>.part``, renamed onto `target` only after its
    sha256 matches (any complete download when `sha256` is None: recording). An existing `target` with the right
    hash is kept as it is (no request). Returns the file's sha256. Requests go through `mirror_url`; a Google
    Drive confirmation page is answered with its form. `whole` (recording: no hash to check the file against):
    a body whose end cannot be checked (no Content-Length, not chunked: it ends when the connection closes,
    which a cut connection does too) is refused."""
    if sha256 is not None and target.is_file() and file_sha256(target) == sha256:
        return sha256
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    restarted = False
    while True:
        resumed = part.is_file() and part.stat().st_size > 0
        for attempt in range(retries + 1):
            try:
                url = _transfer_following_forms(url, part, label=label, timeout_s=timeout_s, progress=progress,
                                                whole=whole)
                break
            except _Interrupted as exc:
                size = part.stat().st_size if part.exists() else 0
                if attempt == retries:
                    if any(re.fullmatch(r"\..+\.tmp", p.name) for p in part.parents):
                        # inside a stage's temporary output folder, which goes when the stage fails
                        where = (f"{size} bytes received, lost with the stage's temporary output: set "
                                 "fetch_data.cache (e.g. .cache/repic) to resume across runs")
                    else:
                        where = f"{size} bytes kept in {part}: run again to resume"
                    raise RepicError(f"{label}: download of {url} interrupted ({exc}); {where}") from None
                log.warning("%s: %s; retrying from byte %d", label, exc, size)
                time.sleep(backoff_s * 2**attempt)
        digest = file_sha256(part)
        if sha256 is None:
            if _looks_like_html(part):
                part.unlink()
                raise RepicError(f"{label}: {url} sent an HTML page, not the file (nothing recorded)")
            os.replace(part, target)
            return digest
        if digest == sha256:
            os.replace(part, target)
            return digest
        if resumed and not restarted:
            # The .part may predate a changed pin or be corrupt: one clean download before blaming the source.
            log.warning("%s: resumed download hashes wrong; downloading %s again from the start", label, url)
            part.unlink()
            restarted = True
            continue
        hint = " (the server sent an HTML page, not the file)" if _looks_like_html(part) else ""
        part.unlink()
        raise RepicError(f"{label}: sha256 mismatch for {url}: expected {sha256}, got {digest}{hint}")


def _transfer_following_forms(url: str, part: Path, *, label: str, timeout_s: float, progress: bool,
                              whole: bool = False) -> str:
    """`_transfer`, answering Google Drive's confirmation page with its form; returns the URL that gave the file."""
    for _ in range(3):
        try:
            _transfer(url, part, label=label, timeout_s=timeout_s, progress=progress, whole=whole)
            return url
        except _DriveForm as form:
            log.info("%s: Google Drive asks to confirm a large download; following its form", label)
            url = form.url
            part.unlink(missing_ok=True)
    raise RepicError(f"{label}: Google Drive keeps answering {url} with its confirmation page "
                     "(quota exceeded, or not shared publicly?)")


def _is_drive(url: str) -> bool:
    return urllib.parse.urlsplit(url).hostname in ("drive.usercontent.google.com", "drive.google.com")


class _FormParser(html.parser.HTMLParser):
    """The download form of Drive's warning page: `<form id="download-form" action=...>` + its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: list[tuple[str, str]] = []
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and (a.get("id") == "download-form" or "download" in a.get("action", "")):
            self.action, self._in_form = a.get("action", ""), True
        elif tag == "input" and self._in_form and a.get("name"):
            self.fields.append((a["name"], a.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def drive_form_url(page: str, base: str) -> str | None:
    """The URL Drive's "can't scan this file for viruses" page submits to (confirm, uuid, ...), or None."""
    parser = _FormParser()
    parser.feed(page)
    if not parser.action:
        return None
    action = urllib.parse.urljoin(base, parser.action)
    return action + ("&" if "?" in action else "?") + urllib.parse.urlencode(parser.fields)


def _transfer(url: str, part: Path, *, label: str, timeout_s: float, progress: bool, whole: bool = False) -> None:
    """One request: append to `part` from its current size (HTTP Range) or rewrite it when the server ignores
    the range. Raises _Interrupted when fewer bytes arrive than announced or the connection fails; with `whole`,
    a RepicError when the server announces no length (see `download`)."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(mirror_url(url), headers=headers)
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
        if _is_drive(url) and content_type.startswith("text/html"):
            page = response.read(2 << 20).decode("utf-8", "replace")
            form = drive_form_url(page, url)
            if form is not None:
                raise _DriveForm(form)
            raise RepicError(f"{label}: Google Drive answered {url} with an HTML page instead of the file "
                             "(quota exceeded, not shared publicly, or a changed link)")
        if whole and total is None and not getattr(response, "chunked", False):
            raise RepicError(f"{label}: {url} sent no Content-Length and no chunked body, so a download cut short "
                             "cannot be told from a whole one: nothing recorded (pin the file's sha256 in the source "
                             "instead of record: true)")
        received = 0
        with open(part, mode) as fh, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                          desc=label, disable=not progress, leave=False) as bar:
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Interrupted(f"{type(exc).__name__}: {exc}") from None
                if not block:
                    break
                fh.write(block)  # a full disk here is not the network's fault: not retried, one line (cli.run)
                received += len(block)
                bar.update(len(block))
    # http.client returns short reads at a premature EOF instead of raising: compare with what was announced.
    if total is not None and offset + received < total:
        raise _Interrupted(f"connection closed after {offset + received} of {total} bytes")


def _check_inside(rel: str, *, label: str, key: str) -> None:
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", rel):
        raise RepicError(f"{label}: {key}: expected a relative path inside the archive (no '/' start, no '..'), "
                         f"got {rel!r}")


def _unpack(archive: Path, raw: Path, *, label: str) -> None:
    """Extract `archive` into `raw`; a hostile or broken archive is one line naming the member and why."""
    try:
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
    except tarfile.FilterError as exc:
        member = getattr(getattr(exc, "tarinfo", None), "name", "?")
        raise RepicError(f"{label}: {archive.name}: refused member {member!r} ({type(exc).__name__}: it would "
                         "write outside the archive's folder or is a special file)") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise RepicError(f"{label}: {archive.name}: cannot extract ({type(exc).__name__}: {exc})") from None


def _copy_tree(src: Path, out: Path, *, top: Path, label: str) -> list[str]:
    """Copy the files under `src` into `out` (hard links when possible), refusing any link that leaves `top`.
    Copy, never move: whatever `src` is, its own files stay where they are. Returns the relative paths copied."""
    top_real = top.resolve()
    copied = []
    for dirpath, dirnames, filenames in os.walk(src):
        for dname in list(dirnames):
            d = Path(dirpath) / dname
            if d.is_symlink():
                if not d.resolve().is_relative_to(top_real):
                    raise RepicError(f"{label}: archive entry {d.relative_to(top).as_posix()!r} is a link "
                                     "pointing outside the archive (refused)")
                dirnames.remove(dname)  # a link to a folder inside the archive: its files come by their own path
        for fname in filenames:
            f = Path(dirpath) / fname
            real = f.resolve()
            if not real.is_relative_to(top_real) or not real.is_file():
                raise RepicError(f"{label}: archive entry {f.relative_to(top).as_posix()!r} is a link pointing "
                                 "outside the archive or to no file (refused)")
            rel = f.relative_to(src)
            _link_or_copy(real, out / rel)
            copied.append(rel.as_posix())
    return copied


def _locate(raw: Path, subdir: str | None, expected: list[str] | None, *, label: str) -> Path:
    """The folder of the archive that becomes the destination: `subdir`, or with an expect list and no subdir,
    the archive root or its single top folder (a zip may or may not wrap its content in one)."""
    if subdir:
        src = raw / subdir
        if not src.resolve().is_relative_to(raw.resolve()):
            raise RepicError(f"{label}: subdir {subdir!r} leads outside the archive (refused)")
        if not src.is_dir():
            top = sorted(p.name for p in raw.iterdir())
            raise RepicError(f"{label}: archive has no folder {subdir!r} (top level: {top})")
        return src
    if expected:
        candidates = [raw]
        while True:
            children = [p for p in candidates[-1].iterdir() if not p.name.startswith("__MACOSX")]
            if len(children) != 1 or not children[0].is_dir() or children[0].is_symlink():
                break
            candidates.append(children[0])
        for cand in candidates:
            if all((cand / rel).is_file() for rel in expected[:20]):
                return cand
    return raw


@contextlib.contextmanager
def _unpacked(archive: Path, dest: Path, *, label: str) -> Iterator[Path]:
    """The archive unpacked into a scratch folder beside `dest` (same file system, for cheap copies), removed after."""
    raw = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extract", dir=dest.parent))
    try:
        _unpack(archive, raw, label=label)
        yield raw
    finally:
        shutil.rmtree(raw, ignore_errors=True)


def extract_archive(archive: Path, dest: Path, *, subdir: str | None = None, label: str = "archive",
                    expect: list[str] | None = None, expect_name: str | None = None) -> Path:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into folder `dest`, atomically; with `subdir`, only the content
    of that folder of the archive (e.g. GitHub's ``<repo>-<sha>/``) becomes `dest`. `subdir` must stay inside the
    archive; files are copied out of the extracted tree, links leaving it are refused. With `expect` (paths
    relative to `dest`), every listed file must be there."""
    if subdir is not None:
        _check_inside(subdir, label=label, key="subdir")
    with atomic_dir(dest) as tmp:
        with _unpacked(archive, dest, label=label) as raw:
            src = _locate(raw, subdir, expect, label=label)
            copied = _copy_tree(src, tmp, top=raw, label=label)
        if expect is not None:
            _check_expected(set(copied), expect, label=label, where=archive.name, expect=expect_name or "expect")
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


# ===================================================================================================== git
def git_blob_id(path: str | os.PathLike) -> str:
    """Git's object id of a file's content: sha1 of ``blob <size>\\0`` + content (what ``git ls-tree`` lists)."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())  # noqa: S324 (git's id, not security)
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | os.PathLike, *, label: str) -> list[tuple[str, str, str]]:
    """(repo path, "blob" | "sha256", digest) per file of a manifest: ``git ls-tree -r -l`` lines
    (``<mode> blob <id> <size>\\t<path>``) or a TSV whose header has a ``*_repo_path`` column and a ``git_blob``
    or ``lfs_sha256`` column (configs/pins/)."""
    path = Path(path)
    if not path.is_file():
        raise RepicError(f"{label}: manifest: file {str(path)!r} not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[tuple[str, str, str]] = []
    header = lines[0].split("\t") if lines else []
    repo_cols = [i for i, h in enumerate(header) if h.endswith("_repo_path")]
    if repo_cols:
        col = repo_cols[0]
        algo, dcol = next((("blob", header.index(h)) if h == "git_blob" else ("sha256", header.index(h))
                           for h in header if h in ("git_blob", "lfs_sha256")), (None, -1))
        if algo is None:
            raise RepicError(f"{path}: header has no git_blob or lfs_sha256 column (got {header})")
        for n, line in enumerate(lines[1:], start=2):
            cells = line.split("\t")
            if line.strip() and len(cells) > max(col, dcol):
                out.append((cells[col], algo, cells[dcol].lower()))
            elif line.strip():
                raise RepicError(f"{path}:{n}: expected {len(header)} tab-separated columns")
    else:
        tree = re.compile(r"^\d{6} blob ([0-9a-f]{40})\s+\S+\t(.+)$")
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            m = tree.match(line)
            if not m:
                raise RepicError(f"{path}:{n}: expected '<mode> blob <id> <size>\\t<path>' (git ls-tree -r -l)")
            out.append((m.group(2), "blob", m.group(1)))
    for repo_path, algo, digest in out:
        if ".." in Path(repo_path).parts or Path(repo_path).is_absolute():
            raise RepicError(f"{path}: {repo_path!r}: a manifest path must stay inside the repository")
        if not (_SHA1 if algo == "blob" else _SHA256).match(digest):
            raise RepicError(f"{path}: {repo_path!r}: malformed {algo} id {digest!r}")
    if not out:
        raise RepicError(f"{path}: lists no file")
    return out


def fetch_git(spec: Mapping[str, Any], dest: Path, *, label: str, cache_dir: Path | None = None,
              progress: bool = True) -> Path:
    """The manifest's files under `subdir` of a repository at a pinned commit, each checked, into folder `dest`."""
    from repic.core.progress import Progress

    repo, commit = str(spec.get("repo", "")), str(spec.get("commit", ""))
    if not re.match(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", repo):
        raise RepicError(f"{label}: repo: expected 'owner/name', got {repo!r}")
    if not _SHA1.match(commit):
        raise RepicError(f"{label}: commit: expected a 40-hex commit sha (the pin), got {commit!r}")
    subdir = str(spec.get("subdir", "")).strip("/")
    if subdir:
        _check_inside(subdir, label=label, key="subdir")
    manifest = read_manifest(spec["manifest"], label=label)
    prefix = subdir + "/" if subdir else ""
    wanted = [(p, algo, d) for p, algo, d in manifest if p.startswith(prefix)]
    if not wanted:
        raise RepicError(f"{label}: manifest {spec['manifest']} lists no file under {subdir!r}")
    opts = {"retries": int(spec.get("retries", 3)), "timeout_s": float(spec.get("timeout_s", 60)),
            "backoff_s": float(spec.get("backoff_s", 2.0)), "progress": False}
    where = f"{repo}@{commit[:12]}"
    if spec.get("lfs"):
        # LFS objects: GitHub's archive holds pointers only; its media host serves each object, hashed here.
        with atomic_dir(dest) as tmp, Progress(len(wanted), f"{label} ({where}, LFS)", unit="file") as bar:
            for repo_path, algo, digest in wanted:
                if algo != "sha256":
                    raise RepicError(f"{label}: lfs: true needs a manifest of LFS sha256 (lfs_sha256 column)")
                url = GITHUB_LFS_MEDIA.format(repo=repo, commit=commit, path=urllib.parse.quote(repo_path))
                rel = repo_path[len(prefix):]
                if cache_dir is not None:
                    cached = cache_dir / "url" / digest / Path(repo_path).name
                    download(url, cached, digest, label=f"{label}: {repo_path}", **opts)
                    _link_or_copy(cached, tmp / rel)
                else:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    download(url, tmp / rel, digest, label=f"{label}: {repo_path}", **opts)
                bar.update()
        return dest

    url = GITHUB_ARCHIVE.format(repo=repo, commit=commit)
    if cache_dir is not None:
        archive = cache_dir / "git" / repo.replace("/", "--") / f"{commit}.tar.gz"
    else:
        archive = dest.parent / f".{dest.name}.{commit[:12]}.tar.gz"
    try:
        if not archive.is_file():
            # Not byte-stable (GitHub regenerates archives), so no sha256: the files are checked one by one below.
            download(url, archive, None, label=label, **{**opts, "progress": progress})
        with _unpacked(archive, dest, label=label) as raw:
            tops = [p for p in raw.iterdir() if p.is_dir()]
            if len(tops) != 1:
                raise RepicError(f"{label}: {url}: expected one top folder (<repo>-<commit>/), got "
                                 f"{sorted(p.name for p in tops)}")
            top = tops[0]
            bad: list[str] = []
            with atomic_dir(dest) as tmp:
                for repo_path, algo, digest in wanted:
                    src = top / repo_path
                    if src.is_symlink() or not src.is_file():
                        bad.append(f"{repo_path} (missing)")
                        continue
                    got = git_blob_id(src) if algo == "blob" else file_sha256(src)
                    if got != digest:
                        bad.append(f"{repo_path} (expected {algo} {digest}, got {got})")
                        continue
                    _link_or_copy(src, tmp / repo_path[len(prefix):])
                if bad:
                    raise RepicError(f"{label}: {len(bad)} of {len(wanted)} files of {where} do not match "
                                     f"{spec['manifest']}: {'; '.join(bad[:3])}")
    except RepicError:
        if cache_dir is not None:
            archive.unlink(missing_ok=True)  # a bad cached archive must not fail every later run the same way
        raise
    finally:
        if cache_dir is None:
            archive.unlink(missing_ok=True)
    return dest


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
