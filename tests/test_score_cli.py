import json
import re

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
    from repic.core.io import RepicError

    path = tmp_path / "bad.json"
    path.write_text(json.dumps([["./q.png", ["<a>"], "cap", "q"], ["./q.png"]]))
    with pytest.raises(RepicError, match="row 1"):
        main(["--captions", str(path), "--setting", "single"])


def test_pipeline_mode_scores_each_dataset_with_its_own_database(tmp_path):
    """Three single-concept datasets (as MyVLM / Yo'LLaVA / DreamBooth) and one 2-concept one: metrics per
    dataset, Table 1 with one column group per dataset, the strict protocol using each dataset's display names."""
    import shutil

    import yaml

    from .conftest import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    datasets, expected = [], {}
    for i, name in enumerate(("myvlm", "yollava", "dreambooth")):
        key = f"<k{i}>"
        db = tmp_path / f"{name}.json"
        db.write_text(json.dumps({"concept_dict": {key: {"name": f"Kay{i}", "image": "./x.png", "info": "i",
                                                          "category": "toy"}}, "path_to_concept": {}}))
        datasets.append({"name": name, "database": str(db), "queries": {"single": str(tmp_path / "q.json")}})
        # i correct slots of 2 under repic; the display name counts too under strict
        caps = [f"{key} here." if j < i else f"Kay{i} here." for j in range(2)]
        for model in ("base", "trained"):
            for mode in ("skip", "retrieval"):
                folder = tmp_path / "captions/single" / model / name
                folder.mkdir(parents=True, exist_ok=True)
                rows = [[f"./q{j}.png", [key], caps[j] if model == "trained" else "Nothing.", "q"] for j in range(2)]
                (folder / f"{model}_{mode}.json").write_text(json.dumps(rows))
        expected[name] = 100.0 * i / 2
    db2 = tmp_path / "two.json"
    db2.write_text(json.dumps({"concept_dict": {}, "path_to_concept": {}}))
    datasets.append({"name": "2_concepts", "database": str(db2), "queries": {"multi2": str(tmp_path / "q2.json")}})
    for model in ("base", "trained"):
        for mode in ("skip", "retrieval"):
            (tmp_path / f"captions/multi2/{model}/2_concepts").mkdir(parents=True, exist_ok=True)
            (tmp_path / f"captions/multi2/{model}/2_concepts/{model}_{mode}.json").write_text(
                json.dumps([["./q.png", ["<a>", "<b>"], "<a> and <b>.", "q"]]))
    params["base"]["data"]["datasets"] = datasets
    params["models"] = {k: params["models"][k] for k in ("base", "trained")}  # the two rows captioned above
    # recall@k: from each retrieve stage's retrieval.json, once per setting and dataset
    for i, (setting, name) in enumerate([("single", "myvlm"), ("single", "yollava"), ("single", "dreambooth"),
                                         ("multi2", "2_concepts")]):
        (tmp_path / "retrieval" / setting / name).mkdir(parents=True)
        (tmp_path / "retrieval" / setting / name / "retrieval.json").write_text(json.dumps(
            {"setting": setting, "k": 2, "recall_at_k": i / 4, "n_queries": 2 + i, "per_query": []}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    main(["--params", str(tmp_path / "params.yaml"), "--captions", str(tmp_path / "captions"),
          "--retrieval", str(tmp_path / "retrieval"), "--out", str(tmp_path / "score"), "--tables",
          str(tmp_path / "tables")])
    metrics = json.loads((tmp_path / "score/metrics.json").read_text())
    strict = json.loads((tmp_path / "score/metrics_strict.json").read_text())
    assert set(metrics) == {"single", "multi2"} and list(metrics["single"]) == ["myvlm", "yollava", "dreambooth"]
    for name, recall in expected.items():
        assert metrics["single"][name]["retrieval"]["trained"]["recall"] == recall
        assert metrics["single"][name]["skip"]["base"]["recall"] == 0.0
        assert strict["single"][name]["skip"]["trained"]["recall"] == 100.0  # display names count under strict
    assert metrics["multi2"]["2_concepts"]["skip"]["trained"]["f1"] == 100.0
    assert json.loads((tmp_path / "score/recall.json").read_text()) == {
        "single": {"myvlm": {"k": 2, "recall_at_k": 0.0, "n_queries": 2},
                   "yollava": {"k": 2, "recall_at_k": 0.25, "n_queries": 3},
                   "dreambooth": {"k": 2, "recall_at_k": 0.5, "n_queries": 4}},
        "multi2": {"2_concepts": {"k": 2, "recall_at_k": 0.75, "n_queries": 5}}}
    table = (tmp_path / "score/table.md").read_text()
    assert table.endswith("| setting | k | recall@k | queries |\n|---|---:|---:|---:|\n| Single myvlm | 2 | 0.0 | 2 |\n"
                          "| Single yollava | 2 | 25.0 | 3 |\n| Single dreambooth | 2 | 50.0 | 4 |\n"
                          "| 2-concept 2_concepts | 2 | 75.0 | 5 |\n")
    table1 = (tmp_path / "tables/table1_single_repic.md").read_text().splitlines()
    assert "Single MyVLM skip-retrieval R" in table1[2] and "Single DreamBooth retrieval F1" in table1[2]
    assert table1[5].startswith("| trained | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | 100.0 | 50.0 | 66.7 |")
    from repic.core.io import RepicError

    # a file of another setting's arity (2 keys in a single-concept file): the error names the file
    bad = tmp_path / "captions/single/trained/yollava/trained_retrieval.json"
    good = bad.read_text()
    bad.write_text(json.dumps([["./q0.png", ["<k1>", "<k0>"], "x", "q"]]))
    with pytest.raises(RepicError, match=f"^{re.escape(str(bad))}: caption row 0: setting single expects 1 gt key"):
        main(["--params", str(tmp_path / "params.yaml"), "--captions", str(tmp_path / "captions"),
              "--retrieval", str(tmp_path / "retrieval"), "--out", str(tmp_path / "score"), "--tables",
          str(tmp_path / "tables")])
    bad.write_text(good)
    shutil.rmtree(tmp_path / "captions/single/base/yollava")

    with pytest.raises(RepicError, match="base/yollava/base_skip.json: caption file not found"):
        main(["--params", str(tmp_path / "params.yaml"), "--captions", str(tmp_path / "captions"),
              "--retrieval", str(tmp_path / "retrieval"), "--out", str(tmp_path / "score"), "--tables",
          str(tmp_path / "tables")])


def _run(argv, capsys):
    from repic.core.cli import run

    rc = run(main, argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_empty_caption_file_is_an_error_not_an_f1_of_zero(tmp_path, capsys):
    path = tmp_path / "caps.json"
    path.write_text("[]")
    rc, out, err = _run(["--captions", str(path), "--setting", "single", "--protocol", "strict"], capsys)
    assert (rc, out) == (2, "")
    assert err == f"error: {path}: no caption rows (an empty list), nothing to score\n"


def test_bad_utf8_byte_is_a_one_line_error_naming_the_file(tmp_path, capsys):
    path = tmp_path / "caps.json"
    path.write_bytes(b'[["./q.png", ["<anya>"], "<anya> caf\xe9", "q"]]')
    rc, out, err = _run(["--captions", str(path), "--setting", "single"], capsys)
    assert (rc, out) == (2, "")
    assert err == f"error: {path}: not UTF-8 text (byte 0xe9 at offset 36); JSON files must be UTF-8\n"


def test_missing_captions_path_says_not_found(tmp_path, capsys):
    path = tmp_path / "no_such.json"
    rc, out, err = _run(["--captions", str(path), "--setting", "single"], capsys)
    assert (rc, out) == (2, "")
    assert err == f"error: --captions {path}: not found (expected a caption file or a folder of runs)\n"
