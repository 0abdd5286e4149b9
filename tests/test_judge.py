import pytest
from PIL import Image

from repic.judge import AnswerCache, judge_pairs, parse_verdict, win_rates


@pytest.mark.parametrize("answer, verdict", [
    ("A", "A"), ("b.", "B"), ("Tie", "tie"), ("Caption B is better", "B"), ("I like neither", "invalid"),
    ("", "invalid"), ("ABBA", "invalid"),
])
def test_parse_verdict(answer, verdict):
    assert parse_verdict(answer) == verdict


def _pair(i, trained, base):
    return {"setting": "single", "mode": "skip", "query_image": f"q{i}.png", "gt_keys": ["<a>"],
            "references": [{"name": "<a>", "info": "red"}],
            "images": [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), (i, 0, 0))],
            "caption_trained": trained, "caption_base": base}


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
    assert [r["outcome"] for r in records] == ["trained", "base", "tie"]  # position bias -> tie
    assert len(asked) == 6 and cache.asked == 6
    cache.save()
    again = AnswerCache(tmp_path / "cache.jsonl")
    assert judge_pairs(pairs, "fake", judge, again) == records
    assert again.asked == 0 and len(asked) == 6  # a rerun asks nothing
    rates = win_rates(records)
    assert rates["trained_win_rate"] == pytest.approx(1 / 3) and rates["tie_rate"] == pytest.approx(1 / 3)
