"""Pairwise LLM judge: which of two captions of the same query is better, asked in both orders (or as RePIC asked).

Each model row is compared with one named reference row (params `judge_llm.reference`; RePIC compared every
baseline with its own model), query by query.

Protocol: the judge sees the reference concepts (image, name, info), the query image and captions A and B,
and answers 'A', 'B' or 'tie'. Each pair is asked twice with the positions swapped; a method wins a pair only
if it wins both orders, otherwise the pair is a tie. Answers are cached by a content hash of everything the
judge saw, so a rerun asks (and bills) nothing. Protocol `repic` (params judge_llm.protocol) sends RePIC's own
request instead (evaluation/GPT_eval_single.py, GPT_eval_multi.py: `repic_request`), once per pair, and reads one
letter: the paper's win rates are comparable under it only; `both_orders` is the corrected one to report beside it.
Backends: `local` (a `from_pretrained` Qwen2.5-VL) and `openai` (any OpenAI-compatible chat-completions endpoint;
the key comes from the environment only).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from repic.core.io import RepicError
from repic.core.layout import MODES, Layout, caption_file, caption_folder
from repic.core.prompts import judge_messages, repic_judge_messages

Judge = Callable[[list[dict[str, Any]], list[Image.Image]], str]
PROTOCOLS = ("both_orders", "repic")  # params judge_llm.protocol


def parse_letter(answer: str) -> str:
    """'A' | 'B' | 'invalid' from an answer to RePIC's request ("a single alphabet"): the first standalone capital
    A or B (a lowercase 'a' is the article, not an answer)."""
    m = re.search(r"\b(A|B)\b", answer.strip())
    return m.group(1) if m else "invalid"


def parse_verdict(answer: str) -> str:
    """'A' | 'B' | 'tie' | 'invalid' from the judge's free text (first standalone answer word wins)."""
    m = re.search(r"\b(tie|A|B)\b", answer.strip(), flags=re.IGNORECASE)
    if not m:
        return "invalid"
    word = m.group(1)
    return "tie" if word.lower() == "tie" else word.upper()


def content_hash(backend_id: str, messages: list[dict[str, Any]], images: list[Image.Image]) -> str:
    h = hashlib.sha256(backend_id.encode())
    h.update(json.dumps(messages, sort_keys=True).encode())
    for img in images:
        h.update(img.tobytes())
        h.update(repr(img.size).encode())
    return h.hexdigest()


