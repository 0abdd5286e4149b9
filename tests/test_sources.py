"""repic.data.sources against real HTTP servers on loopback: a file server with Range support and failure modes, and a
fake Hugging Face hub serving the routes snapshot_download uses at a pinned commit. Offline, a few seconds."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

from repic.core.io import RepicError
from repic.core.params import SOURCE_SCHEMA
from repic.data.sources import (
    extract_archive,
    fetch_source,
    fetch_sources,
    gdrive_direct_url,
    git_blob_id,
    tree_sha256,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ============================================================================================ file server
@dataclass
class FileServer:
    """What the loopback server serves and how it misbehaves; `requests` records (method, path, headers)."""

    files: dict[str, bytes] = field(default_factory=dict)
    drop_after: dict[str, int] = field(default_factory=dict)   # path -> bytes sent before closing, once
    no_range: set[str] = field(default_factory=set)             # paths served whole even to a Range request
    content_type: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    drive: set[str] = field(default_factory=set)                # Drive file ids behind a confirmation page
    no_length: set[str] = field(default_factory=set)            # paths sent with no Content-Length (ends at close)
    url: str = ""

    def ranges(self, path: str) -> list[str | None]:
        return [h.get("Range") for _, p, h in self.requests if p == path]


def _file_handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = unquote(urlsplit(self.path).path)
            state.requests.append(("GET", path, dict(self.headers)))
            query = dict(parse_qsl(urlsplit(self.path).query))
            if path == "/download" and query.get("id") in state.drive:
                # Google Drive: a large file first gets the "can't scan for viruses" page, whose form adds a uuid.
                if query.get("uuid") != "u-123":
                    page = (f'<!DOCTYPE html><html><body>Google Drive can\'t scan this file for viruses.'
                            f'<form id="download-form" action="https://drive.usercontent.google.com/download" '
                            f'method="get"><input type="submit" value="Download anyway"/>'
                            f'<input type="hidden" name="id" value="{query["id"]}">'
                            f'<input type="hidden" name="export" value="download">'
                            f'<input type="hidden" name="confirm" value="t">'
                            f'<input type="hidden" name="uuid" value="u-123"></form></body></html>').encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                path = "/drive/" + query["id"]
            if path not in state.files:
                self.send_error(404, "Not Found")
                return
            data = state.files[path]
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if match and path not in state.no_range:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            if path not in state.no_length:
                self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", state.content_type.get(path, "application/octet-stream"))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if path in state.drop_after:
                # Announce the whole length, send part of it, hang up: a dropped connection mid-transfer.
                self.wfile.write(body[: state.drop_after.pop(path)])
                self.wfile.flush()
                return
            self.wfile.write(body)

    return Handler



def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would intercept loopback requests.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def files(no_proxy: None) -> Iterator[FileServer]:
    state = FileServer()
    for url in _serve(_file_handler(state)):
        state.url = url
        yield state


def url_spec(server: FileServer, path: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "url", "url": server.url + path, "sha256": sha(server.files[path]), "backoff_s": 0, **extra}


def leftovers(folder: Path) -> list[str]:
    """Partial or temporary files anywhere under `folder`."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".part", ".tmp")) or ".partial" in p.name)


PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, so a transfer spans several reads


# ==================================================================================================== url
def test_gdrive_share_links_become_direct_downloads() -> None:
    direct = "https://drive.usercontent.google.com/download?id=1x_Y-z&export=download&confirm=t"
    assert gdrive_direct_url("https://drive.google.com/file/d/1x_Y-z/view?usp=sharing") == direct
    assert gdrive_direct_url("https://drive.google.com/open?id=1x_Y-z") == direct
    github = "https://github.com/oyt9306/RePIC/archive/122ffa6.tar.gz"
    assert gdrive_direct_url(github) == github


def test_url_download_is_hashed_and_lands_whole(files: FileServer, tmp_path: Path) -> None:
    files.files["/data/a.bin"] = PAYLOAD
    out = fetch_source(url_spec(files, "/data/a.bin"), tmp_path / "out" / "a.bin", name="a", progress=False)
    assert out.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == []
    # A present file with the right hash is kept without asking the server again.
    fetch_source(url_spec(files, "/data/a.bin"), out, progress=False)
    assert len(files.requests) == 1


def test_url_wrong_checksum_names_both_hashes_and_leaves_nothing(files: FileServer, tmp_path: Path) -> None:
    files.files["/a.bin"] = PAYLOAD
    spec = {**url_spec(files, "/a.bin"), "sha256": "0" * 64}
    with pytest.raises(RepicError) as err:
        fetch_source(spec, tmp_path / "a.bin", name="weights", progress=False)
    msg = str(err.value)
    assert "source 'weights'" in msg and "sha256 mismatch" in msg
    assert "0" * 64 in msg and sha(PAYLOAD) in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # neither the file nor a .part (a complete wrong .part cannot resume)


