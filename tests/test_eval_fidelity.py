"""The paper config evaluates as RePIC's caption and judge scripts do, checked against what RePIC's own code builds.

The reference data (tests/data/repic_*.json, qwen_vl_utils_fetch_image.json) was written by tools/repic_reference.py,
which runs RePIC's scripts from its git mirror with stand-in models: the conversations its caption scripts hand to
the processor, the questions of its released caption files, its retrieval with a stand-in detector and embedder,
its judge requests, and qwen_vl_utils' fetch_image on a grid of images.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repic.core import params as params_mod
from repic.core import prompts
from repic.eval.captioning import conversation_of, skip_references
from repic.eval.queries import expand_queries
from tests.conftest import REPO, SHARED, need_shared

DATA = REPO / "tests" / "data"
SETTING = {"myvlm": "single", "yollava": "single", "dreambooth": "single", "2_concepts": "multi2",
           "4_concepts": "multi4"}
QUERY_MAP = {"myvlm": "myvlm_query_templates.json", "yollava": "yollava_query_templates.json",
             "dreambooth": "dreambooth_query_templates.json", "2_concepts": "2_concept_query_templates.json",
             "4_concepts": "4_concept_query_templates.json"}


def _load(name: str) -> dict:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def _repic_data() -> Path:
    return need_shared(SHARED / "repic_eval" / "data")


def _split_images(messages: list[dict]) -> tuple[list[dict], list[str]]:
    """RePIC's messages with `{"type": "image", "image": path}` turned into placeholders, and the paths in order."""
    paths, out = [], []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(m)
            continue
        content = []
        for block in m["content"]:
            if block["type"] == "image":
                paths.append(block["image"])
                content.append({"type": "image"})
            else:
                content.append(block)
        out.append({**m, "content": content})
    return out, paths


def test_param_enums_agree_with_the_modules():
    from repic.data.retrieval import ON_EMPTY
    from repic.eval.judge import PROTOCOLS
    from repic.vlm.preprocess import PREPROCESS

    assert params_mod.CONVERSATIONS == prompts.CONVERSATIONS and params_mod.QUESTION_LISTS == prompts.QUESTION_LISTS
    assert params_mod.ROW_PROMPTS == prompts.ROW_PROMPTS and params_mod.ON_EMPTY == ON_EMPTY
    assert params_mod.PREPROCESS == PREPROCESS and params_mod.JUDGE_PROTOCOLS == PROTOCOLS


@pytest.mark.parametrize("dataset", list(SETTING))
@pytest.mark.parametrize("model", ["zero_shot", "RePIC"])
def test_conversation_is_the_one_repic_scripts_build(dataset, model):
    """Skip-retrieval: system prompt, reference images and lines (display names, database order), query image,
    question rotation (each script's own list) and the zero-shot row's instruction, for a sample of queries; the
    question of every query."""
    ref = _load("repic_conversations.json")[f"{dataset}/{model}"]
    data = _repic_data()
    database = json.loads((data / f"database_tot/database_{dataset}/database_mod.json").read_text())
    query_map = json.loads((data / "query_tot" / QUERY_MAP[dataset]).read_text())
    setting = SETTING[dataset]
    queries = expand_queries(query_map, setting, questions=prompts.question_list(setting, "repic", "scripts"))
    assert len(queries) == ref["n"]
    assert [q.question for q in queries] == ref["questions"]
    assert [q.image for q in queries] == ref["query_images"] and [q.gt_keys for q in queries] == ref["gt_keys"]
    prompt = "zero_shot" if model == "zero_shot" else "plain"
    for i, messages in ref["sample"].items():
        q = queries[int(i)]
        q.ref_keys = skip_references(q.gt_keys, database, "repic")
        expected, expected_paths = _split_images(messages)
        got, paths = conversation_of(q, database, conversation="repic", prompt=prompt)
        assert got == expected, f"{dataset} {model} query {i}"
        assert paths == expected_paths


# RePIC's released 2-concept zero-shot and Qwen-SFT files store each question with this instruction glued on
# (no space): not the caption scripts' zero-shot instruction (README, "Fidelity to RePIC").
RELEASED_2C_SUFFIX = "Output the final answer using its given names."


