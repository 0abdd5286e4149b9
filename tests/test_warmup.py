"""The embedded base's warm-up pieces (repic.synthetic.warmup, tiny_model): what each example teaches, exactly."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from repic.core.io import RepicError
from repic.synthetic import warmup as W
from repic.synthetic.tiny_model import build_tiny_model, check_single_tokens
from repic.synthetic.world import make_concepts

from .conftest import TINY_MODEL

WORLD = dict(seed=0, n_concepts=12, n_train_concepts=None)


def test_naming_drills_teach_how_to_name_not_whether():
    """A drill's answer is a naming caption's opening up to one name's `<` (given, no loss), its target that name's
    rest with no end of turn; 1, 2 and 4 references in turn, one image each and the scene; names come from the
    warm-up pool, never the world's, and the prompt holds the name the drill must copy."""
    evaluation, training = make_concepts(0, 12, 12)
    world = {c.key for c in [*evaluation, *training]}
    pool = set(W.warmup_names(0, 50, avoid=world))
    drills = W.naming_drills(**WORLD, n=8, n_names=50, n_distractors=2, image_size=64)
    assert [len(d["images"]) - 1 for d in drills] == [1, 1, 2, 4] * 2
    for d in drills:
        text = "".join(c["text"] for m in d["messages"] for c in m["content"] if c["type"] == "text")
        names = [part.split(",")[0] for part in text.split("Name: ")[1:]]
        key = "<" + d["target"]
        assert d["eos"] is False and key in names and set(names) <= pool and not set(names) & world
        assert d["prefix"] == W.caption_opening(names, names.index(key))
    again = W.naming_drills(**WORLD, n=8, n_names=50, n_distractors=2, image_size=64)
    assert [d["target"] for d in again] == [d["target"] for d in drills]  # seeded
    assert W.caption_opening(["<a>", "<b>", "<c>", "<d>"], 3) == "<a>, <b>, <c> and <"
    assert W.caption_opening(["<a>", "<b>"], 1) == "<a> and <"


def test_batch_puts_loss_on_the_answer_only(tiny_model_dir):
    """Labels cover the target (and the end of turn unless `eos` is False), never the prompt or the prefix."""
    from repic.vlm.models import load_processor

    processor = load_processor(tiny_model_dir)
    tok = processor.tokenizer
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Name: <zorp>, Info: a red toy."}]}]
    batch = W._batch(processor, [{"messages": msgs, "images": None, "prefix": "<", "target": "zorp>", "eos": False},
                                 {"messages": msgs, "images": None, "target": "yes"}])
    labelled = [tok.decode([t for t in row.tolist() if t != -100]) for row in batch["labels"]]
    assert labelled == ["zorp>", "yes" + tok.eos_token]


def test_answer_loss_is_the_models_loss(tiny_model_dir):
    """`answer_loss` (the output layer at the labelled positions only) is `model(**batch).loss`, gradients
    included, on image batches of drills and captions with right padding; so is `answer_loss` of the batch split
    by number of images (`_batches`, what the warm-up trains on), with the patch embedding as a matrix product
    (`patch_embedding_as_matmul`, the warm-up's) or as the model's convolution."""
    from repic.vlm.models import load_model, load_processor

    processor = load_processor(tiny_model_dir)
    model = load_model(tiny_model_dir, device="cpu", dtype="float32").train()
    matmul = load_model(tiny_model_dir, device="cpu", dtype="float32").train()
    W.patch_embedding_as_matmul(matmul)
    drills = W.naming_drills(**WORLD, n=4, n_names=20, n_distractors=2, image_size=64)
    examples = W.warmup_examples(**WORLD, n_distractors=2, image_size=64, n_names=20, name_rate=0.3,
                                 name_rate_asked=0.9, n_examples=3)
    for items in (drills, examples):
        batch = W._batch(processor, items)
        assert (batch["attention_mask"] == 0).any()  # padded rows: their positions carry no label
        parts = W._batches(processor, items)
        assert len(parts) == len({len(e["images"] or ()) for e in items}) > 1
        assert sum(len(p["input_ids"]) for p in parts) == len(items)
        assert sum(int((p["labels"] != -100).sum()) for p in parts) == int((batch["labels"] != -100).sum())
        grads = []
        for m, loss_of, inputs in ((model, lambda b: model(**b).loss, batch),
                                   (model, partial(W.answer_loss, model), batch),
                                   (model, partial(W.answer_loss, model), parts),
                                   (matmul, partial(W.answer_loss, matmul), parts)):
            m.zero_grad()
            loss = loss_of(inputs)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
        (ref, ref_grads), *ours = grads
        for loss, our_grads in ours:
            torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
            assert len(our_grads) == len(ref_grads)
            for a, b in zip(our_grads, ref_grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()) + 1e-7)


