"""The openai backend against a real chat-completions server on loopback: retries, malformed replies, cache."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from repic.core.io import RepicError
from repic.eval.judge import AnswerCache, judge_pairs, openai_judge, win_rates

KEY = "sk-test-secret-123"


class ChatServer:
    """Serves POST /v1/chat/completions; `script` is a list of (status, body) consumed in order, then `default`.
    A status "drop" closes the connection without replying."""

    def __init__(self) -> None:
        self.script: list[tuple[int, object]] = []
        self.requests: list[dict] = []
        self.answer = lambda body: "A"
        self.default: tuple[object, object] = (200, None)  # once the script is used up
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, payload = server.script.pop(0) if server.script else server.default
                if status == "drop":  # the connection is closed with no reply at all
                    return
                if payload is None:
                    payload = {"id": "x", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": server.answer(body)},
                         "finish_reason": "stop"}]}
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    srv = ChatServer()
    yield srv
    srv.httpd.shutdown()


def _judge(server, **kw):
    return openai_judge(server.url, "gpt-4o", "TEST_JUDGE_KEY", max_new_tokens=4, backoff_s=0.0, **kw)


def _messages():
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which? A, B or tie"}]}]


def test_request_is_a_chat_completion_with_image_and_bearer_key(server):
    _, ask = _judge(server)
    assert ask(_messages(), [Image.new("RGB", (4, 4), "red")]) == "A"
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {KEY}"
    content = req["body"]["messages"][0]["content"]
    assert content[0]["type"] == "image_url" and content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert req["body"]["model"] == "gpt-4o" and req["body"]["temperature"] == 0


def test_429_and_500_are_retried(server):
    server.script = [(429, {"error": "rate"}), (500, {"error": "boom"}), (503, "oops"), (200, None)]
    _, ask = _judge(server)
    assert ask(_messages(), [Image.new("RGB", (4, 4))]) == "A"
    assert len(server.requests) == 4


def test_malformed_reply_retried_then_reported(server):
    server.script = [(200, "not json"), (200, {"choices": []}), (200, {"nope": 1})]
    _, ask = _judge(server, max_retries=2)
    with pytest.raises(RepicError, match="malformed chat-completions reply after 3 attempts") as err:
        ask(_messages(), [Image.new("RGB", (4, 4))])
    assert KEY not in str(err.value)


def test_client_error_is_not_retried(server):
    server.script = [(401, {"error": "bad key"})]
    _, ask = _judge(server)
    with pytest.raises(RepicError, match="HTTP 401"):
        ask(_messages(), [Image.new("RGB", (4, 4))])
    assert len(server.requests) == 1


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(RepicError, match="environment variable NO_SUCH_KEY is not set"):
        openai_judge("http://127.0.0.1:9", "m", "NO_SUCH_KEY", max_new_tokens=4)


def _pair(i):
    return {"setting": "single", "dataset": "d", "mode": "skip", "query_image": f"q{i}.png", "gt_keys": ["<a>"],
            "reference": "trained", "model": "base", "references": [{"name": "<a>", "info": "red"}],
            "images": [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), (i, 0, 0))],
            "caption_reference": f"<a> is here {i}", "caption_model": f"a thing {i}"}


def test_pairs_both_orders_cache_and_budget(server, tmp_path):
    def answer(body):  # a fair judge: prefers the caption naming <a>, in whichever position; garbage for pair 3
        text = body["messages"][0]["content"][-1]["text"]
        if "3" in text.split("Caption A: ")[1].split("\n")[0]:
            return "I cannot decide."
        return "A" if "<a>" in text.split("Caption A: ")[1].split("\n")[0] else "B"

    server.answer = answer
    backend_id, ask = _judge(server)
    pairs = [_pair(i) for i in range(4)]
    cache = AnswerCache(tmp_path / "cache.jsonl")
    records = judge_pairs(pairs, backend_id, ask, cache, max_requests=6)
    assert len(records) == 3 and len(server.requests) == 6  # the budget stops before pair 3
    assert [r["outcome"] for r in records] == ["reference"] * 3
    again = AnswerCache(tmp_path / "cache.jsonl")
    records = judge_pairs(pairs, backend_id, ask, again, max_requests=6)
    assert len(server.requests) == 8 and again.asked == 2  # only pair 3 is new; cached answers bill nothing
    assert records[3]["outcome"] == "tie" and records[3]["verdict_reference_first"] == "invalid"
    rates = win_rates(records)
    assert rates["reference_win_rate"] == 0.75 and rates["pairs_with_invalid_answer"] == 1
    lo, hi = rates["reference_win_rate_ci95"]
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0


def test_dropped_connection_is_retried(server):
    server.script = [("drop", None), ("drop", None), (200, None)]
    _, ask = _judge(server)
    assert ask(_messages(), [Image.new("RGB", (4, 4))]) == "A"
    assert len(server.requests) == 3


def test_dropped_connections_past_the_retries_are_one_error(server):
    server.default = ("drop", None)
    _, ask = _judge(server, max_retries=1)
    with pytest.raises(RepicError, match=r"connection failed \(RemoteProtocolError: .*\) after 2 attempts"):
        ask(_messages(), [Image.new("RGB", (4, 4))])


def test_answers_paid_before_a_run_of_500s_are_kept(server, tmp_path):
    """3 good answers, then only 500s: the run fails, yet cache.jsonl holds the 3 answers and the rerun sends
    only the 3 missing requests."""
    server.script = [(200, None)] * 3
    server.default = (500, {"error": "down"})
    backend_id, ask = _judge(server, max_retries=2)
    pairs = [_pair(i) for i in range(3)]  # 6 requests
    with pytest.raises(RepicError, match="HTTP 500 after 3 attempts"):
        judge_pairs(pairs, backend_id, ask, AnswerCache(tmp_path / "cache.jsonl"))
    assert len(server.requests) == 3 + 3
    lines = (tmp_path / "cache.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["answer"] == "A" for line in lines)

    server.default = (200, None)
    sent_before = len(server.requests)
    again = AnswerCache(tmp_path / "cache.jsonl")
    records = judge_pairs(pairs, backend_id, ask, again)
    assert len(records) == 3 and again.asked == 3 and len(server.requests) - sent_before == 3
    assert len(AnswerCache(tmp_path / "cache.jsonl").answers) == 6


def test_refused_connection_is_retried_then_one_error(monkeypatch):
    import socket

    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, ask = openai_judge(f"http://127.0.0.1:{port}/v1", "m", "TEST_JUDGE_KEY", max_new_tokens=4, backoff_s=0.0,
                          max_retries=2)
    with pytest.raises(RepicError, match=r"/v1/chat/completions: connection failed \(ConnectError: .*\) after 3 "):
        ask(_messages(), [Image.new("RGB", (4, 4))])


def test_content_parts_reply_is_read_and_a_malformed_one_never_cached(server, tmp_path):
    """Some OpenAI-compatible servers send `content` as a list of parts: read (text parts joined). A `content`
    that is neither (a number, a list of non-text parts) is retried, then one line, and cache.jsonl stays valid:
    the next run neither fails on it nor reuses it."""
    parts = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": [{"type": "text", "text": "B"}, {"type": "text", "text": " (clearer)"}]}}]}
    server.script = [(200, parts)]
    _, ask = _judge(server)
    assert ask(_messages(), [Image.new("RGB", (4, 4))]) == "B (clearer)"

    bad = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": 42}}]}
    server.default = (200, bad)
    backend_id, ask = _judge(server, max_retries=1)
    cache = tmp_path / "cache.jsonl"
    with pytest.raises(RepicError, match=r"malformed chat-completions reply \(message content '42': expected a "
                       r"string or a list of text parts\) after 2 attempts$"):
        judge_pairs([_pair(0)], backend_id, ask, AnswerCache(cache))
    assert not cache.exists() or cache.read_text() == ""
    server.default = (200, None)
    records = judge_pairs([_pair(0)], backend_id, ask, AnswerCache(cache))
    assert len(records) == 1 and len(AnswerCache(cache).answers) == 2


def test_an_answer_that_is_not_text_is_never_cached(tmp_path):
    cache = AnswerCache(tmp_path / "cache.jsonl")
    with pytest.raises(RepicError, match=r"cache\.jsonl: the judge's answer is a int, expected text"):
        cache.get_or_ask("k", lambda: 42)
    assert not (tmp_path / "cache.jsonl").exists() and AnswerCache(tmp_path / "cache.jsonl").answers == {}
