import json

import pytest

from stages.score import main


def test_score_cli_prints_json_for_one_repic_file(tmp_path, capsys):
    rows = [
        ["./q1.png", ["<anya>"], "<anya> plays with a ball.</s>", "q"],
        ["./q2.png", ["<bond>"], "Anya's dog <anya> runs.", "q"],
        ["./q3.png", ["<bond>"], "A dog runs.", "q"],
    ]
    path = tmp_path / "caps.json"
    path.write_text(json.dumps(rows))
    assert main(["--captions", str(path), "--setting", "single", "--protocol", "repic"]) is None
    out = json.loads(capsys.readouterr().out)
    # slot 1 correct; slot 2 predicts <anya> (pool key not in its gt) -> MISS; slot 3 no prediction
    assert (out["precision"], out["n_slots"]) == (50.0, 3)
    assert out["recall"] == pytest.approx(100 / 3, abs=1e-12)
    assert out["f1"] == pytest.approx(40.0, abs=1e-12)  # 2PR/(P+R) = 2*50*33.3/83.3


def test_score_cli_rejects_malformed_row(tmp_path):
    from repic.io import RepicError

    path = tmp_path / "bad.json"
    path.write_text(json.dumps([["./q.png", ["<a>"], "cap", "q"], ["./q.png"]]))
    with pytest.raises(RepicError, match="row 1"):
        main(["--captions", str(path), "--setting", "single"])