def test_released_caption_files_follow_the_single_script_rotation():
    """Every row of RePIC's released 2- and 4-concept caption files: query, keys and question as our `released`
    question list renders them in file order (the multi scripts as published would give 3 questions)."""
    data = _repic_data()
    released = _load("repic_released_questions.json")
    assert len(released) == 10
    suffixed = set()
    for name, rows in released.items():
        dataset = "2_concepts" if "double_concept" in name else "4_concepts"
        setting = SETTING[dataset]
        query_map = json.loads((data / "query_tot" / QUERY_MAP[dataset]).read_text())
        queries = expand_queries(query_map, setting, questions=prompts.question_list(setting, "repic", "released"))
        if rows[0][2].endswith(RELEASED_2C_SUFFIX):
            suffixed.add(name.rsplit("/", 1)[1])
            rows = [[r[0], r[1], r[2].removesuffix(RELEASED_2C_SUFFIX)] for r in rows]
        assert [[q.image, q.gt_keys, q.question] for q in queries] == rows, name
        scripts = expand_queries(query_map, setting, questions=prompts.question_list(setting, "repic", "scripts"))
        assert [q.question for q in scripts] != [r[2] for r in rows]
    assert suffixed == {"captioning-skip-retrieval-qwen_sft.json", "captioning-skip-retrieval-zero_shot.json"}
    assert len([n for n in released if "double_concept" in n]) == 5


def test_our_conversation_is_kept_for_the_embedded_default():
    database = {"concept_dict": {"<b>": {"name": "Bee", "info": "i b", "image": "b.png"},
                                 "<a>": {"name": "Ay", "info": "i a", "image": "a.png"}}}
    from repic.eval.captioning import Query

    q = Query(image="q.png", gt_keys=["<a>", "<b>"], question="Q?")
    q.ref_keys = skip_references(q.gt_keys, database, "ours")
    msgs, paths = conversation_of(q, database, conversation="ours")
    assert paths == ["a.png", "b.png", "q.png"] and msgs == prompts.caption_messages(
        [{"name": "<a>", "info": "i a"}, {"name": "<b>", "info": "i b"}], "Q?")
    q.ref_keys = skip_references(q.gt_keys, database, "repic")
    msgs, paths = conversation_of(q, database, conversation="repic", prompt="zero_shot")
    assert paths == ["b.png", "a.png", "q.png"]  # database order
    assert [b["text"] for b in msgs[1]["content"] if b["type"] == "text"] == [
        "1. Name: <Bee>, Info: i b", "2. Name: <Ay>, Info: i a",
        "This is the query image. Q? Output the final answer including its name."]
    with pytest.raises(Exception, match="needs caption.conversation: repic"):
        conversation_of(q, database, conversation="ours", prompt="zero_shot")


def _grid_images():
    rng = np.random.default_rng(0)
    for case in _load("qwen_vl_utils_fetch_image.json")["cases"]:
        w, h = case["size"]
        arr = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
        image = Image.fromarray(arr, "RGBA")
        yield case, (image if case["mode"] == "RGBA" else image.convert(case["mode"]))


def test_fetch_image_matches_qwen_vl_utils_sizes_and_pixels():
    from repic.vlm.preprocess import fetch_image

    n = 0
    for case, image in _grid_images():
        got = fetch_image(image)
        assert list(got.size) == case["out_size"], case
        assert hashlib.sha256(got.tobytes()).hexdigest() == case["sha256"], case
        n += 1
    assert n == 47


