import torch
from PIL import Image

from repic.core.prompts import caption_messages
from repic.eval.captioning import build_conversation, caption_rows
from repic.eval.queries import Query, expand_queries
from repic.vlm.generation import generate_captions
from repic.vlm.models import ImageQwenVLProcessor, load_model, load_processor


def test_tiny_model_round_trips_through_from_pretrained(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    model = load_model(tiny_model_dir, device="cpu")
    assert model.config.model_type == "qwen2_5_vl"
    text_cfg = model.config.text_config
    head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
    assert sum(text_cfg.rope_parameters["mrope_section"]) == head_dim // 2
    processor = load_processor(tiny_model_dir)
    assert isinstance(processor, ImageQwenVLProcessor)
    assert processor.tokenizer.padding_side == "left"


def test_load_processor_keeps_the_pil_image_processor_where_transformers_picks_torchvision(tiny_model_dir,
                                                                                        monkeypatch):
    """transformers 5 loads its torchvision image processor wherever torchvision is installed (GPU machines; none
    here): load_processor swaps in the PIL one (RePIC's transformers 4.49 default), with the checkpoint's config."""
    plain = ImageQwenVLProcessor.from_pretrained(str(tiny_model_dir))
    assert plain.image_processor.backend == "pil"  # no torchvision here

    class Torchvision:  # what transformers would load beside torchvision
        backend = "torchvision"

    loaded = ImageQwenVLProcessor.from_pretrained

    def with_torchvision(path, **kwargs):
        processor = loaded(path, **kwargs)
        processor.image_processor = Torchvision()
        return processor

    monkeypatch.setattr(ImageQwenVLProcessor, "from_pretrained", with_torchvision)
    processor = load_processor(tiny_model_dir)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.image_processor.to_dict() == plain.image_processor.to_dict()
    assert processor.tokenizer.padding_side == "left"


def test_processor_expands_image_tokens(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    messages = caption_messages([{"name": "<zorp>", "info": "a red toy"}], "Caption this.")
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count("<|image_pad|>") == 2 and text.endswith("<|im_start|>assistant\n")
    images = [Image.new("RGB", (112, 112), "red"), Image.new("RGB", (56, 112), "blue")]
    batch = processor(text=[text], images=images, return_tensors="pt")
    n_pad = int((batch["input_ids"] == processor.image_token_id).sum())
    # 112x112 -> 8x8 patches of 14 px -> 16 tokens after the 2x2 merge; 56x112 -> 8 tokens.
    assert n_pad == 16 + 8


def test_greedy_batched_equals_one_by_one(tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu")
    processor = load_processor(tiny_model_dir)
    convs = []
    for i, size in enumerate([(112, 112), (84, 140), (56, 56)]):
        msgs = caption_messages([{"name": f"<c{i}>", "info": "x" * (5 + 7 * i)}], "Caption this.")
        convs.append((msgs, [Image.new("RGB", size, (40 * i, 90, 200)), Image.new("RGB", (112, 112), "white")]))
    torch.manual_seed(0)
    batched = generate_captions(model, processor, convs, batch_size=3, max_new_tokens=8)
    single = [generate_captions(model, processor, [c], batch_size=1, max_new_tokens=8)[0] for c in convs]
    assert batched == single


def test_expand_queries_one_row_per_4_concept_subset():
    qmap = {"./data/q.png": [["<a>", "<b>", "<c>", "<d>"], ["<a>", "<b>", "<c>", "<e>"]]}
    queries = expand_queries(qmap, "multi4")
    assert [q.gt_keys for q in queries] == qmap["./data/q.png"]
    assert queries[0].question != queries[1].question  # questions rotate
    rows = caption_rows(queries, ["cap1", "cap2"])
    assert rows[1] == ["./data/q.png", ["<a>", "<b>", "<c>", "<e>"], "cap2", queries[1].question]


def test_conversation_has_references_then_query(tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("a", "q"):
        Image.new("RGB", (60, 60), "red").save(tmp_path / "data" / f"{name}.png")
    database = {"concept_dict": {"<a>": {"name": "A", "image": "./data/a.png", "info": "red", "category": "toy"}},
                "path_to_concept": {"./data/a.png": "<a>"}}
    msgs, images = build_conversation(Query("./data/q.png", ["<a>"], "Q?", ref_keys=["<a>"]), database, tmp_path)
    texts = [b["text"] for b in msgs[1]["content"] if b["type"] == "text"]
    assert texts == ["1. Name: <a>, Info: red\n", "This is the query image. Q?"]
    assert len(images) == 2


def test_caption_images_read_and_preprocessed_once_give_the_same_pixels_and_captions(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    """A caption stage's images: each file read and resized once (`load_for_processor`'s cache), each image
    object preprocessed once (`images_processed_once`); the processor's pixels and the captions are those of the
    uncached path, and a rewritten file is read again."""
    import numpy as np

    from repic.eval.captioning import caption_all
    from repic.vlm import generation, preprocess
    from repic.vlm.image_memo import images_processed_once

    real_generate_ids = generation.generate_ids

    rng = np.random.RandomState(3)
    (tmp_path / "data").mkdir()
    sizes = {"a.jpg": (150, 90), "b.png": (64, 200), "c.png": (120, 120), "q1.jpg": (180, 140), "q2.png": (70, 70)}
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "data" / name)
    database = {"concept_dict": {f"<{k}>": {"name": k.upper(), "image": f"./data/{k}.{'jpg' if k == 'a' else 'png'}",
                                           "info": f"the {k} thing", "category": "toy"} for k in "abc"}}
    subsets = [["<a>", "<b>"], ["<b>", "<c>"], ["<a>", "<c>"], ["<a>", "<b>", "<c>"]]
    queries = [Query(f"./data/q{1 + i % 2}.{'jpg' if i % 2 == 0 else 'png'}", s, "Who is here?", ref_keys=s)
               for i, s in enumerate(subsets)]
    model, processor = load_model(tiny_model_dir, device="cpu"), load_processor(tiny_model_dir)
    n_images = sum(len(q.ref_keys) + 1 for q in queries)  # 13 images, 5 files

    seen: list = []  # what the model gets, batch by batch
    monkeypatch.setattr(generation, "generate_ids", lambda m, inputs, **kw: seen.append(
        {k: v.clone() for k, v in inputs.items()}) or real_generate_ids(m, inputs, **kw))
    for kind in ("qwen_vl_utils", "processor"):
        preprocess.LOADED.clear()
        monkeypatch.setattr(preprocess.LOADED, "max_bytes", 0)  # nothing kept: every image read again
        plain = [build_conversation(q, database, tmp_path, preprocess=kind) for q in queries]
        assert (preprocess.LOADED.decoded, preprocess.LOADED.requested) == (n_images, n_images)
        monkeypatch.setattr(preprocess.LOADED, "max_bytes", preprocess.CACHE_BYTES)
        preprocess.LOADED.clear()
        cached = [build_conversation(q, database, tmp_path, preprocess=kind) for q in queries]
        assert (preprocess.LOADED.decoded, preprocess.LOADED.requested) == (5, n_images)
        assert cached[0][1][0] is cached[2][1][0]  # <a>: one object
        texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in plain]
        want = processor(text=texts, images=[ims for _, ims in plain], return_tensors="pt", padding=True)
        with images_processed_once(processor) as memo:
            for _ in range(2):
                got = processor(text=texts, images=[ims for _, ims in cached], return_tensors="pt", padding=True)
                assert got.keys() == want.keys()
                for key in want:
                    assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
            assert (memo.processed, memo.requested) == (5, 2 * n_images)
        assert type(processor.image_processor).__mro__[1].__name__ != type(processor.image_processor).__name__
        gen = dict(batch_size=3, max_new_tokens=6)
        seen.clear()
        expected = generate_captions(model, processor, plain, **gen)
        model_saw, seen[:] = list(seen), []
        rows = caption_all(model, processor, {"skip": queries}, database, tmp_path, preprocess=kind, **gen)
        assert [r[2] for r in rows["skip"]] == expected
        assert len(seen) == len(model_saw) == 2 and "pixel_values" in seen[0]
        for got, want in zip(seen, model_saw):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert (preprocess.LOADED.decoded, preprocess.LOADED.requested) == (5, 2 * n_images)

    # a rewritten file (other size and time) is read again, not taken from the cache
    before = preprocess.load_for_processor(tmp_path, "./data/b.png", "qwen_vl_utils")
    Image.new("RGB", (64, 200), (9, 9, 9)).save(tmp_path / "data" / "b.png")
    after = preprocess.load_for_processor(tmp_path, "./data/b.png", "qwen_vl_utils")
    assert before.getpixel((3, 3)) != (9, 9, 9) and after.getpixel((3, 3)) == (9, 9, 9)