def test_url_html_instead_of_file_is_called_out(files: FileServer, tmp_path: Path) -> None:
    files.files["/share"] = b"<!DOCTYPE html><html><body>Quota exceeded</body></html>"
    files.content_type["/share"] = "text/html"
    with pytest.raises(RepicError, match="HTML page"):
        fetch_source({**url_spec(files, "/share"), "sha256": "1" * 64}, tmp_path / "f", progress=False)


def test_url_interrupted_download_resumes_on_the_next_call(files: FileServer, tmp_path: Path) -> None:
    files.files["/big.bin"] = PAYLOAD
    files.drop_after["/big.bin"] = 300_000
    dest = tmp_path / "big.bin"
    expected = (r"source 'big': download of .* interrupted \(connection closed after 300000 of 1048576 bytes\); "
                r"300000 bytes kept in .*big\.bin\.part: run again to resume")
    with pytest.raises(RepicError, match=expected):
        fetch_source(url_spec(files, "/big.bin", retries=0), dest, name="big", progress=False)
    part = tmp_path / "big.bin.part"
    assert not dest.exists() and part.stat().st_size == 300_000  # kept on purpose: the next call resumes it
    fetch_source(url_spec(files, "/big.bin", retries=0), dest, name="big", progress=False)
    assert sha(dest.read_bytes()) == sha(PAYLOAD)
    assert files.ranges("/big.bin") == [None, "bytes=300000-"]
    assert leftovers(tmp_path) == []