def test_fetch_image_changes_the_token_grid_of_some_real_sizes():
    """RePIC resizes twice (fetch_image, then the processor at 1024*28*28): a 2500x2500 photo gets 32x32 merged
    tokens of 28 px, the processor alone 31x31."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from repic.vlm.preprocess import smart_resize as fetch_size

    h, w = fetch_size(2500, 2500)
    assert (h, w) == (2492, 2492)
    twice = smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=1024 * 28 * 28)
    once = smart_resize(2500, 2500, factor=28, min_pixels=3136, max_pixels=1024 * 28 * 28)
    assert twice == (896, 896) and once == (868, 868)


def test_load_for_processor_composites_rgba_on_white(tmp_path):
    from repic.vlm.preprocess import load_for_processor

    Image.new("RGBA", (30, 30), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert load_for_processor(tmp_path, "t.png", "qwen_vl_utils").getpixel((5, 5)) == (255, 255, 255)
    assert load_for_processor(tmp_path, "t.png", "processor").getpixel((5, 5)) == (255, 0, 0)  # alpha dropped


class _StandinEmbedder:
    """tools/repic_reference.py's stand-in CLIP: a 16x16 RGB thumbnail, L2-normalised."""

    name = "standin"

    def embed(self, images):
        from tools.repic_reference import standin_features

        x = np.stack([standin_features(im) for im in images]).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def _yolo_world(monkeypatch, tmp_path, boxes):
    """Our YoloWorldDetector over a stand-in ultralytics whose model returns `boxes` (RePIC's stand-in's)."""
    import torch

    class YOLO:
        def __init__(self, path):
            pass

        def set_classes(self, classes):
            pass

        def predict(self, image, conf, device, verbose):
            b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            return [types.SimpleNamespace(boxes=types.SimpleNamespace(
                xyxy=b, conf=torch.full((len(b),), 0.5), cls=torch.zeros(len(b))))]

    monkeypatch.setitem(sys.modules, "ultralytics", types.SimpleNamespace(YOLO=YOLO))
    (tmp_path / "w.pt").write_bytes(b"x")
    from repic.data.retrieval import make_detector

    return make_detector("yolo_world", classes=["human"], model_id=str(tmp_path / "w.pt"), max_boxes=300)


def test_retrieval_crops_ranks_and_empty_detection_as_repic(monkeypatch, tmp_path):
    """4-concept photos, stand-in detector and embedder: the crops RePIC's detector.py cuts, the references its
    retriever picks (no references when nothing is detected), and the images its index holds that its database
    does not list (RePIC raises a KeyError on one; ours keeps its rank and shows no reference)."""
    from repic.core.io import open_rgb
    from repic.data.retrieval import _padded, build_index, retrieve, unlisted_images

    ref = _load("repic_retrieval.json")
    root = _repic_data().parent
    db = root / "data/database_tot/database_4_concepts/database_mod.json"
    index, id_map = build_index(db, root, _StandinEmbedder(), unlisted=True)
    assert sorted(e["image"] for e in id_map) == sorted(ref["index_files"])
    assert unlisted_images(db, root) == [f"./data/database_tot/database_4_concepts/squidgame/{n}.jpg"
                                         for n in ("sim", "sky", "sunghoon")]
    seen_error = 0
    for case in ref["cases"]:
        image = open_rgb(root, case["query_image"])
        det = _yolo_world(monkeypatch, tmp_path, case["boxes"])
        crops = [image.crop(_padded(d["box"], 0, image.width, image.height)).size for d in det.detect(image)]
        assert [list(c) for c in crops] == case["crop_sizes"]
        hits = retrieve(image, index, id_map, _StandinEmbedder(), det, ref["topK"], root=root,
                        include_whole_image=False, pad=0, on_empty="no_references")
        if "references" in case:
            assert [h["image"] for h in hits] == case["references"]
            assert all(h["key"] is not None for h in hits)
        else:  # RePIC's loop in rank order; the first unlisted one is where RePIC raised
            assert [h["image"] for h in hits] == case["ranked"]
            first = next(h for h in hits if h["key"] is None)
            assert first["image"] == case["key_error"]
            seen_error += 1
    assert seen_error >= 3 and any(c["boxes"] == [] and c["references"] == [] for c in ref["cases"])


