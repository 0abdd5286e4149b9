"""Atomic artifact I/O: nothing half-written ever sits where a valid artifact would be."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class RepicError(Exception):
    """A user-facing error: one line naming the file/key and what was expected."""


def umask() -> int:
    """The process's umask (read without changing it where /proc allows: os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Temporary siblings are named `.<name>.<host>-<pid>.<random>.tmp` (or `.old`): a later writer of the same path
# removes those of dead processes on its host (a kill -9 cannot clean up after itself), never a live writer's.
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_tmp(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `path` left by killed writers on this host; returns what was removed."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(?P<host>[A-Za-z0-9_-]+)-(?P<pid>[0-9]+)\.)?"
                         r"[A-Za-z0-9_]{8}\.(?:tmp|old)")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in path.parent.iterdir():
            m = pattern.fullmatch(entry.name)
            # no host-pid: written before writers were tagged, by a process long gone
            if not m or (m["pid"] and (m["host"] != _HOST or _alive(int(m["pid"])))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file gets the mode a plain open() would give (0666 less the umask), not mkstemp's 0600: colleagues on a
    shared cluster must be able to read the results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RepicError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RepicError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise RepicError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                         "JSON files must be UTF-8") from None


def write_parquet(path: str | os.PathLike, frame: Any) -> None:
    """Write a pandas DataFrame as Parquet (pyarrow) atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, engine="pyarrow", index=False)


def resolve_image(root: str | os.PathLike, rel: str) -> Path:
    """Resolve an image path as stored in RePIC's JSON files (relative to the data root, often './data/...')."""
    p = Path(rel)
    return p if p.is_absolute() else Path(root) / p


def open_rgb(root: str | os.PathLike, rel: str) -> Any:
    """The RGB PIL image at a path stored in RePIC's JSON files (relative to `root`), as RePIC's captioning
    scripts open it (no EXIF rotation; retrieval's `open_image` applies it); unreadable: a RepicError naming it."""
    from PIL import Image

    path = resolve_image(root, rel)
    try:
        return Image.open(path).convert("RGB")
    except OSError as exc:
        raise RepicError(f"cannot read image {path} ({exc})") from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; it replaces `path` only if the block succeeds.

    The directory gets mkdir's mode (0777 less the umask), not mkdtemp's 0700. An exception, Ctrl-C or SIGTERM
    (repic.core.cli turns it into an exception) removes it; what a kill -9 leaves is removed by the next writer."""
    path = Path(path)
    tmp = _fresh_tmp(path)
    try:
        yield tmp
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fresh_tmp(path: Path) -> Path:
    """A new temporary folder beside `path`, with mkdir's mode (0777 less the umask), not mkdtemp's 0700; what
    killed writers left beside `path` is swept first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_tmp(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def _swap_in(src: Path, path: Path) -> None:
    """Rename `src` onto `path`; an existing folder at `path` is moved aside first, then removed."""
    if path.is_dir() and not path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".old", dir=path.parent))
        os.replace(path, old / "x")
        os.replace(src, path)
        shutil.rmtree(old)
    else:
        os.replace(src, path)


@contextlib.contextmanager
def staged_outputs(folder: str | os.PathLike) -> Iterator[Path]:
    """A stage's outputs, all or nothing: yield a fresh temporary folder beside `folder` to write them into;
    only when the block succeeds does each entry written there replace its namesake in `folder` (created if
    need be), by renames, which need no disk space. Entries of `folder` not written (a persisted answer cache)
    stay. A failure (a full disk, an error, Ctrl-C) leaves `folder` as it was: never half the files of a run."""
    folder = Path(folder)
    tmp = _fresh_tmp(folder)
    try:
        yield tmp
        folder.mkdir(exist_ok=True)
        for entry in sorted(tmp.iterdir()):
            _swap_in(entry, folder / entry.name)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read a MiB at a time (downloads' pins; the retrieval.json a caption stage read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
