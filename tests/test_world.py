"""The synthetic concept world: RePIC's formats, determinism, consistent boxes, disjoint training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from repic.core.io import RepicError, resolve_image
from repic.synthetic.world import METHODS, make_concepts, make_world

from .conftest import SHARED, need_shared

REAL = SHARED / "repic_eval"
SMALL = dict(
    n_concepts=8,
    n_distractors=2,
    queries_single=8,
    queries_multi2=4,
    queries_multi4=3,
    train_per_method=4,
    image_size=128,
)
OCT = "The final answer must be either 'yes' or 'no' with no additional output."
VLT = "For bounding box coordinates, return the final answer in JSON format."


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("world")
    return root, make_world(root, seed=7, **SMALL)


def load(root: Path, rel: str):
    return json.loads(resolve_image(root, rel).read_text(encoding="utf-8"))


def test_database_matches_repic_format(world):
    root, summary = world
    assert summary["database"] == "./data/database_tot/database_synthetic/database_mod.json"
    db = load(root, summary["database"])
    assert set(db) == {"concept_dict", "path_to_concept"}
    assert len(db["concept_dict"]) == SMALL["n_concepts"]
    for key, concept in db["concept_dict"].items():
        assert set(concept) == {"name", "image", "info", "category"}
        assert key == f"<{concept['name']}>"
        assert concept["image"].startswith("./data/database_tot/database_synthetic/")
        assert db["path_to_concept"][concept["image"]] == key
        assert concept["info"].endswith(".") and concept["category"]
        with Image.open(resolve_image(root, concept["image"])) as im:
            assert im.size == (SMALL["image_size"], SMALL["image_size"])
    assert len(db["path_to_concept"]) == len(db["concept_dict"])


def test_same_shape_as_real_files(world):
    need_shared(REAL)
    root, summary = world
    real_db = json.loads((REAL / "data/database_tot/database_2_concepts/database_mod.json").read_text())
    ours = load(root, summary["database"])
    assert set(ours) == set(real_db)
    assert {tuple(sorted(c)) for c in ours["concept_dict"].values()} == {
        tuple(sorted(c)) for c in real_db["concept_dict"].values()
    }
    real4 = json.loads((REAL / "data/query_tot/4_concept_query_templates.json").read_text())
    ours4 = load(root, summary["queries"]["multi4"])
    for value in [*real4.values(), *ours4.values()]:
        assert isinstance(value, list) and all(isinstance(s, list) and len(s) == 4 for s in value)
    for rel in [*real4, *ours4]:
        assert rel.startswith("./data/")


def test_query_templates_and_boxes(world):
    root, summary = world
    keys = set(summary["concepts"])
    single = load(root, summary["queries"]["single"])
    multi2 = load(root, summary["queries"]["multi2"])
    multi4 = load(root, summary["queries"]["multi4"])
    boxes = load(root, summary["boxes"])
    assert summary["queries"]["single"] == "./data/query_tot/synthetic_single_query_templates.json"
    assert summary["queries"]["multi2"] == "./data/query_tot/synthetic_2_concept_query_templates.json"
    assert summary["queries"]["multi4"] == "./data/query_tot/synthetic_4_concept_query_templates.json"
    assert (len(single), len(multi2), len(multi4)) == (8, 4, 3)
    assert all(len(v) == 1 for v in single.values())
    assert all(len(set(v)) == 2 for v in multi2.values())
    assert all(len(v) == 1 and len(set(v[0])) == 4 for v in multi4.values())
    # Every concept appears in some single-concept query when there are as many queries as concepts.
    assert {v[0] for v in single.values()} == keys
    scenes = {**single, **multi2, **{k: v[0] for k, v in multi4.items()}}
    assert set(boxes) == set(scenes)
    for rel, gt in scenes.items():
        assert rel.startswith("./data/query-image-synthetic/") and rel.endswith(".png")
        assert set(gt) <= keys and set(boxes[rel]) == set(gt)
        with Image.open(resolve_image(root, rel)) as im:
            w, h = im.size
        placed = list(boxes[rel].values())
        for x1, y1, x2, y2 in placed:
            assert all(isinstance(v, int) for v in (x1, y1, x2, y2))
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        for i, a in enumerate(placed):  # no two concepts overlap
            for b in placed[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_training_json_schema(world):
    root, summary = world
    train = load(root, summary["train"])
    assert summary["train"] == "./data/training/train.json"
    assert summary["n_train"] == {m: SMALL["train_per_method"] for m in METHODS}
    assert sorted({s["accu_reward_method"] for s in train}) == sorted(METHODS)
    query_images = set(load(root, summary["boxes"]))
    train_keys = set(summary["train_concepts"])
    assert not train_keys & set(summary["concepts"])  # training never sees an evaluation concept
    answers = []
    for s in train:
        assert set(s) == {"image", "problem", "solution", "accu_reward_method"}
        images = s["image"] if isinstance(s["image"], list) else [s["image"]]
        for rel in images:
            assert rel.startswith("./data/training/") and rel not in query_images
            assert resolve_image(root, rel).is_file()
        # Instruction suffixes are appended by the prompt module, never stored here.
        assert OCT not in s["problem"] and VLT not in s["problem"]
        method, sol = s["accu_reward_method"], s["solution"]
        if method == "yes_no":
            assert len(images) == 2 and sol in ("yes", "no")
            answers.append(sol)
        elif method == "iou":
            assert isinstance(s["image"], str) and len(sol) == 4 and all(isinstance(v, int) for v in sol)
            with Image.open(resolve_image(root, s["image"])) as im:
                assert 0 <= sol[0] < sol[2] <= im.width and 0 <= sol[1] < sol[3] <= im.height
        elif method == "yes_no_name":
            assert len(images) == 2 and sol in train_keys and sol in s["problem"]
        else:
            assert len(images) == 3 and len(sol) == 2 and set(sol) <= train_keys
            assert all(k in s["problem"] for k in sol)
    assert abs(answers.count("yes") - answers.count("no")) <= 1


def test_same_seed_gives_identical_bytes(tmp_path):
    params = dict(
        SMALL, n_concepts=5, queries_single=3, queries_multi2=2, queries_multi4=1, train_per_method=2
    )
    make_world(tmp_path / "a", seed=3, **params)
    make_world(tmp_path / "b", seed=3, **params)
    make_world(tmp_path / "c", seed=4, **params)

    def files(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }

    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    db = "data/database_tot/database_synthetic/database_mod.json"
    assert a[db] != c[db]


def test_rebuild_removes_stale_images(tmp_path):
    make_world(tmp_path, seed=1, **dict(SMALL, queries_single=6, train_per_method=2))
    make_world(tmp_path, seed=1, **dict(SMALL, queries_single=2, train_per_method=2))
    singles = sorted((tmp_path / "data/query-image-synthetic/single").glob("*.png"))
    assert len(singles) == 2


def test_concepts_are_distinct_and_names_safe():
    concepts, train = make_concepts(seed=0, n_eval=20, n_train=20)
    everything = concepts + train
    looks = [(c.shape, c.primary, c.secondary, c.pattern) for c in everything]
    assert len(set(looks)) == len(looks)
    assert len({frozenset((c.primary, c.secondary)) for c in everything}) == len(everything)
    names = [c.name for c in everything]
    assert len(set(names)) == len(names)
    for name in names:
        # "no"/"yes" inside a name would trip RePIC's yes/no reward, which searches substrings.
        assert name.isalpha() and name.islower() and "no" not in name and "yes" not in name
        assert not any(name in other for other in names if other != name)


def test_group_photos_list_every_four_concept_subset(tmp_path):
    params = dict(SMALL, queries_single=0, queries_multi2=0, queries_multi4=2, train_per_method=0)
    summary = make_world(tmp_path, seed=2, multi4_scene_concepts=5, **params)
    multi4 = load(tmp_path, summary["queries"]["multi4"])
    boxes = load(tmp_path, summary["boxes"])
    for rel, subsets in multi4.items():
        assert len(subsets) == 5 and len({frozenset(s) for s in subsets}) == 5
        assert set().union(*subsets) == set(boxes[rel]) and len(boxes[rel]) == 5


def test_rejects_impossible_requests(tmp_path):
    with pytest.raises(RepicError, match="4 concepts"):
        make_world(tmp_path, seed=0, **dict(SMALL, n_concepts=3))