class AnswerCache:
    """Append-only JSONL cache of judge answers keyed by content hash.

    Each new answer is appended and fsynced as it arrives, so a run that fails or is killed after N paid
    answers keeps those N and the rerun asks only the rest. A torn last line (a kill in the middle of a write)
    is dropped, and cut from the file, on load.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.answers: dict[str, str] = {}
        self.asked = 0
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        offset = 0
        lines = data.split(b"\n")
        for number, line in enumerate(lines, start=1):
            torn = number == len(lines)  # no newline after it: the write may have been cut
            if line.strip():
                try:
                    rec = json.loads(line)
                    if not (isinstance(rec, dict) and isinstance(rec.get("hash"), str)
                            and isinstance(rec.get("answer"), str)):
                        raise ValueError("not a cache record")
                except ValueError:
                    if not torn:
                        raise RepicError(f"{self.path}: line {number}: expected a JSON object "
                                         '{"hash": str, "answer": str}; remove the line (its answer is asked again)'
                                         ) from None
                    logging.getLogger(__name__).warning("%s: dropping a torn last line (%d bytes)",
                                                        self.path, len(line))
                    with open(self.path, "r+b") as f:
                        f.truncate(offset)
                        os.fsync(f.fileno())
                    return
                self.answers[rec["hash"]] = rec["answer"]
                if torn:  # complete record, newline lost: end the line so that the next append starts a new one
                    self._append(b"\n")
            offset += len(line) + 1

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def get_or_ask(self, key: str, ask: Callable[[], str]) -> str:
        if key not in self.answers:
            answer = ask()
            if not isinstance(answer, str):  # a cache line every later run would refuse: never written
                raise RepicError(f"{self.path}: the judge's answer is a {type(answer).__name__}, expected text "
                                 f"({str(answer)[:80]!r}); nothing cached")
            self._append((json.dumps({"hash": key, "answer": answer}) + "\n").encode())
            self.answers[key] = answer
            self.asked += 1
        return self.answers[key]


def local_judge(model_path: str, *, device: str, dtype: str, max_new_tokens: int) -> tuple[str, Judge]:
    from repic.vlm.generation import generate_captions
    from repic.vlm.models import load_model, load_processor

    processor = load_processor(model_path)
    model = load_model(model_path, device=device, dtype=dtype)

    def ask(messages: list[dict[str, Any]], images: list[Image.Image]) -> str:
        return generate_captions(model, processor, [(messages, images)], batch_size=1,
                                 max_new_tokens=max_new_tokens)[0]

    return local_backend_id(model_path), ask


def local_backend_id(model_path: str) -> str:
    """The local judge's part of the cache key: its weights' content (the tree hash of the model folder), not
    where they lie, so a moved or re-cloned project finds its answers; a hub id (no folder) stays as given."""
    from repic.data.sources import tree_sha256

    path = Path(model_path)
    return f"local:sha256:{tree_sha256(path)}" if path.is_dir() else f"local:{model_path}"


def _data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class _Transient(Exception):
    """A failed attempt worth repeating (429, 5xx, a failed or dropped connection, a malformed reply)."""

    def __init__(self, problem: str, retry_after: float = 0.0) -> None:
        super().__init__(problem)
        self.problem, self.retry_after = problem, retry_after


def openai_judge(base_url: str, model: str, api_key_env: str, *, max_new_tokens: int, max_retries: int = 5,
                 backoff_s: float = 1.0, timeout_s: float = 120.0) -> tuple[str, Judge]:
    """OpenAI-compatible chat completions over HTTP (GPT-4o, Gemini's compatible endpoint, a local server).

    The key is read from the environment variable `api_key_env` and never logged. 429 and 5xx answers and
    failed or dropped connections are retried with exponential backoff (honouring Retry-After); a reply that is
    not a chat completion is retried too, then reported as an error naming the endpoint. The client is httpx2
    (huggingface_hub's) with tenacity's retry loop.
    """
    import httpx2
    from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

    from repic.data.sources import mirror_url

    key = os.environ.get(api_key_env)
    if not key:
        raise RepicError(f"judge_llm.openai.api_key_env: environment variable {api_key_env} is not set")
    url = base_url.rstrip("/") + "/chat/completions"
    client = httpx2.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {key}"})

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after:
            return exc.retry_after
        return backoff_s * 2 ** (state.attempt_number - 1)

    def post(body: dict[str, Any]) -> str:
        try:
            # REPIC_URL_MIRRORS (repic.data.sources) may point the API at a mirror: `make paper-rehearsal`'s loopback
            resp = client.post(mirror_url(url), json=body)
        except httpx2.TransportError as exc:  # refused, timed out, or dropped before or during the reply
            raise _Transient(f"connection failed ({type(exc).__name__}: {exc})") from None
        if resp.status_code == 429 or resp.status_code >= 500:
            raise _Transient(f"HTTP {resp.status_code}", _retry_after(resp.headers.get("Retry-After")))
        if resp.status_code >= 400:
            raise RepicError(f"judge {url}: HTTP {resp.status_code} {resp.reason_phrase}")
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Transient("malformed chat-completions reply") from None
        text = reply_text(content)
        if text is None:
            raise _Transient(f"malformed chat-completions reply (message content {str(content)[:80]!r}: expected "
                             "a string or a list of text parts)")
        return text

    def ask(messages: list[dict[str, Any]], images: list[Image.Image]) -> str:
        it = iter(images)
        wire = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else [
            {"type": "image_url", "image_url": {"url": _data_url(next(it))}} if b["type"] == "image" else b
            for b in m["content"]]} for m in messages]
        body = {"model": model, "messages": wire, "max_tokens": max_new_tokens, "temperature": 0}
        retrying = Retrying(retry=retry_if_exception_type(_Transient), stop=stop_after_attempt(max_retries + 1),
                            wait=wait, reraise=True)
        try:
            return retrying(post, body)
        except _Transient as exc:
            raise RepicError(f"judge {url}: {exc.problem} after {max_retries + 1} attempts") from None

    return f"openai:{base_url}:{model}", ask


def reply_text(content: Any) -> str | None:
    """The text of a chat-completions message `content`: a string, null (no text: ""), or the list of content
    parts some OpenAI-compatible servers send (`[{"type": "text", "text": ...}, ...]`, text parts joined);
    None for anything else (malformed: never an answer, never cached)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") for p in content if p.get("type") in ("text", "output_text")]
        if texts and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    return None


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def repic_request(pair: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """RePIC's judge request for a pair (`repic.core.prompts.repic_judge_messages`): option A the compared row's
    caption (RePIC's baseline), B the reference row's (RePIC's model); images: the first two references' in a
    multi-concept setting, then the query's."""
    messages = repic_judge_messages(pair["setting"], pair["references"], pair["caption_model"],
                                    pair["caption_reference"])
    refs = [] if pair["setting"] == "single" else pair["images"][:2]
    return messages, [*refs, pair["images"][-1]]


def _judge_repic(pair: dict[str, Any], backend_id: str, ask: Judge, cache: AnswerCache) -> dict[str, Any]:
    messages, images = repic_request(pair)
    answer = cache.get_or_ask(content_hash(backend_id, messages, images), lambda: ask(messages, images))
    winner = {"A": "model", "B": "reference"}.get(parse_letter(answer), "invalid")
    return {"verdict_reference_first": None, "verdict_model_first": winner, "outcome": winner}


def judge_pairs(pairs: list[dict[str, Any]], backend_id: str, ask: Judge, cache: AnswerCache,
                max_requests: int | None = None, protocol: str = "both_orders") -> list[dict]:
    """Judge each pair. A pair: setting, references, images (refs + query), the `reference` and `model` row names
    and their captions `caption_reference`, `caption_model`. `both_orders`: asked in both orders (`judge_messages`),
    outcome reference|model|tie (a row wins only if it wins both orders). `repic`: RePIC's request once
    (`repic_request`: the compared row first as A, the reference row as B), outcome reference|model|invalid
    (`verdict_model_first` holds it). Cached answers cost nothing; once `max_requests` new requests were made, the
    remaining pairs are left out (the budget is bounded)."""
    from repic.core.progress import Progress

    if protocol not in PROTOCOLS:
        raise RepicError(f"judge_llm.protocol: expected {'|'.join(PROTOCOLS)}, got {protocol!r}")
    records = []
    bar = Progress(len(pairs), "judge", unit="pair")
    for pair in pairs:
        if protocol == "repic":
            messages, images = repic_request(pair)
            new = content_hash(backend_id, messages, images) not in cache.answers
            if max_requests is not None and cache.asked + new > max_requests:
                break
            records.append({**{k: pair[k] for k in ("setting", "dataset", "mode", "query_image", "reference",
                                                     "model")}, "gt_keys": pair["gt_keys"],
                            **_judge_repic(pair, backend_id, ask, cache)})
            bar.update()
            continue
        orders = {"reference_first": (pair["caption_reference"], pair["caption_model"]),
                  "model_first": (pair["caption_model"], pair["caption_reference"])}
        new = sum(content_hash(backend_id, judge_messages(pair["references"], a, b), pair["images"])
                  not in cache.answers for a, b in orders.values())
        if max_requests is not None and cache.asked + new > max_requests:
            break
        verdicts = []
        for order, (a, b) in orders.items():
            messages = judge_messages(pair["references"], a, b)
            key = content_hash(backend_id, messages, pair["images"])
            answer = cache.get_or_ask(key, lambda m=messages, imgs=pair["images"]: ask(m, imgs))
            verdict = parse_verdict(answer)
            # Map the positional verdict back to the row.
            winner = ({"A": "reference", "B": "model"} if order == "reference_first"
                      else {"A": "model", "B": "reference"})
            verdicts.append(winner.get(verdict, verdict))
        first, second = verdicts
        outcome = first if first == second and first in ("reference", "model") else "tie"
        records.append({**{k: pair[k] for k in ("setting", "dataset", "mode", "query_image", "reference", "model")},
                        "gt_keys": pair["gt_keys"], "verdict_reference_first": first,
                        "verdict_model_first": second, "outcome": outcome})
        bar.update()
    bar.close()
    return records


def bootstrap_ci(outcomes: list[str], target: str, *, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap confidence interval of the rate of `target` among `outcomes` (pairs resampled)."""
    import numpy as np

    if not outcomes:
        return None
    hits = np.array([o == target for o in outcomes], dtype=float)
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), size=(n_boot, len(hits)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def win_rates(records: list[dict[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """Win/tie rates of the reference row vs one model row, with a 95 % bootstrap interval for the reference's
    win rate (RePIC's figure: its model against each baseline)."""
    n = len(records)
    count = {o: sum(r["outcome"] == o for r in records) for o in ("reference", "model", "tie")}
    invalid = sum(r["verdict_reference_first"] == "invalid" or r["verdict_model_first"] == "invalid"
                  for r in records)  # protocol repic: one order, its verdict in verdict_model_first
    outcomes = [r["outcome"] for r in records]
    return {"n_pairs": n, "reference_win_rate": count["reference"] / n if n else None,
            "reference_win_rate_ci95": bootstrap_ci(outcomes, "reference", seed=seed),
            "model_win_rate": count["model"] / n if n else None, "tie_rate": count["tie"] / n if n else None,
            "pairs_with_invalid_answer": invalid}


def build_pairs(captions_dir: str | os.PathLike, layout: Layout, root: str | os.PathLike, max_pairs: int,
                reference: str, models: list[str]) -> list[dict[str, Any]]:
    """Pair the `reference` row's captions with each other row's of `models` for the same query, per model,
    setting, dataset and mode (first `max_pairs` each); `layout` is `{setting: [(dataset, its database)]}`
    (`repic.core.layout.layout_of`).

    The judge is shown the ground-truth concepts as references, whichever the captioner was shown.
    """
    from repic.core.io import open_rgb, read_json

    pairs = []
    for model in (m for m in models if m != reference):
        for setting, datasets in layout.items():
            for dataset, database in datasets:
                for mode in MODES:
                    ref_path = caption_folder(captions_dir, setting, reference, dataset) / caption_file(reference, mode)
                    path = caption_folder(captions_dir, setting, model, dataset) / caption_file(model, mode)
                    for r, m in list(zip(read_json(ref_path), read_json(path)))[:max_pairs]:
                        if r[0] != m[0] or r[1] != m[1]:
                            raise RepicError(f"{path}: not aligned with {ref_path} at query {r[0]!r} (same queries, "
                                             "same order expected)")
                        concepts = [database["concept_dict"][k] for k in r[1]]
                        pairs.append({
                            "setting": setting, "dataset": dataset, "mode": mode, "query_image": r[0],
                            "gt_keys": r[1], "reference": reference, "model": model,
                            "references": [{"name": k, "info": c["info"]} for k, c in zip(r[1], concepts)],
                            "images": [open_rgb(root, c["image"]) for c in concepts] + [open_rgb(root, r[0])],
                            "caption_reference": r[2], "caption_model": m[2],
                        })
    return pairs
