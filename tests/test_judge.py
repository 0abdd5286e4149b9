import pytest
from PIL import Image

from repic.eval.judge import AnswerCache, judge_pairs, parse_verdict, win_rates


@pytest.mark.parametrize("answer, verdict", [
    ("A", "A"), ("b.", "B"), ("Tie", "tie"), ("Caption B is better", "B"), ("I like neither", "invalid"),
    ("", "invalid"), ("ABBA", "invalid"),
])
def test_parse_verdict(answer, verdict):
    assert parse_verdict(answer) == verdict


def _pair(i, reference, model):
    return {"setting": "single", "dataset": "d", "mode": "skip", "query_image": f"q{i}.png", "gt_keys": ["<a>"],
            "reference": "trained", "model": "base", "references": [{"name": "<a>", "info": "red"}],
            "images": [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), (i, 0, 0))],
            "caption_reference": reference, "caption_model": model}


def test_both_orders_ties_and_cache(tmp_path):
    asked = []

    def judge(messages, images):
        text = messages[0]["content"][-1]["text"]
        asked.append(text)
        a = text.split("Caption A: ")[1].split("\n")[0]
        if "good" in a:
            return "A"
        return "B" if "good" in text.split("Caption B: ")[1] else "A"  # position bias when both are bad

    pairs = [_pair(1, "good <a>", "bad"), _pair(2, "bad", "good <a>"), _pair(3, "bad", "bad too")]
    cache = AnswerCache(tmp_path / "cache.jsonl")
    records = judge_pairs(pairs, "fake", judge, cache)
    assert [r["outcome"] for r in records] == ["reference", "model", "tie"]  # position bias -> tie
    assert {(r["reference"], r["model"]) for r in records} == {("trained", "base")}
    assert len(asked) == 6 and cache.asked == 6
    again = AnswerCache(tmp_path / "cache.jsonl")
    assert judge_pairs(pairs, "fake", judge, again) == records
    assert again.asked == 0 and len(asked) == 6  # a rerun asks nothing
    rates = win_rates(records)
    assert rates["reference_win_rate"] == pytest.approx(1 / 3) and rates["tie_rate"] == pytest.approx(1 / 3)
    assert rates["model_win_rate"] == pytest.approx(1 / 3)


def test_ctrl_c_keeps_the_answers_already_given(tmp_path):
    calls = []

    def judge(messages, images):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return "A"

    pairs = [_pair(i, "good", "bad") for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        judge_pairs(pairs, "fake", judge, AnswerCache(tmp_path / "cache.jsonl"))
    again = AnswerCache(tmp_path / "cache.jsonl")
    assert len(again.answers) == 3
    calls.clear()
    judge_pairs(pairs, "fake", lambda m, i: calls.append(1) or "A", again)
    assert len(calls) == 3 and again.asked == 3


def test_torn_last_line_is_dropped_and_the_file_stays_appendable(tmp_path):
    path = tmp_path / "cache.jsonl"
    pairs = [_pair(i, "good", "bad") for i in range(2)]
    judge_pairs(pairs, "fake", lambda m, i: "A", AnswerCache(path))
    whole = path.read_bytes()
    assert whole.count(b"\n") == 4
    path.write_bytes(whole + b'{"hash": "abc", "ans')  # a kill in the middle of the fifth write
    cache = AnswerCache(path)
    assert len(cache.answers) == 4 and path.read_bytes() == whole
    cache.get_or_ask("k5", lambda: "B")
    assert AnswerCache(path).answers["k5"] == "B" and len(AnswerCache(path).answers) == 5
    # a complete last record whose newline was cut is kept, and the next append starts a new line
    path.write_bytes(whole.rstrip(b"\n"))
    cache = AnswerCache(path)
    assert len(cache.answers) == 4
    cache.get_or_ask("k6", lambda: "tie")
    assert len(AnswerCache(path).answers) == 5


def test_corrupt_line_inside_the_cache_is_a_one_line_error(tmp_path):
    from repic.core.io import RepicError

    path = tmp_path / "cache.jsonl"
    path.write_text('{"hash": "a", "answer": "A"}\nnot json\n{"hash": "b", "answer": "B"}\n')
    with pytest.raises(RepicError, match=r"cache.jsonl: line 2: expected a JSON object"):
        AnswerCache(path)


def test_local_judge_cache_key_is_the_models_content_not_its_path(tmp_path, monkeypatch):
    """A moved project (or a second clone) finds the answers it paid for; other weights are asked again."""
    import shutil

    import repic.vlm.models as models
    from repic.eval.judge import local_judge

    monkeypatch.setattr(models, "load_processor", lambda path: None)
    monkeypatch.setattr(models, "load_model", lambda path, **kw: None)
    first = tmp_path / "a" / "judge"
    first.mkdir(parents=True)
    (first / "config.json").write_text("{}")
    (first / "model.safetensors").write_bytes(b"weights")
    moved = tmp_path / "b" / "judge"
    shutil.copytree(first, moved)
    kw = dict(device="cpu", dtype="float32", max_new_tokens=4)
    key = local_judge(str(first), **kw)[0]
    assert str(tmp_path) not in key
    assert local_judge(str(moved), **kw)[0] == key
    (moved / "model.safetensors").write_bytes(b"other weights")
    assert local_judge(str(moved), **kw)[0] != key
