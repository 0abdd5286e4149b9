"""Retrieval: embedders, detectors, the faiss index and its files, pooled top-k, recall@k."""

from __future__ import annotations

import importlib.util
import json
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repic.core.io import RepicError, resolve_image
from repic.data.retrieval import (
    build_index,
    connected_components,
    database_categories,
    load_index,
    make_detector,
    make_embedder,
    missing_database_images,
    open_image,
    retrieval_recall,
    retrieve,
    save_index,
)
from repic.synthetic.world import make_world

from .conftest import SHARED, need_shared

REAL = SHARED / "repic_eval"
DB = "data/database_tot/database_synthetic/database_mod.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("world")
    summary = make_world(
        root,
        seed=11,
        n_concepts=10,
        n_distractors=2,
        queries_single=12,
        queries_multi2=6,
        queries_multi4=3,
        train_per_method=0,
        image_size=160,
    )
    return root, summary


@pytest.fixture(scope="module")
def color_index(world):
    root, _ = world
    embedder = make_embedder("color_layout")
    index, id_map = build_index(root / DB, root, embedder)
    return embedder, index, id_map


def _json(root: Path, rel: str):
    return json.loads(resolve_image(root, rel).read_text(encoding="utf-8"))


def _iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_registries_reject_unknown_names():
    with pytest.raises(RepicError, match="unknown embedder"):
        make_embedder("sift")
    with pytest.raises(RepicError, match="unknown detector"):
        make_detector("yolo")


def test_color_layout_rows_are_unit_float32(world):
    root, summary = world
    images = [open_image(resolve_image(root, rel)) for rel in list(_json(root, summary["boxes"]))[:3]]
    vectors = make_embedder("color_layout").embed(images)
    assert vectors.dtype == np.float32 and vectors.shape[0] == 3
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_color_layout_separates_concepts(world, color_index):
    """Nearest database image of each ground-truth query crop is its own concept for >= 90 % of crops."""
    root, summary = world
    embedder, index, id_map = color_index
    crops, keys = [], []
    for rel, boxes in _json(root, summary["boxes"]).items():
        image = open_image(resolve_image(root, rel))
        for key, (x1, y1, x2, y2) in boxes.items():
            crops.append(image.crop((max(0, x1 - 4), max(0, y1 - 4), x2 + 4, y2 + 4)))
            keys.append(key)
    _, ids = index.search(embedder.embed(crops), 1)
    accuracy = np.mean([id_map[i]["key"] == key for i, key in zip(ids[:, 0], keys, strict=True)])
    assert len(crops) == 12 + 6 * 2 + 3 * 4 and accuracy >= 0.9


def test_connected_components_labels():
    mask = np.zeros((9, 12), dtype=bool)
    mask[1:4, 1:4] = True  # a square
    mask[6, 2:11] = True  # a long bar
    mask[4, 4] = True  # touches the square diagonally: same component under 8-connectivity
    labels = connected_components(mask)
    assert len(np.unique(labels[mask])) == 2 and (labels[~mask] == 0).all()
    assert labels[4, 4] == labels[1, 1]


def test_foreground_detector_finds_every_concept(world):
    root, summary = world
    detector = make_detector("foreground", min_area=30)
    for rel, boxes in _json(root, summary["boxes"]).items():
        found = [d["box"] for d in detector.detect(open_image(resolve_image(root, rel)))]
        for gt in boxes.values():
            assert max(_iou(gt, box) for box in found) >= 0.8, rel