def test_judge_examples_follow_the_judges_rule():
    """Captions naming the references beat generic ones, generic beats naming absent concepts, equals tie."""
    judge = W.warmup_examples(**WORLD, n_distractors=2, image_size=64, n_examples=40, n_names=50, name_rate=0.3,
                              name_rate_asked=0.9, kinds=("judge",), tag="judge")
    assert {e["target"] for e in judge} == {"A", "B", "tie"}
    for e in judge:
        text = e["messages"][0]["content"][-1]["text"]
        names = [c["text"].split("Name: ")[1].split(",")[0] for c in e["messages"][0]["content"]
                 if c["type"] == "text" and "Name: " in c["text"]]
        a = text.split("Caption A: ")[1].split("\nCaption B: ")[0]
        b = text.split("Caption B: ")[1].split("\n")[0]
        score = [sum(n in cap for n in names) - (cap.startswith("<") and not any(n in cap for n in names))
                 for cap in (a, b)]
        assert e["target"] == ("A" if score[0] > score[1] else "B" if score[1] > score[0] else "tie"), (a, b)


def test_names_share_a_direction_of_their_embeddings(tmp_path):
    """Name tokens' embeddings have a common part (cosine share^2/(1+share^2) on average), other tokens none;
    every row keeps the scale of `embedding_std`."""
    names = [f"<{n}>" for n in ("zorp", "blik", "trar", "vuma", "kriga", "pilok")]
    texts = [" ".join(names * 40) + " This is the query image. a red toy"]
    cfg = {**TINY_MODEL, "embedding_std": 0.15, "name_share": 1.0}
    out = build_tiny_model(tmp_path / "m", texts, cfg, seed=0, names=names)
    check_single_tokens(out, names)
    from repic.vlm.models import load_model, load_processor

    tok = load_processor(out).tokenizer
    emb = load_model(out, device="cpu", dtype="float32").get_input_embeddings().weight.detach()
    ids = torch.tensor([tok(n.strip("<>"))["input_ids"][0] for n in names])
    others = torch.tensor([tok(w)["input_ids"][0] for w in ("This", "query", "image", "red", "toy", ".")])

    def mean_cos(rows: torch.Tensor) -> float:
        e = torch.nn.functional.normalize(emb[rows], dim=1)
        c = e @ e.mT
        return float((c.sum() - c.diagonal().sum()) / (len(rows) * (len(rows) - 1)))

    assert mean_cos(ids) == pytest.approx(0.5, abs=0.12)
    assert abs(mean_cos(others)) < 0.15
    assert float(emb[ids].norm(dim=1).mean()) == pytest.approx(float(emb[others].norm(dim=1).mean()), rel=0.2)


def test_a_vocab_too_small_for_one_token_names_is_a_clear_error(tmp_path):
    names = [f"<{n}>" for n in W.warmup_names(0, 300, avoid=set())]
    out = build_tiny_model(tmp_path / "m", [" ".join(names)], {**TINY_MODEL, "vocab_size": 300}, seed=0)
    with pytest.raises(RepicError, match=r"fetch_data\.tiny_model\.vocab_size: .* raise vocab_size"):
        check_single_tokens(out, names)


def test_warmup_bytes_do_not_depend_on_the_machines_thread_count(tiny_model_dir, tmp_path):
    """The thread count splits matrix products and reductions differently (float sums in another order: 1 and 4
    threads gave different bytes on a 2-core x86 machine); `threads` fixes it for the warm-up whatever torch's
    setting is, and gives that setting back."""
    import hashlib
    import shutil

    def warmed(torch_threads: int) -> str:
        model = tmp_path / f"t{torch_threads}"
        shutil.copytree(tiny_model_dir, model)
        examples = W.warmup_examples(**WORLD, n_distractors=2, image_size=64, n_names=20, name_rate=0.3,
                                     name_rate_asked=0.9, n_examples=16)
        before = torch.get_num_threads()
        torch.set_num_threads(torch_threads)
        try:
            W.warmup(model, examples, steps=6, batch_size=4, learning_rate=1e-3, seed=0, threads=1)
            assert torch.get_num_threads() == torch_threads
        finally:
            torch.set_num_threads(before)
        return hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()

    assert warmed(4) == warmed(1)
