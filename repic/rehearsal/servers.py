"""Loopback servers that answer for the paper run's real hosts (`make paper-rehearsal`).

- `HubServer`: the Hugging Face hub routes that `huggingface_hub` (2.4) takes for `repo_info`, `snapshot_download`
  and `hf_hub_download`: ``/api/{models|datasets}/{id}[/revision/{rev}]``, ``/api/.../tree/{rev}``,
  ``HEAD|GET /[datasets/]{id}/resolve/{rev}/{path}``. Each repo has one commit; its sha is what a pinned revision
  names, and ``main`` resolves to it. Point the client at it with ``HF_ENDPOINT``.
- `FileServer`: static files under ``/<host>/<path>`` (e.g. ``/github.com/o/r/archive/<sha>.tar.gz``), HTTP Range,
  and Google Drive's large-file flow: ``/drive.usercontent.google.com/download?id=X`` answers first with the
  "can't scan this file for viruses" page, whose form (confirm + uuid) gets the file.
- `ChatServer`: an OpenAI-compatible ``POST .../v1/chat/completions`` that checks the bearer key and answers
  "A", "B" or "tie" deterministically from the request.

`mirrors(...)` gives the ``REPIC_URL_MIRRORS`` value mapping the real hosts to these servers.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

DRIVE_HOST = "drive.usercontent.google.com"
HOSTS = ("github.com", "media.githubusercontent.com", DRIVE_HOST)
UUID = "rehearsal-0f3c"


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread; `url` is its base URL; `requests` logs (method, path)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, body: bytes | Path, headers: dict[str, str] | None = None,
                      send_body: bool = True, start: int = 0) -> None:
                data = body.read_bytes() if isinstance(body, Path) else body
                data = data[start:]
                self.send_response(status)
                for key, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                if send_body:
                    self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(("GET", self.path))
                server.route(self, "GET")

            def do_HEAD(self) -> None:  # noqa: N802
                server.requests.append(("HEAD", self.path))
                server.route(self, "HEAD")

            def do_POST(self) -> None:  # noqa: N802
                server.requests.append(("POST", self.path))
                server.route(self, "POST")

        return Handler

    def route(self, handler: Any, method: str) -> None:  # pragma: no cover - overridden
        handler.reply(404, b"")


class HubServer(_Server):
    """`repos[(repo_type, repo_id)] = (commit sha, {path: bytes | Path})`."""

    _INFO = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+?)(?:/revision/([^/]+))?$")
    _TREE = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)/tree/([^/]+)(/.*)?$")
    _RESOLVE = re.compile(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")

    def __init__(self, repos: dict[tuple[str, str], tuple[str, dict[str, bytes | Path]]]) -> None:
        self.repos = repos
        super().__init__()

    def _repo(self, kind: str, repo_id: str, rev: str | None) -> tuple[str, dict[str, bytes | Path]] | None:
        repo = self.repos.get((kind, repo_id))
        if repo is None or rev not in (None, "main", repo[0]):
            return None
        return repo

    def route(self, handler: Any, method: str) -> None:
        path = unquote(urlsplit(handler.path).path)
        send = method == "GET"
        js = {"Content-Type": "application/json"}
        if m := self._TREE.match(path):
            repo = self._repo(m.group(1)[:-1], m.group(2), m.group(3))
            if repo is not None:
                listing = [{"type": "file", "path": p, "size": _size(b), "oid": _git_oid(b)}
                           for p, b in sorted(repo[1].items())]
                handler.reply(200, json.dumps(listing).encode(), js, send)
                return
        elif m := self._INFO.match(path):
            repo = self._repo(m.group(1)[:-1], m.group(2), m.group(3))
            if repo is not None:
                info = {"id": m.group(2), "sha": repo[0], "private": False,
                        "siblings": [{"rfilename": p} for p in sorted(repo[1])]}
                handler.reply(200, json.dumps(info).encode(), js, send)
                return
        elif m := self._RESOLVE.match(path):
            repo = self._repo("dataset" if m.group(1) else "model", m.group(2), m.group(3))
            if repo is not None and m.group(4) in repo[1]:
                body = repo[1][m.group(4)]
                headers = {"X-Repo-Commit": repo[0], "ETag": f'"{_git_oid(body)}"',
                           "Content-Type": "application/octet-stream"}
                handler.reply(200, body, headers, send)
                return
        handler.reply(404, b'{"error": "Repository Not Found"}',
                      {**js, "X-Error-Code": "RepoNotFound", "X-Error-Message": "not found"}, send)


class FileServer(_Server):
    """`files["/<host>/<path>"] = bytes | Path`; `drive[file_id] = bytes | Path` (behind the confirmation page)."""

    def __init__(self, files: dict[str, bytes | Path], drive: dict[str, bytes | Path]) -> None:
        self.files, self.drive = files, drive
        super().__init__()

    def route(self, handler: Any, method: str) -> None:
        parts = urlsplit(handler.path)
        path, query = unquote(parts.path), dict(parse_qsl(parts.query))
        if path == f"/{DRIVE_HOST}/download" and query.get("id") in self.drive:
            if query.get("uuid") != UUID:
                page = (
                    "<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
                    "<p>Google Drive can't scan this file for viruses.</p>"
                    f'<form id="download-form" action="https://{DRIVE_HOST}/download" method="get">'
                    '<input type="submit" id="uc-download-link" value="Download anyway"/>'
                    f'<input type="hidden" name="id" value="{query["id"]}">'
                    '<input type="hidden" name="export" value="download">'
                    '<input type="hidden" name="confirm" value="t">'
                    f'<input type="hidden" name="uuid" value="{UUID}"></form></body></html>').encode()
                handler.reply(200, page, {"Content-Type": "text/html; charset=utf-8"}, method == "GET")
                return
            body: bytes | Path | None = self.drive[query["id"]]
        else:
            body = self.files.get(path)
        if body is None:
            handler.reply(404, b"Not Found", {"Content-Type": "text/plain"}, method == "GET")
            return
        size = _size(body)
        match = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        if start >= size > 0:
            handler.reply(416, b"", {"Content-Range": f"bytes */{size}"}, method == "GET")
            return
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        handler.reply(206 if start else 200, body, headers, method == "GET", start=start)


class ChatServer(_Server):
    """OpenAI-compatible chat completions; `key` is the bearer key it expects; `answers` counts the replies."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.answers = 0
        super().__init__()

    def route(self, handler: Any, method: str) -> None:
        js = {"Content-Type": "application/json"}
        if method != "POST" or not urlsplit(handler.path).path.endswith("/v1/chat/completions"):
            handler.reply(404, b'{"error": "not found"}', js)
            return
        raw = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        if handler.headers.get("Authorization") != f"Bearer {self.key}":
            handler.reply(401, b'{"error": {"message": "invalid api key"}}', js)
            return
        try:
            body = json.loads(raw)
            # content is a list of parts, or a plain string (RePIC's judge request sends its system prompt so)
            n_images = sum(1 for m in body["messages"] if isinstance(m["content"], list) for b in m["content"]
                           if b.get("type") == "image_url")
        except (ValueError, KeyError, TypeError):
            handler.reply(400, b'{"error": {"message": "malformed request"}}', js)
            return
        answer = ("A", "B", "tie")[int(hashlib.sha256(raw).hexdigest(), 16) % 3]
        self.answers += 1
        reply = {"id": f"rehearsal-{self.answers}", "object": "chat.completion", "model": body.get("model"),
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": answer}}],
                 "usage": {"prompt_tokens": n_images, "completion_tokens": 1}}
        handler.reply(200, json.dumps(reply).encode(), js)


def mirrors(files: FileServer, chat: ChatServer) -> str:
    """The ``REPIC_URL_MIRRORS`` value sending the real hosts (and OpenAI's API) to the loopback servers."""
    pairs = [f"https://{host}={files.url}/{host}" for host in HOSTS]
    pairs.append(f"https://api.openai.com={chat.url}/api.openai.com")
    return " ".join(pairs)


def _size(body: bytes | Path) -> int:
    return body.stat().st_size if isinstance(body, Path) else len(body)


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 (git's object id)


def _git_oid(body: bytes | Path) -> str:
    return blob_id(body.read_bytes() if isinstance(body, Path) else body)
