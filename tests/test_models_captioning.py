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