def test_url_interruption_is_retried_within_one_call(files: FileServer, tmp_path: Path) -> None:
    files.files["/big.bin"] = PAYLOAD
    files.drop_after["/big.bin"] = 12_345
    dest = fetch_source(url_spec(files, "/big.bin", retries=2), tmp_path / "big.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert files.ranges("/big.bin") == [None, "bytes=12345-"]


def test_url_stale_part_or_server_without_ranges_starts_over(files: FileServer, tmp_path: Path) -> None:
    files.files["/a.bin"] = PAYLOAD
    files.files["/b.bin"] = PAYLOAD[::-1]
    files.no_range.add("/b.bin")
    # /a.bin: a .part left by another pin resumes, hashes wrong, and is downloaded once more from scratch.
    (tmp_path / "a.bin.part").write_bytes(b"stale bytes")
    assert fetch_source(url_spec(files, "/a.bin"), tmp_path / "a.bin", progress=False).read_bytes() == PAYLOAD
    assert files.ranges("/a.bin") == ["bytes=11-", None]
    # /b.bin: the server answers a Range request with 200: the .part is rewritten, not appended to.
    (tmp_path / "b.bin.part").write_bytes(PAYLOAD[::-1][:5000])
    assert fetch_source(url_spec(files, "/b.bin"), tmp_path / "b.bin", progress=False).read_bytes() == PAYLOAD[::-1]
    assert files.ranges("/b.bin") == ["bytes=5000-"]
    assert leftovers(tmp_path) == []


def test_url_404_is_one_clear_line(files: FileServer, tmp_path: Path) -> None:
    with pytest.raises(RepicError) as err:
        fetch_source({"kind": "url", "url": files.url + "/nope.zip", "sha256": "2" * 64}, tmp_path / "x",
                     name="queries", progress=False)
    assert str(err.value).startswith("source 'queries': HTTP 404") and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _targz(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_zip_archive_is_extracted_atomically(files: FileServer, tmp_path: Path) -> None:
    files.files["/q.zip"] = _zip({"myvlm_data/cat/1.jpg": b"jpg1", "myvlm_data/cat/2.jpg": b"jpg2",
                                  "__MACOSX/myvlm_data/cat/._1.jpg": b"fork"})
    dest = tmp_path / "root" / "data"
    fetch_source(url_spec(files, "/q.zip", extract=True), dest, progress=False)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "myvlm_data/cat/1.jpg", "myvlm_data/cat/2.jpg"]
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["data"]  # the archive itself is gone
    assert leftovers(tmp_path) == []


def test_github_archive_subdir_and_missing_subdir(files: FileServer, tmp_path: Path) -> None:
    files.files["/oyt9306/RePIC/archive/abc123.tar.gz"] = _targz({
        "RePIC-abc123/README.md": b"readme", "RePIC-abc123/data/query_tot/q.json": b"{}"})
    spec = url_spec(files, "/oyt9306/RePIC/archive/abc123.tar.gz", extract=True, subdir="RePIC-abc123/data")
    dest = fetch_source(spec, tmp_path / "repic_data", progress=False)
    assert (dest / "query_tot" / "q.json").read_bytes() == b"{}" and not (dest / "README.md").exists()
    with pytest.raises(RepicError, match=r"archive has no folder 'RePIC-other' \(top level: \['RePIC-abc123'\]\)"):
        fetch_source({**spec, "subdir": "RePIC-other"}, tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()
    files.files["/plain.txt"] = b"not an archive"
    with pytest.raises(RepicError, match="expected a zip or tar archive"):
        fetch_source(url_spec(files, "/plain.txt", extract=True), tmp_path / "plain", progress=False)


def test_cache_dir_keeps_downloads_between_runs(files: FileServer, tmp_path: Path) -> None:
    files.files["/a.bin"] = PAYLOAD
    files.files["/q.zip"] = _zip({"x/1.jpg": b"1"})
    cache = tmp_path / "cache"
    for run in ("run1", "run2"):
        out = fetch_source(url_spec(files, "/a.bin"), tmp_path / run / "a.bin", cache_dir=cache, progress=False)
        fetch_source(url_spec(files, "/q.zip", extract=True), tmp_path / run / "q", cache_dir=cache, progress=False)
        assert out.read_bytes() == PAYLOAD and (tmp_path / run / "q" / "x" / "1.jpg").is_file()
    assert len(files.requests) == 2  # the second run asked nothing
    assert os.path.samefile(tmp_path / "run2" / "a.bin", cache / "url" / sha(PAYLOAD) / "a.bin")


def test_url_spec_errors_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(RepicError, match=r"source 'x': sha256: expected 64 hex digits"):
        fetch_source({"kind": "url", "url": "https://example.org/a", "sha256": "abc"}, tmp_path / "a", name="x")
    with pytest.raises(RepicError, match=r"source 'x': url: expected an http\(s\) URL"):
        fetch_source({"kind": "url", "url": "ftp://example.org/a", "sha256": "a" * 64}, tmp_path / "a", name="x")
    with pytest.raises(RepicError, match=r"source 'x': kind: expected one of"):
        fetch_source({"kind": "s3"}, tmp_path / "a", name="x")


def test_source_schema_names_the_offending_key() -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(SOURCE_SCHEMA)

    def errors(spec: dict[str, Any]) -> list[tuple[str, str]]:
        return [(".".join(map(str, e.absolute_path)), e.validator) for e in validator.iter_errors(spec)]

    assert errors({"kind": "hf", "repo_id": "a/b", "revision": "a" * 40, "dest": "model"}) == []
    assert errors({"kind": "url", "url": "https://x/y.zip", "sha256": "b" * 64, "extract": True, "dest": "d/x"}) == []
    assert errors({"kind": "hf", "repo_id": "a/b", "revision": "main", "dest": "model"}) == [("revision", "pattern")]
    assert errors({"kind": "url", "url": "https://x", "sha256": "b" * 64, "dest": "d", "extrac": True}) == [
        ("", "additionalProperties")]
    assert errors({"kind": "local", "path": "x", "dest": "data"}) == [("", "required")]
    assert errors({"kind": "s3", "dest": "data"}) == [("kind", "enum")]


# =================================================================================================== local
def _repic_folder(root: Path) -> Path:
    (root / "data" / "database_tot" / "db").mkdir(parents=True)
    (root / "data" / "database_tot" / "db" / "a.jpg").write_bytes(b"img")
    (root / "data" / "database_tot" / "db" / "database_mod.json").write_text("{}")
    return root


def test_local_copy_and_symlink_are_checked_against_the_tree_hash(tmp_path: Path) -> None:
    src = _repic_folder(tmp_path / "src")
    digest = tree_sha256(src)
    os.chmod(src / "data" / "database_tot" / "db" / "a.jpg", 0o444)
    copy = fetch_source({"kind": "local", "path": str(src), "sha256": digest}, tmp_path / "world" / "copy")
    copied = copy / "data" / "database_tot" / "db" / "a.jpg"
    assert copied.read_bytes() == b"img" and not copied.is_symlink()
    assert os.stat(copied).st_mode & 0o200  # a read-only source (shared/) does not make the copy read-only
    link = fetch_source({"kind": "local", "path": str(src), "sha256": digest, "mode": "symlink"},
                        tmp_path / "world" / "link")
    linked = link / "data" / "database_tot" / "db" / "a.jpg"
    assert linked.is_symlink() and not (link / "data").is_symlink()  # folders are real: later sources add to them
    assert tree_sha256(copy) == tree_sha256(link) == digest


def test_local_errors(tmp_path: Path) -> None:
    src = _repic_folder(tmp_path / "src")
    mismatch = r"source 'eval': tree sha256 mismatch for .*: expected 0{64}, got [0-9a-f]{64}"
    with pytest.raises(RepicError, match=mismatch):
        fetch_source({"kind": "local", "path": str(src), "sha256": "0" * 64}, tmp_path / "dest", name="eval")
    assert not (tmp_path / "dest").exists()
    with pytest.raises(RepicError, match=r"lacks 'data/query_tot' \(expected a folder in RePIC's layout\)"):
        fetch_source({"kind": "local", "path": str(src), "sha256": "0" * 64, "require": ["data/query_tot"]},
                     tmp_path / "dest")
    with pytest.raises(RepicError, match="path: expected an existing folder"):
        fetch_source({"kind": "local", "path": str(tmp_path / "absent"), "sha256": "0" * 64}, tmp_path / "dest")


def test_fetch_sources_fills_outputs_shallow_first(files: FileServer, tmp_path: Path) -> None:
    src = _repic_folder(tmp_path / "src")
    files.files["/q.zip"] = _zip({"cat/1.jpg": b"1"})
    sources = {  # listed deepest first on purpose: the whole-root copy must not wipe the extraction
        "queries": url_spec(files, "/q.zip", extract=True, dest="data/data/myvlm_data"),
        "eval": {"kind": "local", "path": str(src), "sha256": tree_sha256(src), "dest": "data"},
    }
    outs = {"data": tmp_path / "world", "model": tmp_path / "model"}
    done = fetch_sources(sources, outs, progress=False)
    assert done == {"eval": str(tmp_path / "world"), "queries": str(tmp_path / "world/data/myvlm_data")}
    assert (tmp_path / "world/data/myvlm_data/cat/1.jpg").is_file()
    assert (tmp_path / "world/data/database_tot/db/a.jpg").is_file()
    with pytest.raises(RepicError, match=r"source 'bad': dest: must stay inside 'data'"):
        fetch_sources({"bad": {**sources["eval"], "dest": "data/../../etc"}}, outs)
    with pytest.raises(RepicError, match=r"source 'bad': dest: expected '<out>\[/path\]' with <out> one of"):
        fetch_sources({"bad": {**sources["eval"], "dest": "elsewhere"}}, outs)


# ==================================================================================================== hub
REV = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    """Repos at one commit: (repo_type, repo_id) -> {path: bytes}."""

    repos: dict[tuple[str, str], dict[str, bytes]]
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""


def _hub_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    # The routes huggingface_hub's snapshot_download takes for a commit-sha revision (no repo_info call needed):
    #   GET  /api/{models|datasets}/{repo_id}/tree/{rev}?recursive=true   -> file listing (one page)
    #   HEAD /[datasets/]{repo_id}/resolve/{rev}/{path}                      -> X-Repo-Commit, ETag, size
    #   GET  /[datasets/]{repo_id}/resolve/{rev}/{path}                      -> the bytes
    tree = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)/tree/([0-9a-f]{40})/?$")
    resolve = re.compile(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([0-9a-f]{40})/(.+)$")
    info = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/main)?$")  # repo_info: record mode

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: bytes, headers: dict[str, str], send_body: bool) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _route(self, send_body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, self.path))
            if m := info.match(path):
                if (m.group(1)[:-1], m.group(2)) in hub.repos:
                    body = json.dumps({"id": m.group(2), "sha": REV, "siblings": []}).encode()
                    self._reply(200, body, {"Content-Type": "application/json"}, send_body)
                    return
            elif m := tree.match(path):
                repo = hub.repos.get((m.group(1)[:-1], m.group(2)))
                if repo is not None and m.group(3) == REV:
                    listing = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                               for p, b in repo.items()]
                    self._reply(200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, send_body)
                    return
            elif m := resolve.match(path):
                repo = hub.repos.get(("dataset" if m.group(1) else "model", m.group(2)))
                if repo is not None and m.group(3) == REV and m.group(4) in repo:
                    data = repo[m.group(4)]
                    headers = {"X-Repo-Commit": REV, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
                    self._reply(200, data, headers, send_body)
                    return
            self._reply(404, b'{"error": "not found"}', {"Content-Type": "application/json"}, send_body)

        def do_GET(self) -> None:  # noqa: N802
            self._route(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._route(False)

    return Handler


@pytest.fixture
def hub(no_proxy: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    state = FakeHub(repos={
        ("model", "org/tiny-vl"): {"config.json": b'{"model_type": "x"}', "model.safetensors": b"\1" * 4096,
                                   "README.md": b"card"},
        ("dataset", "org/train-data"): {"train.json": b"[]", "images/a.png": b"png"},
    })
    # conftest turns offline mode on for the whole suite; this test is the one place that talks to a "hub".
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_TOKEN", "")
    for url in _serve(_hub_handler(state)):
        state.url = url
        monkeypatch.setenv("HF_ENDPOINT", url)
        yield state


def test_hf_snapshot_at_pinned_commit(hub: FakeHub, tmp_path: Path) -> None:
    spec = {"kind": "hf", "repo_id": "org/tiny-vl", "revision": REV, "allow_patterns": ["*.json", "*.safetensors"]}
    dest = fetch_source(spec, tmp_path / "models" / "base", name="base_model")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "config.json", "model.safetensors"]  # no README (patterns), no .cache/huggingface metadata
    assert (dest / "model.safetensors").read_bytes() == b"\1" * 4096
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["base"]  # staging folder removed
    assert ("GET", f"/api/models/org/tiny-vl/tree/{REV}?recursive=true&expand=false") in hub.requests
    assert all(REV in path for _, path in hub.requests)

    data = fetch_source({"kind": "hf", "repo_id": "org/train-data", "repo_type": "dataset", "revision": REV},
                        tmp_path / "train")
    assert (data / "images" / "a.png").read_bytes() == b"png" and (data / "train.json").is_file()
    assert any(path.startswith("/datasets/org/train-data/resolve/") for _, path in hub.requests)


def test_hf_cache_dir_serves_reruns_offline(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    spec = {"kind": "hf", "repo_id": "org/tiny-vl", "revision": REV}
    fetch_source(spec, tmp_path / "run1", cache_dir=tmp_path / "cache")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hub.requests)
    dest = fetch_source(spec, tmp_path / "run2", cache_dir=tmp_path / "cache")
    assert len(hub.requests) == n and (dest / "README.md").read_bytes() == b"card"
    with pytest.raises(RepicError, match=r"source 'other': cannot download .*HF_HUB_OFFLINE is set"):
        fetch_source({**spec, "repo_id": "org/other"}, tmp_path / "run3", name="other")


def test_hf_errors_name_the_source(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(RepicError, match=r"source 'm': revision: expected a 40-hex commit sha \(the pin\), got 'main'"):
        fetch_source({"kind": "hf", "repo_id": "org/tiny-vl", "revision": "main"}, tmp_path / "m", name="m")
    assert hub.requests == []  # refused before any request
    with pytest.raises(RepicError) as err:
        fetch_source({"kind": "hf", "repo_id": "org/missing", "revision": REV}, tmp_path / "m", name="m")
    assert str(err.value).startswith("source 'm': cannot download model org/missing@0123456789ab from http://127.0.0.1")
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []  # nothing to resume: no staging left
    with pytest.raises(RepicError, match=r"has no file matching allow_patterns=\['\*\.bin'\]"):
        fetch_source({"kind": "hf", "repo_id": "org/tiny-vl", "revision": REV, "allow_patterns": ["*.bin"]},
                     tmp_path / "m", name="m")


# ============================================================================= mirrors, git, record, Drive
COMMIT = "122ffa6cbcdf713e94b11ebad1e01580d07c9faf"


def _ls_tree(files: dict[str, bytes]) -> str:
    lines = []
    for path, data in files.items():
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lines.append(f"100644 blob {blob} {len(data):>7}\t{path}")
    return "\n".join(lines) + "\n"


def test_git_blob_id_is_gits(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"hello\n")
    assert git_blob_id(tmp_path / "a") == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object


def test_git_archive_lands_manifest_files_checked_by_blob_id(files: FileServer, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPIC_URL_MIRRORS", f"https://github.com={files.url}/gh")
    data = {"data/query_tot/q.json": b'{"a.jpg": ["<a>"]}', "data/database_tot/db/a.jpg": b"jpeg"}
    archive = {f"RePIC-{COMMIT}/{p}": b for p, b in {**data, "README.md": b"code", "data/extra.txt": b"x"}.items()}
    files.files[f"/gh/oyt9306/RePIC/archive/{COMMIT}.tar.gz"] = _targz(archive)
    manifest = tmp_path / "tree.txt"
    manifest.write_text(_ls_tree(data))
    spec = {"kind": "git", "repo": "oyt9306/RePIC", "commit": COMMIT, "subdir": "data", "manifest": str(manifest),
            "backoff_s": 0}
    dest = fetch_source(spec, tmp_path / "root" / "data", name="repic", progress=False)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "database_tot/db/a.jpg", "query_tot/q.json"]  # only what the manifest lists, nothing else of the repo
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["data"]  # archive and extraction gone
    # a file that differs from its pin: one line naming the file and both ids, nothing lands
    tampered = {**archive, f"RePIC-{COMMIT}/data/database_tot/db/a.jpg": b"JPEG"}
    files.files[f"/gh/oyt9306/RePIC/archive/{COMMIT}.tar.gz"] = _targz(tampered)
    with pytest.raises(RepicError) as err:
        fetch_source(spec, tmp_path / "root2" / "data", name="repic", progress=False)
    msg = str(err.value)
    blob, pinned = hashlib.sha1(b"blob 4\0JPEG").hexdigest(), hashlib.sha1(b"blob 4\0jpeg").hexdigest()
    assert msg.startswith("source 'repic': 1 of 2 files of oyt9306/RePIC@122ffa6cbcdf do not match")
    assert f"data/database_tot/db/a.jpg (expected blob {pinned}, got {blob})" in msg
    assert "\n" not in msg and list((tmp_path / "root2").iterdir()) == []


def test_git_lfs_files_come_from_the_media_host_checked_by_sha256(files: FileServer, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPIC_URL_MIRRORS", f"https://media.githubusercontent.com={files.url}/media")
    repo = "WisconsinAIVision/YoLLaVA"
    files.files[f"/media/media/{repo}/{COMMIT}/yollava-data/test/bo/0.png"] = b"png0"
    files.files[f"/media/media/{repo}/{COMMIT}/yollava-data/test/bo/1.png"] = b"png1"
    manifest = tmp_path / "lfs.tsv"
    manifest.write_text("repic_path\tyollava_repo_path\tlfs_sha256\tsize\n" + "".join(
        f"./data/yollava-data/bo/{i}.png\tyollava-data/test/bo/{i}.png\t{sha(f'png{i}'.encode())}\t4\n"
        for i in range(2)))
    spec = {"kind": "git", "repo": repo, "commit": COMMIT, "subdir": "yollava-data/test", "lfs": True,
            "manifest": str(manifest), "backoff_s": 0}
    dest = fetch_source(spec, tmp_path / "yollava-data", name="yollava", progress=False)
    assert (dest / "bo" / "1.png").read_bytes() == b"png1"
    files.files[f"/media/media/{repo}/{COMMIT}/yollava-data/test/bo/1.png"] = b"other"
    with pytest.raises(RepicError, match=rf"sha256 mismatch .*expected {sha(b'png1')}, got {sha(b'other')}"):
        fetch_source(spec, tmp_path / "again", name="yollava", progress=False)
    assert not (tmp_path / "again").exists()


def test_record_on_first_download_then_match_or_stop(files: FileServer, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    files.files["/train.json"] = b"[1]"
    lock = tmp_path / "paper.lock.json"
    sources = {"train_json": {"kind": "url", "url": files.url + "/train.json", "record": True,
                              "dest": "data/train.json", "backoff_s": 0}}
    outs = {"data": tmp_path / "d1", "model": tmp_path / "m"}
    fetch_sources(sources, outs, lock=lock, progress=False)
    out = capsys.readouterr().out
    assert out.strip() == (f"source 'train_json': recorded sha256 {sha(b'[1]')} in {lock} "
                           "(first download; later fetches must match)")
    recorded = json.loads(lock.read_text())["sources"]
    assert recorded == {"train_json": {"kind": "url", "url": files.url + "/train.json", "sha256": sha(b"[1]")}}
    # same content: fetched against the recorded value, silently
    fetch_sources(sources, {**outs, "data": tmp_path / "d2"}, lock=lock, progress=False)
    assert capsys.readouterr().out == "" and (tmp_path / "d2" / "train.json").read_bytes() == b"[1]"
    # the server now sends something else: stop, naming both values, lock untouched
    files.files["/train.json"] = b"[2]"
    with pytest.raises(RepicError) as err:
        fetch_sources(sources, {**outs, "data": tmp_path / "d3"}, lock=lock, progress=False)
    assert f"expected {sha(b'[1]')}, got {sha(b'[2]')}" in str(err.value) and "--re-record train_json" in str(err.value)
    assert json.loads(lock.read_text())["sources"]["train_json"]["sha256"] == sha(b"[1]")
    # deliberate re-recording
    fetch_sources(sources, {**outs, "data": tmp_path / "d4"}, lock=lock, rerecord=["train_json"], progress=False)
    assert f"re-recorded sha256 {sha(b'[2]')} (was {sha(b'[1]')})" in capsys.readouterr().out
    assert json.loads(lock.read_text())["sources"]["train_json"]["sha256"] == sha(b"[2]")
    with pytest.raises(RepicError, match="needs fetch_data.lock"):
        fetch_sources(sources, {**outs, "data": tmp_path / "d5"}, progress=False)
    # a lock entry that lost its value (edited by hand, a merge): one line naming the file and the key
    broken = json.loads(lock.read_text())
    del broken["sources"]["train_json"]["sha256"]
    lock.write_text(json.dumps(broken))
    with pytest.raises(RepicError, match=rf"^{re.escape(str(lock))}: sources\.train_json\.sha256: expected 64 hex "
                       r"digits \(the recorded value\), got None; .* --re-record train_json$"):
        fetch_sources(sources, {**outs, "data": tmp_path / "d6"}, lock=lock, progress=False)
    with pytest.raises(RepicError, match=r"--re-record: no source named 'nope'"):
        fetch_sources(sources, outs, lock=lock, rerecord=["nope"], progress=False)


def test_record_hub_revision(hub: FakeHub, tmp_path: Path) -> None:
    lock = tmp_path / "lock.json"
    sources = {"rap": {"kind": "hf", "repo_id": "org/tiny-vl", "record": True, "dest": "data/rap",
                       "allow_patterns": ["*.json"]}}
    fetch_sources(sources, {"data": tmp_path / "d"}, lock=lock)
    assert json.loads(lock.read_text())["sources"]["rap"] == {
        "kind": "hf", "repo_id": "org/tiny-vl", "repo_type": "model", "revision": REV}
    assert ("GET", "/api/models/org/tiny-vl/revision/main") in hub.requests
    n = len(hub.requests)
    fetch_sources(sources, {"data": tmp_path / "d2"}, lock=lock)  # at the recorded commit, no repo_info call
    assert not any("/revision/" in p for _, p in hub.requests[n:]) and (tmp_path / "d2/rap/config.json").is_file()


def test_drive_confirmation_page_is_answered(files: FileServer, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPIC_URL_MIRRORS", f"https://drive.usercontent.google.com={files.url}")
    files.drive.add("1d33cP7VWxS")
    files.files["/drive/1d33cP7VWxS"] = PAYLOAD
    spec = {"kind": "url", "url": "https://drive.google.com/file/d/1d33cP7VWxS/view?usp=sharing",
            "sha256": sha(PAYLOAD), "filename": "lora.zip", "backoff_s": 0, "retries": 0}
    out = fetch_source(spec, tmp_path / "lora.zip", name="lora", progress=False)
    assert out.read_bytes() == PAYLOAD
    assert [p for _, p, _ in files.requests] == ["/download", "/download"]  # the page, then its form's URL
    assert leftovers(tmp_path) == []


def test_subdir_must_stay_inside_the_archive(files: FileServer, tmp_path: Path) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(SOURCE_SCHEMA)
    base = {"kind": "url", "url": "https://x/a.zip", "sha256": "b" * 64, "extract": True, "dest": "data"}
    for bad in ("/abs/dir", "../../x", "a/../../b", "..", "C:/x"):
        assert [e.validator for e in validator.iter_errors({**base, "subdir": bad})] == ["pattern"], bad
    assert list(validator.iter_errors({**base, "subdir": "RePIC-abc/data"})) == []
    # past the schema (a direct call): refused before anything is touched; an outside folder is never moved
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    files.files["/a.zip"] = _zip({"x/1.jpg": b"1"})
    for bad in (str(outside), "../precious", "x/../../precious"):
        with pytest.raises(RepicError, match="subdir"):
            fetch_source(url_spec(files, "/a.zip", extract=True, subdir=bad), tmp_path / "out" / "d", progress=False)
    assert (outside / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()  # refused before any request


def _tar_with(members: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info in members:
            tf.addfile(info, io.BytesIO(data[info.name]) if info.name in data else None)
    return buf.getvalue()


def test_hostile_archives_are_one_line_errors_and_leave_nothing(files: FileServer, tmp_path: Path) -> None:
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    link = tarfile.TarInfo("top/evil")
    link.type, link.linkname = tarfile.SYMTYPE, str(outside)
    through = tarfile.TarInfo("top/evil/keep.txt")
    through.size = 4
    hard = tarfile.TarInfo("top/hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "../../precious/keep.txt"
    cases = {
        "/dirlink.tar.gz": _tar_with([link, through], {"top/evil/keep.txt": b"EVIL"}),   # write through a link
        "/hardlink.tar.gz": _tar_with([hard], {}),                                     # link to outside file
    }
    for path, body in cases.items():
        files.files[path] = body
        dest = tmp_path / "out" / path.strip("/").split(".")[0]
        with pytest.raises(RepicError) as err:
            fetch_source(url_spec(files, path, extract=True), dest, name="q", progress=False)
        assert str(err.value).startswith("source 'q': ") and "refused" in str(err.value)
        assert "\n" not in str(err.value)
        assert list((tmp_path / "out").iterdir()) == []  # no archive, no extraction, no dest
    assert (outside / "keep.txt").read_text() == "mine"
    # a symlink inside the tree pointing out is refused when copying (zip/tar both end up here)
    raw = tmp_path / "arch"
    (raw / "top").mkdir(parents=True)
    (raw / "top" / "out").symlink_to(outside / "keep.txt")
    tar = tmp_path / "sym.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(raw / "top", arcname="top")
    with pytest.raises(RepicError, match="refused"):
        extract_archive(tar, tmp_path / "x", label="q")
    assert not (tmp_path / "x").exists()


def test_expect_list_locates_the_zip_folder_and_checks_every_file(files: FileServer, tmp_path: Path) -> None:
    expect = tmp_path / "two_concept_expected_files.txt"
    expect.write_text("./data/query-image-2-concepts/A_and_B/A_and_B_1.jpg\n"
                      "./data/query-image-2-concepts/A_and_B/A_and_B_2.jpg\n")
    files.files["/2c.zip"] = _zip({"query-image-2-concepts/A_and_B/A_and_B_1.jpg": b"1",
                                   "query-image-2-concepts/A_and_B/A_and_B_2.jpg": b"2"})
    sources = {"two": url_spec(files, "/2c.zip", extract=True, expect=str(expect),
                               dest="data/data/query-image-2-concepts")}
    fetch_sources(sources, {"data": tmp_path / "root"}, progress=False)
    assert (tmp_path / "root/data/query-image-2-concepts/A_and_B/A_and_B_2.jpg").read_bytes() == b"2"
    files.files["/2c.zip"] = _zip({"A_and_B/A_and_B_1.jpg": b"1"})
    sources = {"two": url_spec(files, "/2c.zip", extract=True, expect=str(expect),
                               dest="data/data/query-image-2-concepts")}
    with pytest.raises(RepicError, match=r"1 of the 2 files listed in .* are missing from .*A_and_B_2.jpg"):
        fetch_sources(sources, {"data": tmp_path / "root2"}, progress=False)


def test_record_refuses_a_body_of_unknown_length(files: FileServer, tmp_path: Path) -> None:
    """No Content-Length: the body ends when the connection closes, as a cut one does. A first download recorded
    from such a server could be half a file, pinned for good: refused, nothing placed, nothing recorded. A
    pinned source from the same server is fine (its sha256 decides)."""
    files.files["/model.bin"] = PAYLOAD
    files.no_length.add("/model.bin")
    files.drop_after["/model.bin"] = 300_000
    lock = tmp_path / "paper.lock.json"
    sources = {"weights": {"kind": "url", "url": files.url + "/model.bin", "record": True, "dest": "data/model.bin",
                           "backoff_s": 0}}
    with pytest.raises(RepicError, match=r"^source 'weights': .*/model\.bin sent no Content-Length and no chunked "
                       r"body, .* nothing recorded"):
        fetch_sources(sources, {"data": tmp_path / "d"}, lock=lock, progress=False)
    assert not lock.exists() and not (tmp_path / "d" / "model.bin").exists()
    files.drop_after.clear()
    pinned = {**sources["weights"], "sha256": sha(PAYLOAD)}
    pinned.pop("record")
    fetch_sources({"weights": pinned}, {"data": tmp_path / "d"}, progress=False)
    assert (tmp_path / "d" / "model.bin").read_bytes() == PAYLOAD


def _paper_fetch_params(sources: dict[str, Any], tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The paper config's fetch_data section and data paths (configs/paper.yaml over params.yaml), its sources
    replaced by `sources`: every default of the paper run, the download cache's included."""
    import yaml

    from repic.core.params import deep_merge

    from .conftest import REPO

    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                        yaml.safe_load((REPO / "configs/paper.yaml").read_text()))
    # no evaluation dataset: validation has nothing to read (the sources here are model files)
    return ({**params["fetch_data"], "sources": sources, "lock": str(tmp_path / "paper.lock.json")},
            {**params["base"]["data"], "datasets": []})


def test_paper_config_resumes_a_cut_download_in_the_next_run(files: FileServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs of fetch_data with the paper config's defaults: the first fails (the server cuts the body, the
    retries are spent) after another source was fetched whole; the second resumes the cut file from where it
    stopped (HTTP Range) and asks nothing for the finished source. Without a cache the partial file lived in
    the stage's temporary output folder and went with it."""
    from repic.data.fetch import fetch_real

    monkeypatch.chdir(tmp_path)
    files.files["/a_done.bin"] = PAYLOAD[::-1]
    files.files["/b_cut.bin"] = PAYLOAD
    files.drop_after["/b_cut.bin"] = 300_000
    sources = {"a_done": {**url_spec(files, "/a_done.bin", retries=0), "dest": "model/a.bin"},
               "b_cut": {**url_spec(files, "/b_cut.bin", retries=0), "dest": "model/b.bin"}}
    cfg, data = _paper_fetch_params(sources, tmp_path)
    assert cfg["cache"] == ".cache/repic"
    with pytest.raises(RepicError, match=r"300000 bytes kept in \.cache/repic/url/.*/b_cut\.bin\.part: run again"):
        fetch_real("data/repic", "data/models/base", cfg, data, seed=0)
    assert not Path("data/models/base").exists()
    fetch_real("data/repic", "data/models/base", cfg, data, seed=0)
    assert Path("data/models/base/b.bin").read_bytes() == PAYLOAD
    assert Path("data/models/base/a.bin").read_bytes() == PAYLOAD[::-1]
    assert files.ranges("/b_cut.bin") == [None, "bytes=300000-"] and files.ranges("/a_done.bin") == [None]


def test_without_a_cache_the_interruption_message_does_not_promise_a_resume(files: FileServer,
                                                                           tmp_path: Path) -> None:
    from repic.data.fetch import fetch_real

    files.files["/b_cut.bin"] = PAYLOAD
    files.drop_after["/b_cut.bin"] = 300_000
    cfg, data = _paper_fetch_params({"b": {**url_spec(files, "/b_cut.bin", retries=0), "dest": "model/b.bin"}},
                                    tmp_path)
    with pytest.raises(RepicError, match=r"300000 bytes received, lost with the stage's temporary output: set "
                       r"fetch_data\.cache"):
        fetch_real(tmp_path / "d", tmp_path / "m", {**cfg, "cache": None}, data, seed=0)