def test_retrieval_defaults_keep_ours(monkeypatch, tmp_path):
    """The embedded default: padded boxes, the whole query as a crop, the whole image when nothing is detected."""
    from repic.data.retrieval import build_index, retrieve

    root = _repic_data().parent
    db = root / "data/database_tot/database_4_concepts/database_mod.json"
    index, id_map = build_index(db, root, _StandinEmbedder())
    assert all(e["key"] is not None for e in id_map) and len(id_map) == 32
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    det = _yolo_world(monkeypatch, tmp_path, [])
    assert len(retrieve(image, index, id_map, _StandinEmbedder(), det, 2)) == 2
    assert retrieve(image, index, id_map, _StandinEmbedder(), det, 2, include_whole_image=False, pad=0,
                    on_empty="no_references") == []


def _pair(setting, gt_keys, database, root, query):
    from repic.core.io import open_rgb

    concepts = [database["concept_dict"][k] for k in gt_keys]
    return {"setting": setting, "references": [{"name": k, "info": c["info"]} for k, c in zip(gt_keys, concepts)],
            "images": [open_rgb(root, c["image"]) for c in concepts] + [query]}


@pytest.mark.parametrize("script", ["evaluation/GPT_eval_single.py", "evaluation/GPT_eval_multi.py"])
def test_judge_request_under_protocol_repic_is_repics(script):
    """System prompt, texts, image order, options (A: the baseline, B: RePIC, 'Ans:' prefixes) of RePIC's
    GPT-4o request, and the one-letter answer read back."""
    from repic.eval.judge import parse_letter, repic_request

    ref = _load("repic_judge_requests.json")[script]
    root = _repic_data().parent
    database = json.loads((root / "data/database_tot/database_2_concepts/database_mod.json").read_text())
    setting = "single" if script.endswith("single.py") else "multi2"
    query = Image.new("RGB", (8, 8), (10, 20, 30))
    pair = _pair(setting, ref["gt_keys"], database, root, query) if setting != "single" else {
        "setting": "single", "references": [{"name": "<bo>", "info": "x"}], "images": [Image.new("RGB", (4, 4)), query]}
    expected = ref["requests"][-1]["messages"]  # the zero_shot baseline (the last method of both scripts)
    messages, images = repic_request({**pair, "caption_model": ref["captions"]["zero_shot"],
                                      "caption_reference": ref["captions"]["ours"]})
    urls = [b["image_url"]["url"] for b in expected[1]["content"] if b["type"] == "image_url"]
    flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else [
        {"type": "image"} if b["type"] == "image_url" else b for b in m["content"]]} for m in expected]
    assert messages == flat
    names = [u.split("<")[1].rstrip(">") for u in urls]
    if setting == "single":
        assert names == ["./query.png"] and images == [query]
    else:
        assert names[-1] == "./query.png" and len(images) == 3 and images[-1] is query
        assert names[:2] == [database["concept_dict"][k]["image"] for k in ref["gt_keys"]]
    assert [parse_letter(a) for a in ("B", "A", " B.", "The answer is A", "a caption", "")] == [
        "B", "A", "B", "A", "invalid", "invalid"]


def test_judge_protocol_repic_asks_once_and_maps_letters(tmp_path):
    from repic.eval.judge import AnswerCache, judge_pairs

    query = Image.new("RGB", (8, 8))
    pair = {"setting": "single", "dataset": "d", "mode": "skip", "query_image": "q", "reference": "repic",
            "model": "base", "gt_keys": ["<a>"], "references": [{"name": "<a>", "info": "i"}],
            "images": [Image.new("RGB", (4, 4)), query], "caption_reference": "ours", "caption_model": "theirs"}
    asked = []

    def ask(messages, images):
        asked.append((messages, images))
        return "B"

    records = judge_pairs([pair], "test", ask, AnswerCache(tmp_path / "c.jsonl"), protocol="repic")
    assert len(asked) == 1 and asked[0][1] == [query]
    assert asked[0][0][0] == {"role": "system", "content": prompts.REPIC_JUDGE_SYSTEM}
    assert records[0]["outcome"] == "reference" and records[0]["verdict_model_first"] == "reference"


