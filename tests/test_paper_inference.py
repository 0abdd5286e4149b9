"""RePIC's inference settings on the paper path: the open-vocabulary detector gets the database's categories and
the pipeline's device (main crashed with a TypeError here), the processor's max_pixels, captions cut at
max_new_tokens counted, the optional YOLO-World detector, and progress lines in a log."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repic.core.io import RepicError, write_json
from repic.core.progress import Progress
from repic.data.retrieval import build_index, database_categories, make_detector, make_embedder, save_index


def _database(root: Path) -> Path:
    concepts = {}
    for i, (key, category) in enumerate([("<bo>", "dog"), ("<mam>", "cat"), ("<toy>", "stuffed animal")]):
        rel = f"data/db/{key.strip('<>')}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (60 * i, 200 - 50 * i, 90)).save(root / rel)
        concepts[key] = {"name": key.strip("<>"), "image": rel, "info": f"{key} info", "category": category}
    db = root / "data/db/database_mod.json"
    write_json(db, {"concept_dict": concepts, "path_to_concept": {c["image"]: k for k, c in concepts.items()}})
    return db


def test_open_vocabulary_detector_needs_classes_one_line_not_a_type_error() -> None:
    with pytest.raises(RepicError, match=r"^owlv2 detector: needs at least one class \(the database categories\)$"):
        make_detector("owlv2", threshold=0.1)  # main: TypeError: missing 'classes'
    assert make_detector("foreground", classes=["dog"], device="cuda").name == "foreground"  # ignores both


def test_retriever_prompts_the_detector_with_the_database_categories_on_the_pipeline_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import repic.data.retrieval as retrieval
    from repic.eval.retrieve import make_retriever
    from repic.rehearsal.standins import tiny_owlv2

    db = _database(tmp_path)
    embedder = make_embedder("color_layout")
    index, id_map = build_index(db, tmp_path, embedder)
    save_index(tmp_path / "index", index, id_map, {"embedder": "color_layout", "embedder_kwargs": {},
                                                   "database": str(db)})
    built = {}
    real = retrieval.make_detector

    def spy(name, **kw):
        built.update(name=name, **kw)
        return real(name, **kw)

    monkeypatch.setattr(retrieval, "make_detector", spy)
    owl = tiny_owlv2(tmp_path / "owl", seed=0)
    params = {"detector": "owlv2", "detector_kwargs": {"threshold": 0.1, "model_id": str(owl)}}  # paper.yaml's
    retrieve_keys = make_retriever(tmp_path / "index", tmp_path, params, k=2, database=db, device="auto")
    assert built["classes"] == database_categories(db) == ["cat", "dog", "stuffed animal"]
    assert built["device"] == "cpu" and built["threshold"] == 0.1  # auto -> cpu on this machine
    hit = retrieve_keys(Image.new("RGB", (64, 48), (0, 200, 90)))
    assert len(hit["keys"]) == 2 and set(hit["keys"]) <= {"<bo>", "<mam>", "<toy>"}


def test_embedder_runs_on_the_given_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import repic.data.retrieval as retrieval

    seen = {}

    class Fake:
        name, uses_device = "fake", True

        def __init__(self, device: str = "cpu", **kw) -> None:
            seen.update(device=device, **kw)

    monkeypatch.setitem(retrieval.EMBEDDERS, "fake", Fake)
    retrieval.make_embedder("fake", device="cuda:1", model_id="m")
    assert seen == {"device": "cuda:1", "model_id": "m"}
    assert retrieval.make_embedder("color_layout", device="cuda").name == "color_layout"  # weight-free: ignored


def test_processor_max_pixels_and_captions_cut_at_the_limit(tiny_model_dir: Path) -> None:
    from repic.eval.captioning import Query, caption_all
    from repic.vlm.models import load_model, load_processor

    processor = load_processor(tiny_model_dir, max_pixels=1024 * 28 * 28)
    assert processor.image_processor.size["longest_edge"] == 802816
    grid = processor.image_processor(images=[Image.new("RGB", (1000, 1000))])["image_grid_thw"].tolist()
    assert grid == [[1, 64, 64]]  # 896x896: the 1024*28*28 cap (the checkpoint's own cap is 112x112)
    processor = load_processor(tiny_model_dir)
    model = load_model(tiny_model_dir, device="cpu")
    root = tiny_model_dir.parent / "capdata"
    db = _database(root)
    database = json.loads(db.read_text())
    Image.new("RGB", (56, 56), "red").save(root / "q.png")
    queries = [Query(image="q.png", gt_keys=["<bo>"], question="Caption this.", ref_keys=["<bo>"])]
    hits: dict[str, int] = {}
    rows = caption_all(model, processor, {"skip": queries}, database, root, batch_size=1, max_new_tokens=2,
                       desc="t", hit_limit=hits)
    assert len(rows["skip"]) == 1 and hits == {"skip": 1}  # a random tiny model never stops within 2 tokens


def test_progress_writes_log_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    with Progress(10, "caption single/myvlm", unit="caption", every=4, stream=out) as bar:
        for _ in range(10):
            bar.update()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == ["4/10", "8/10", "10/10"]
    assert "ETA" in lines[0] and "done in" in lines[-1] and "\r" not in out.getvalue()


def test_yolo_world_detector_without_ultralytics_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # import fails as when the package is absent
    with pytest.raises(RepicError, match=r"the optional package 'ultralytics' \(AGPL-3.0\) is not installed"):
        make_detector("yolo_world", classes=["dog"])


def test_yolo_world_detector_sets_classes_and_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ultralytics itself is not installed (AGPL, optional): a stand-in module records what RePIC's recipe
    asks of it (set_classes(categories), predict(conf=0.1, device)); the real model was not run."""
    import torch

    calls: dict = {}

    class Boxes:
        xyxy = torch.tensor([[2.0, 3.0, 30.0, 40.0], [0.0, 0.0, 0.5, 10.0]])
        conf = torch.tensor([0.7, 0.2])
        cls = torch.tensor([1.0, 0.0])

    class YOLO:
        def __init__(self, path: str) -> None:
            calls["path"] = path

        def set_classes(self, classes: list[str]) -> None:
            calls["classes"] = classes

        def predict(self, image, conf: float, device: str, verbose: bool):
            calls.update(conf=conf, device=device, size=image.size)
            return [types.SimpleNamespace(boxes=Boxes())]

    monkeypatch.setitem(sys.modules, "ultralytics", types.SimpleNamespace(YOLO=YOLO))
    weights = tmp_path / "yolov8x-worldv2.pt"
    weights.write_bytes(b"weights")
    with pytest.raises(RepicError, match=r"sha256 mismatch: expected 0{64}, got"):
        make_detector("yolo_world", classes=["cat", "dog"], model_id=str(weights), sha256="0" * 64)
    from repic.data.sources import file_sha256

    det = make_detector("yolo_world", classes=["cat", "dog"], model_id=str(weights), threshold=0.1,
                        sha256=file_sha256(weights), device="cuda:0")
    out = det.detect(Image.new("RGB", (64, 48)))
    assert calls == {"path": str(weights), "classes": ["cat", "dog"], "conf": 0.1, "device": "cuda:0",
                     "size": (64, 48)}
    assert out == [{"box": [2, 3, 30, 40], "score": pytest.approx(0.7), "label": "dog"}]  # <1 px wide box dropped
    with pytest.raises(RepicError, match="model_id: .* does not exist"):
        make_detector("yolo_world", classes=["cat"], model_id=str(tmp_path / "absent.pt"))
    assert np.isfinite(out[0]["score"])


def test_training_progress_lines_in_a_log_resume_counts_from_the_checkpoint() -> None:
    from repic.core.progress import training_callback

    out = io.StringIO()
    cb = training_callback(out)
    state = types.SimpleNamespace(is_world_process_zero=True, max_steps=40, global_step=20)
    cb.on_train_begin(None, state, None)
    for step in range(21, 41):
        state.global_step = step
        cb.on_step_end(None, state, None)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train: 22/40 (55.0%)") and lines[-1].startswith("train: 40/40 (100.0%)")
    assert len(lines) == 10  # every 2 steps (5 %) from the resumed step on

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert training_callback(Tty()) is None  # a terminal has the Trainer's own bar