@pytest.mark.parametrize(("kind", "k"), [("single", 2), ("multi2", 2), ("multi4", 4)])
def test_retrieval_recall_on_the_world(world, color_index, kind, k):
    root, summary = world
    embedder, index, id_map = color_index
    detector = make_detector("foreground")
    retrieved, truth = [], []
    for rel, gt in _json(root, summary["queries"][kind]).items():
        hits = retrieve(resolve_image(root, rel), index, id_map, embedder, detector, k, root=root)
        assert len(hits) <= k and [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
        assert len({h["key"] for h in hits}) == len(hits)  # deduplicated by concept
        assert not any(h["missing"] for h in hits)
        retrieved.append([h["key"] for h in hits])
        truth.append(gt[0] if kind == "multi4" else gt)
    assert retrieval_recall(retrieved, truth) >= 0.9


def test_retrieval_recall_definition():
    assert retrieval_recall([["<a>", "<b>"], ["<c>"]], [["<a>"], ["<d>", "<c>"]]) == pytest.approx(2 / 3)
    assert retrieval_recall([], []) == 0.0
    with pytest.raises(RepicError):
        retrieval_recall([["<a>"]], [])


def test_index_save_load_round_trip(tmp_path, world, color_index):
    root, summary = world
    embedder, index, id_map = color_index
    save_index(tmp_path / "idx", index, id_map, {"embedder": "color_layout", "database": DB})
    loaded, loaded_map, meta = load_index(tmp_path / "idx")
    assert loaded_map == id_map and loaded.ntotal == index.ntotal == len(id_map) == 10
    assert meta["embedder"] == "color_layout" and meta["ntotal"] == 10 and meta["dim"] == index.d
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["id_map.json", "index.faiss", "meta.json"]
    query = list(_json(root, summary["queries"]["single"]))[0]
    vec = embedder.embed([open_image(resolve_image(root, query))])
    np.testing.assert_array_equal(index.search(vec, 3)[1], loaded.search(vec, 3)[1])
    assert {entry["key"] for entry in id_map} == set(summary["concepts"])


def test_load_index_detects_inconsistent_files(tmp_path, color_index):
    _, index, id_map = color_index
    save_index(tmp_path, index, id_map, {})
    (tmp_path / "id_map.json").write_text(json.dumps(id_map[:-1]))
    with pytest.raises(RepicError, match="rebuild"):
        load_index(tmp_path)
    with pytest.raises(RepicError, match="not found"):
        load_index(tmp_path / "nowhere")


def test_missing_database_image_is_reported_not_raised(tmp_path, world):
    root, summary = world
    copy = tmp_path / "world"
    shutil.copytree(root / "data/database_tot", copy / "data/database_tot")
    embedder = make_embedder("color_layout")
    index, id_map = build_index(copy / DB, copy, embedder)
    query, (key,) = next(iter(_json(root, summary["queries"]["single"]).items()))
    gone = next(e["image"] for e in id_map if e["key"] == key)
    resolve_image(copy, gone).unlink()

    hits = retrieve(
        resolve_image(root, query), index, id_map, embedder, make_detector("foreground"), 2, root=copy
    )
    by_key = {h["key"]: h for h in hits}
    assert by_key[key]["missing"] is True and by_key[key]["image"] == gone
    assert not any(h["missing"] for h in hits if h["key"] != key)

    # Rebuilding skips the missing image and says which one it was.
    assert missing_database_images(copy / DB, copy) == [gone]
    _, rebuilt_map = build_index(copy / DB, copy, embedder)
    assert len(rebuilt_map) == len(id_map) - 1 and key not in {e["key"] for e in rebuilt_map}


def test_index_over_real_two_concept_database(tmp_path):
    need_shared(REAL)
    database = REAL / "data/database_tot/database_2_concepts/database_mod.json"
    embedder = make_embedder("color_layout")
    index, id_map = build_index(database, REAL, embedder)
    real = json.loads(database.read_text(encoding="utf-8"))
    assert index.ntotal == len(id_map) == len(real["path_to_concept"]) == 16
    assert [(e["image"], e["key"]) for e in id_map] == list(real["path_to_concept"].items())
    # Each database photo retrieves itself first (its cosine similarity with itself is 1).
    photos = [open_image(resolve_image(REAL, e["image"])) for e in id_map]
    scores, ids = index.search(embedder.embed(photos), 1)
    assert list(ids[:, 0]) == list(range(16)) and np.allclose(scores[:, 0], 1.0, atol=1e-4)
    assert "person" in database_categories(database)
    hits = retrieve(photos[0], index, id_map, embedder, None, 2, root=REAL)
    assert hits[0]["key"] == id_map[0]["key"] and not hits[0]["missing"]


def _tiny_configs() -> tuple[dict, dict]:
    text = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=16,
        bos_token_id=53,
        eos_token_id=54,
        pad_token_id=54,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    return text, vision


def test_clip_embedder_from_saved_tiny_model(tmp_path, world):
    """The CLIP code path, on a random tiny CLIP saved and reloaded with from_pretrained (no hub)."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    text, vision = _tiny_configs()
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path
    )

    embedder = make_embedder("clip", model_id=str(tmp_path), batch_size=2)
    images = [Image.new("RGB", (40 + 10 * i, 30), (40 * i, 90, 200)) for i in range(3)]
    vectors = embedder.embed(images)
    assert vectors.shape == (3, 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    root, _ = world
    index, id_map = build_index(root / DB, root, embedder)
    assert index.ntotal == len(id_map) == 10 and index.d == 16


def test_owlv2_detector_from_saved_tiny_model(tmp_path):
    """The OWLv2 code path on a random tiny model (its PIL image processor needs scipy)."""
    if importlib.util.find_spec("scipy") is None:
        pytest.skip("OWLv2's image processor needs scipy (PIL backend) or torchvision: neither is installed")
    torch = pytest.importorskip("torch")
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    text, vision = _tiny_configs()
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32))
    with torch.no_grad():  # random box heads predict zero-width boxes; zeroed, boxes sit on the patch grid
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(tmp_path)
    # A character-level CLIP vocabulary; start/end tokens last, since OWL masks queries whose first id is 0.
    tokens = ["!", *string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    image_processor = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path)

    detector = make_detector(
        "owlv2", classes=["toy", "pet"], model_id=str(tmp_path), threshold=0.0, max_boxes=5
    )
    image = Image.new("RGB", (64, 48), (200, 200, 200))
    detections = detector.detect(image)
    assert 1 <= len(detections) <= 5
    for d in detections:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 48 and d["label"] in ("toy", "pet")


def _truncated_png(path: Path) -> None:
    import io

    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # a download cut in the middle


def test_build_db_on_a_truncated_image_is_one_line_naming_the_file(tmp_path, capsys):
    from repic.core.cli import run
    from stages.build_db import main

    from .conftest import REPO

    (tmp_path / "db").mkdir()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "db/a.png")
    _truncated_png(tmp_path / "db/t.png")
    concepts = {k: {"name": k, "image": f"./db/{f}", "info": "i", "category": "toy"}
                for k, f in (("<a>", "a.png"), ("<t>", "t.png"))}
    (tmp_path / "db/database_mod.json").write_text(json.dumps({"concept_dict": concepts, "path_to_concept": {}}))
    rc = run(main, ["--params", str(REPO / "params.yaml"), "--database", str(tmp_path / "db/database_mod.json"),
                    "--root", str(tmp_path), "--out", str(tmp_path / "index")])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {tmp_path}/db/t.png: cannot read image (image file is truncated)\n"
    assert not (tmp_path / "index").exists()  # nothing half-built left behind