def test_paper_config_evaluates_as_repic_and_the_default_as_ours():
    import yaml

    default = yaml.safe_load((REPO / "params.yaml").read_text())
    paper = params_mod.deep_merge(default, yaml.safe_load((REPO / "configs/paper.yaml").read_text()))
    params_mod.validate(paper)
    c = paper["caption"]
    assert (c["conversation"], c["question_list"], c["preprocess"]) == ("repic", "released", "qwen_vl_utils")
    assert c["retrieval"] == {"box_pad": 0, "whole_image": False, "on_empty": "no_references"}
    assert c["prompts"] == {"base": "zero_shot"} and paper["build_db"]["index_unlisted"] is True
    assert paper["judge_llm"]["protocol"] == "repic"
    d = default["caption"]
    assert (d["conversation"], d["preprocess"], d["prompts"]) == ("ours", "processor", {})
    assert d["retrieval"] == {"box_pad": 0.1, "whole_image": True, "on_empty": "whole_image"}
    assert default["judge_llm"]["protocol"] == "both_orders" and default["build_db"]["index_unlisted"] is False


def test_row_prompts_are_checked(tmp_path):
    import yaml

    from repic.core.io import RepicError

    default = yaml.safe_load((REPO / "params.yaml").read_text())
    bad = params_mod.deep_merge(default, {"caption": {"prompts": {"nope": "zero_shot"}}})
    with pytest.raises(RepicError, match=r"caption.prompts.nope: not a model row"):
        params_mod.validate(bad)
    bad = params_mod.deep_merge(default, {"caption": {"prompts": {"base": "zero_shot"}}})
    with pytest.raises(RepicError, match=r"caption.prompts.base: 'zero_shot' needs caption.conversation: repic"):
        params_mod.validate(bad)
    bad = params_mod.deep_merge(default, {"caption": {"prompts": {"base": "fancy"}}})
    with pytest.raises(RepicError, match=r"caption.prompts.base: 'fancy' is not one of"):
        params_mod.validate(bad)


def test_an_unlisted_hit_keeps_its_rank_and_shows_no_reference(tmp_path):
    """build_db.index_unlisted: an image file the database does not list is indexed (as in RePIC's index); when it
    ranks in the top k the retriever reports it and leaves it out of the references."""
    from repic.core.io import write_json
    from repic.data.retrieval import build_index, make_embedder, save_index
    from repic.eval.retrieve import make_retriever

    colours = {"<r>": (220, 20, 20), "<g>": (20, 220, 20), "<b>": (20, 20, 220)}
    concepts = {}
    for key, rgb in colours.items():
        rel = f"./data/db/{key.strip('<>')}.png"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), rgb).save(tmp_path / rel)
        concepts[key] = {"name": key.upper(), "image": rel, "info": "i", "category": "thing"}
    Image.new("RGB", (40, 40), (230, 230, 20)).save(tmp_path / "data/db/yellow.png")  # listed nowhere
    db = tmp_path / "data/db/database_mod.json"
    write_json(db, {"concept_dict": concepts, "path_to_concept": {c["image"]: k for k, c in concepts.items()}})
    embedder = make_embedder("color_layout")
    index, id_map = build_index(db, tmp_path, embedder, unlisted=True)
    assert [e["key"] for e in id_map] == ["<r>", "<g>", "<b>", None]
    assert id_map[-1]["image"] == "./data/db/yellow.png"
    save_index(tmp_path / "index", index, id_map, {"embedder": "color_layout", "embedder_kwargs": {},
                                                   "database": str(db)})
    params = {"detector": "foreground", "detector_kwargs": {},
              "retrieval": {"box_pad": 0, "whole_image": False, "on_empty": "no_references"}}
    retrieve_keys = make_retriever(tmp_path / "index", tmp_path, params, k=2, database=db)
    query = Image.new("RGB", (120, 60), (255, 255, 255))
    query.paste((230, 230, 20), (10, 10, 50, 50))  # a yellow object: the unlisted image ranks first
    hit = retrieve_keys(query)
    assert [h["image"] for h in hit["hits"]][0] == "./data/db/yellow.png" and hit["hits"][0]["key"] is None
    assert len(hit["hits"]) == 2 and hit["keys"] == [h["key"] for h in hit["hits"][1:]]
    assert retrieve_keys(Image.new("RGB", (120, 60), (255, 255, 255))) == {"keys": [], "hits": []}
