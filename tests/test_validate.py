"""repic.data.validate on RePIC's real evaluation data (shared/repic_eval) and on small hand-made defects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from repic.core.io import RepicError, read_json, write_json
from repic.data.validate import (
    describe_left_out,
    filter_valid_queries,
    left_out_entries,
    load_database,
    summary,
    validate_database,
    validate_dataset,
    validate_queries,
)

from .conftest import SHARED, need_shared

REPIC_EVAL = SHARED / "repic_eval"
DB = "data/database_tot/{}/database_mod.json"
Q = "data/query_tot/{}_query_templates.json"


@pytest.fixture(scope="module")
def real() -> Path:
    need_shared(REPIC_EVAL / "data")
    return REPIC_EVAL


# =============================================================================================== real data
def test_real_squidgame_images_without_entry_are_named(real: Path) -> None:
    report = validate_database(real / DB.format("database_4_concepts"), real)
    assert report["unlisted_images"] == [f"./data/database_tot/database_4_concepts/squidgame/{n}.jpg"
                                         for n in ("sim", "sky", "sunghoon")]
    # db/output_*.json sub-databases are not images; nothing listed is missing: a warning, not an error.
    assert report["missing_images"] == [] and report["malformed"] == [] and report["concepts"] == 32
    assert report["ok"] and report["errors"] == 0 and report["warnings"] == 3


def test_real_yollava_database_reports_its_uncopied_images(real: Path) -> None:
    db_json = real / DB.format("database_yollava")
    report = validate_database(db_json, real)
    assert len(report["missing_images"]) == 40 and "./data/database_tot/database_yollava/bo.png" in report[
        "missing_images"]
    assert "<bo>" in report["keys_without_image"] and not report["ok"]
    queries = validate_queries(real / Q.format("yollava"), load_database(db_json), real, "single")
    assert queries["entries"] == 333 and queries["valid_entries"] == 0 and not queries["ok"]
    assert filter_valid_queries(read_json(real / Q.format("yollava")), load_database(db_json), real, "single") == {}


def test_real_two_concept_database_is_clean(real: Path) -> None:
    report = validate_database(real / DB.format("database_2_concepts"), real)
    assert (report["missing_images"], report["unlisted_images"], report["malformed"], report["unknown_keys"]) == (
        [], [], [], [])
    assert report["ok"] and report["concepts"] == 16


def test_real_four_concept_queries_are_all_valid(real: Path) -> None:
    database = load_database(real / DB.format("database_4_concepts"))
    query_map = read_json(real / Q.format("4_concept"))
    report = validate_queries(real / Q.format("4_concept"), database, real, "multi4")
    assert (report["images"], report["entries"], report["valid_entries"], report["ok"]) == (4, 105, 105, True)
    assert filter_valid_queries(query_map, database, real, "multi4") == query_map


def test_real_dataset_report_goes_on_or_fails_when_strict(real: Path, tmp_path: Path) -> None:
    databases = {"single": real / DB.format("database_yollava"), "multi2": real / DB.format("database_2_concepts"),
                 "multi4": real / DB.format("database_4_concepts")}
    queries = {"single": real / Q.format("yollava"), "multi2": real / Q.format("2_concept"),
               "multi4": real / Q.format("4_concept")}
    report = validate_dataset(real, databases, queries)
    assert not report["ok"] and report["warnings"] == 3
    # 2-concept query photos (RAP-MLLM) are not in shared/: every entry is dropped, and said so.
    assert report["queries"]["multi2"]["dropped_entries"] == 82 and report["queries"]["multi4"]["ok"]
    write_json(tmp_path / "validation.json", report)  # JSON-serialisable as it is
    assert json.loads((tmp_path / "validation.json").read_text())["errors"] == report["errors"]
    with pytest.raises(RepicError) as err:
        validate_dataset(real, databases, queries, strict=True)
    msg = str(err.value)
    assert msg.startswith("data validation failed (strict: true): ") and "\n" not in msg
    assert "database_yollava/database_mod.json: 40 missing images" in msg and "sunghoon" in msg


def test_real_data_fetched_as_a_symlink_mirror_validates_the_same(real: Path, tmp_path: Path) -> None:
    from repic.data.sources import fetch_source, tree_sha256

    root = fetch_source({"kind": "local", "path": str(real), "sha256": tree_sha256(real), "mode": "symlink"},
                        tmp_path / "world")
    report = validate_database(root / DB.format("database_4_concepts"), root)
    assert [Path(p).name for p in report["unlisted_images"]] == ["sim.jpg", "sky.jpg", "sunghoon.jpg"]
    assert report["unlisted_images"][0].startswith("./data/database_tot/")


# ============================================================================================== hand-made
@pytest.fixture
def world(tmp_path: Path) -> Path:
    """A tiny data root with one defect of each kind."""
    root = tmp_path / "root"
    db_dir = root / "data" / "database_tot" / "db"
    (db_dir / "group" / "db").mkdir(parents=True)
    for name in ("a.png", "b.png", "group/d.png", "f.png", "extra.jpg"):
        Image.new("RGB", (4, 4), "red").save(db_dir / name, format="PNG")  # decodable: validation decodes them
    (db_dir / "group" / "db" / "output_a_b.json").write_text("{}")  # a sub-database, not an image
    concept = {"name": "A", "info": "an a", "category": "toy"}

    def entry(key: str, image: str) -> tuple[str, dict[str, str]]:
        return key, {**concept, "image": f"./data/database_tot/db/{image}"}

    concepts = dict([entry("<a>", "a.png"), entry("<b>", "b.png"), entry("<c>", "c.png"), entry("<d>", "group/d.png"),
                     entry("<f>", "f.png")])
    concepts["<e>"] = {"name": "E", "image": "./data/database_tot/db/a.png"}  # no info, no category
    write_json(db_dir / "database_mod.json", {
        "concept_dict": concepts,
        "path_to_concept": {**{c["image"]: k for k, c in concepts.items() if k != "<e>"},
                            "./data/database_tot/db/b.png": "<ghost>"},
    })
    (root / "data" / "q").mkdir()
    for name in ("1.png", "2.png", "3.png", "4.png", "g.png"):
        (root / "data" / "q" / name).write_bytes(b"img")
    write_json(root / "data" / "single.json", {
        "./data/q/1.png": ["<a>"],          # valid
        "./data/q/2.png": ["<zzz>"],        # key the database lacks
        "./data/q/3.png": ["<c>"],          # key whose reference image is missing
        "./data/q/absent.png": ["<a>"],     # query image missing
        "./data/q/4.png": ["<a>", "<b>"],   # wrong number of keys for the setting
    })
    write_json(root / "data" / "multi4.json", {
        "./data/q/g.png": [["<a>", "<b>", "<d>", "<f>"], ["<a>", "<b>", "<d>", "<e>"], ["<a>", "<b>", "<d>", "<zzz>"],
                           "<a>"],
        "./data/q/absent.png": [["<a>", "<b>", "<d>", "<e>"]],
    })
    return root


def test_hand_made_database_defects(world: Path) -> None:
    report = validate_database(world / "data/database_tot/db/database_mod.json", world)
    assert report["missing_images"] == ["./data/database_tot/db/c.png"]
    assert report["keys_without_image"] == ["<c>"]
    assert report["unlisted_images"] == ["./data/database_tot/db/extra.jpg"]  # group/d.png is listed, json isn't
    assert report["unknown_keys"] == ["<ghost>"]
    assert report["malformed"] == ["<e>: missing or non-string ['info', 'category']"]
    assert (report["errors"], report["warnings"], report["ok"]) == (2, 2, False)


def test_hand_made_query_defects_and_filter(world: Path) -> None:
    database = load_database(world / "data/database_tot/db/database_mod.json")
    report = validate_queries(world / "data/single.json", database, world, "single")
    assert report["missing_images"] == ["./data/q/absent.png"]
    assert report["unknown_keys"] == ["<zzz>"] and report["unusable_keys"] == {"<c>": "reference image missing"}
    assert report["malformed"] == ["./data/q/4.png: expected a list of 1 key(s), got ['<a>', '<b>']"]
    assert (report["entries"], report["valid_entries"], report["ok"]) == (5, 1, False)
    single = read_json(world / "data/single.json")
    assert filter_valid_queries(single, database, world, "single") == {"./data/q/1.png": ["<a>"]}

    multi4 = read_json(world / "data/multi4.json")
    report4 = validate_queries(world / "data/multi4.json", database, world, "multi4")
    assert (report4["images"], report4["entries"], report4["valid_entries"]) == (2, 5, 1)
    assert report4["unusable_keys"] == {"<e>": "malformed concept"} and report4["unknown_keys"] == ["<zzz>"]
    assert report4["malformed"] == ["./data/q/g.png: expected a list of 4-key lists, got '<a>'"]
    assert filter_valid_queries(multi4, database, world, "multi4") == {
        "./data/q/g.png": [["<a>", "<b>", "<d>", "<f>"]]}


def test_hand_made_dataset_summary_and_shape_errors(world: Path) -> None:
    db_json = world / "data/database_tot/db/database_mod.json"
    report = validate_dataset(world, db_json, {"single": world / "data/single.json"})
    line = summary(report)
    assert "1 missing images (./data/database_tot/db/c.png)" in line and "4 of 5 entries dropped" in line
    # One database shared by the settings is checked once; files are named relative to the data root.
    assert list(report["databases"]) == ["data/database_tot/db/database_mod.json"]
    assert report["queries"]["single"]["queries"] == "data/single.json"
    write_json(world / "bad.json", {"path_to_concept": {}})
    with pytest.raises(RepicError, match=r"bad\.json: expected an object with 'concept_dict'"):
        validate_database(world / "bad.json", world)
    write_json(world / "list.json", [["./data/q/1.png", ["<a>"]]])
    with pytest.raises(RepicError, match=r"list\.json: expected an object query image -> keys"):
        validate_queries(world / "list.json", load_database(db_json), world, "single")
    with pytest.raises(RepicError, match="setting: expected one of"):
        validate_queries(world / "data/single.json", load_database(db_json), world, "multi3")


def test_left_out_entries_name_image_keys_and_why(world: Path) -> None:
    database = load_database(world / "data/database_tot/db/database_mod.json")
    left_out = left_out_entries(read_json(world / "data/single.json"), database, world, "single")
    assert left_out == [
        {"query_image": "./data/q/2.png", "gt_keys": ["<zzz>"], "reason": "keys not in the database: <zzz>"},
        {"query_image": "./data/q/3.png", "gt_keys": ["<c>"],
         "reason": "keys without a usable reference: <c> (reference image missing)"},
        {"query_image": "./data/q/absent.png", "gt_keys": ["<a>"],
         "reason": f"query image not found ({world}/data/q/absent.png)"},
        {"query_image": "./data/q/4.png", "gt_keys": [],
         "reason": "malformed entry (expected a list of 1 key(s), got ['<a>', '<b>'])"},
    ]
    assert describe_left_out(left_out, limit=2) == (
        "./data/q/2.png ['<zzz>']: keys not in the database: <zzz>; ./data/q/3.png ['<c>']: keys without a usable "
        "reference: <c> (reference image missing); and 2 more")


def test_retrieve_names_the_left_out_queries_and_lists_them_in_retrieval_json(world, monkeypatch, caplog):
    """The retrieve stage's warning names each left-out query and why, and points at a file that exists: its
    retrieval.json (`left_out`), plus fetch_data's validation.json when the data root has one. A caption stage
    captions the same valid queries, with the references of that report."""
    import logging

    import repic.vlm.models
    from repic.eval import captioning, retrieve

    monkeypatch.setattr(retrieve, "open_rgb", lambda root, rel: rel)
    monkeypatch.setattr(retrieve, "make_retriever", lambda *a, **k: lambda image: {
        "keys": ["<a>"], "hits": [{"rank": 1, "key": "<a>", "image": "a.png", "score": 0.5, "crop": [0, 0, 1, 1],
                                   "missing": False}]})
    monkeypatch.setattr(repic.vlm.models, "load_processor", lambda *a, **k: None)
    monkeypatch.setattr(repic.vlm.models, "load_model", lambda *a, **k: None)
    monkeypatch.setattr(captioning, "caption_all", lambda model, processor, by_mode, *a, **k: {
        mode: [[q.image, q.gt_keys, q.ref_keys, q.question] for q in queries] for mode, queries in by_mode.items()})
    options = {"detector": "none", "detector_kwargs": {}}
    db_json = str(world / "data/database_tot/db/database_mod.json")
    with caplog.at_level(logging.WARNING):
        report = retrieve.retrieve_setting("single", str(world / "data/single.json"), db_json, str(world), "idx",
                                           params=options, k=1)
    (message,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert message.startswith(f"{world}/data/single.json: 4 of 5 query images left out (4 invalid entries, all "
                              "listed in 'left_out' of the retrieve stage's retrieval.json): ./data/q/2.png ['<zzz>']: "
                              "keys not in the database: <zzz>; ./data/q/3.png ['<c>']: keys without a usable "
                              "reference")
    assert "validation.json" not in message  # the synthetic source writes none: no pointer at a missing file
    assert [e["query_image"] for e in report["left_out"]] == ["./data/q/2.png", "./data/q/3.png",
                                                              "./data/q/absent.png", "./data/q/4.png"]
    assert report["n_query_images_left_out"] == 4 and report["n_queries"] == 1 and report["k"] == 1
    (entry,) = report["per_query"]
    assert entry["retrieved"] == ["<a>"] and entry["hits"][0]["score"] == 0.5
    params = {"batch_size": 1, "max_new_tokens": 4, "backend": "hf"}
    rows, summary = captioning.run_setting("single", str(world / "data/single.json"), db_json, str(world), report,
                                           "base", model="model", params=params)
    assert list(rows) == ["base_skip", "base_retrieval"] and rows["base_retrieval"][0][2] == ["<a>"]
    assert summary["n_queries"] == 1 and summary["max_new_tokens"] == 4
    # a report retrieved for other queries is refused, naming the entry that differs
    other = {**report, "per_query": [{**entry, "gt_keys": ["<b>"]}]}
    with pytest.raises(RepicError, match=r"^r\.json: per_query\[0\] is '\./data/q/1\.png' \['<b>'\], the query map's "
                       r"is '\./data/q/1\.png' \['<a>'\] \(retrieved for other queries: run its retrieve stage "
                       r"again\)$"):
        captioning.run_setting("single", str(world / "data/single.json"), db_json, str(world), other, "base",
                               model="model", params=params, retrieval_source="r.json")
    write_json(world / "validation.json", {"ok": False})
    write_json(world / "none_valid.json", {"./data/q/2.png": ["<zzz>"]})
    with pytest.raises(RepicError) as err:
        retrieve.retrieve_setting("single", str(world / "none_valid.json"), db_json, str(world), "idx",
                                  params=options, k=1)
    assert str(err.value) == (f"{world}/none_valid.json: no valid query left, all 1 entries left out: ./data/q/2.png "
                              f"['<zzz>']: keys not in the database: <zzz> (see {world}/validation.json)")
    (world / "validation.json").unlink()


def test_undecodable_database_images_are_errors_in_the_report(tmp_path: Path) -> None:
    """A truncated download or a file that is no image exists, so only decoding it finds it (build_db would stop)."""
    from .test_retrieval import _truncated_png

    db_dir = tmp_path / "data" / "db"
    db_dir.mkdir(parents=True)
    Image.new("RGB", (4, 4), "red").save(db_dir / "a.png")
    _truncated_png(db_dir / "t.png")
    (db_dir / "n.png").write_bytes(b"not an image")
    concepts = {k: {"name": k, "image": f"./data/db/{f}", "info": "i", "category": "toy"}
                for k, f in (("<a>", "a.png"), ("<t>", "t.png"), ("<n>", "n.png"))}
    write_json(db_dir / "database_mod.json", {"concept_dict": concepts, "path_to_concept": {}})
    report = validate_database(db_dir / "database_mod.json", tmp_path)
    assert report["unreadable_images"] == [
        f"./data/db/n.png: cannot identify image file '{tmp_path}/data/db/n.png'",
        "./data/db/t.png: image file is truncated",
    ]
    assert (report["errors"], report["ok"], report["missing_images"]) == (2, False, [])
    line = summary({"databases": {"db": report}})
    assert "data/db/database_mod.json: 2 unreadable images (./data/db/n.png: cannot identify" in line
