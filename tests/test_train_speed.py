"""The training levers of repic.train.speed give the losses and LoRA gradients of TRL's own path (fp32, CPU).

Each test builds the same LoRA model twice, computes the reference log-probs (adapter disabled, as TRL does) and
the GRPO loss + backward of one batch through TRL's `_compute_loss` with and without the lever, and compares.
The batch is padded both ways: three different prompts (1-2 images of different sizes, so left padding) with
completions of 5, 2 and 4 tokens (right padding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from repic.train.speed import fast_trainer


def _model(model_dir, dropout: float, dtype: str = "float32"):
    from peft import get_peft_model

    from repic.core.params import lora_config
    from repic.vlm.models import load_model, load_processor

    torch.manual_seed(0)
    model = get_peft_model(load_model(model_dir, device="cpu", dtype=dtype).train(),
                           lora_config({"r": 4, "lora_alpha": 8, "lora_dropout": dropout}))
    with torch.no_grad():  # B = 0 would leave the gradient of A zero and hide a wrong forward
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    processor = load_processor(model_dir)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 224 * 336}
    return model, processor


def _trainer(model_dir, tmp_path, *, dropout=0.0, checkpointing=False, bf16=False, **levers):
    from datasets import Dataset
    from trl import GRPOTrainer

    from repic.core.params import grpo_config
    from repic.vlm.generation import rollout_trainer

    model, processor = _model(model_dir, dropout, "bfloat16" if bf16 else "float32")
    args = grpo_config({"num_generations": 3, "per_device_train_batch_size": 3, "max_completion_length": 6,
                        "max_steps": 1, "beta": 0.04, "loss_type": "grpo", "seed": 0, "bf16": bf16,
                        "gradient_checkpointing": checkpointing}, tmp_path / str(len(list(tmp_path.iterdir()))),
                       use_cpu=True)
    example = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it?"}]}],
               "images": [Image.new("RGB", (56, 56), "red")]}
    trainer = fast_trainer(rollout_trainer(GRPOTrainer), **levers)(
        model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=args,
        train_dataset=Dataset.from_list([example]), processing_class=processor)
    # what Trainer.train sets up before compute_loss (checkpointing: as TRL re-enables it after each reference pass)
    trainer.current_gradient_accumulation_steps = 1
    if checkpointing:
        trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
    return trainer


def _batch(processor):
    rng = np.random.RandomState(0)

    def noise(w, h):
        return Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))

    questions = [(2, "Is it the same toy?"), (1, "Where is it? Give its box, in detail please."), (2, "Name it.")]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * n
                                             + [{"type": "text", "text": q}]}], add_generation_prompt=True,
                                           tokenize=False) for n, q in questions]
    images = [[noise(224, 336), noise(112, 112)], [noise(168, 112)], [noise(140, 84), noise(84, 140)]]
    prompt = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    lengths = [5, 2, 4]
    completion_mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    completion = torch.randint(5, 200, completion_mask.shape, generator=torch.Generator().manual_seed(3))
    completion = completion.masked_fill(completion_mask == 0, processor.tokenizer.pad_token_id)
    return {"prompt_ids": prompt["input_ids"], "prompt_mask": prompt["attention_mask"],
            "completion_ids": completion, "completion_mask": completion_mask,
            "advantages": torch.tensor([1.0, -0.5, 0.3]), "num_items_in_batch": completion_mask.sum(),
            "pixel_values": prompt["pixel_values"], "image_grid_thw": prompt["image_grid_thw"],
            "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion)], 1),
            "num_images": [2, 1, 2]}


def _step(trainer):
    """Reference log-probs (adapter disabled, no grad, as TRL's rollout step computes them), then the loss and the
    LoRA gradients of `_compute_loss`."""
    from trl.trainer.utils import use_adapter

    inputs = _batch(trainer.processing_class)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    fields = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids")}
    with torch.no_grad(), use_adapter(trainer.model, None):
        ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, ids.shape[1] - len(
            inputs["prompt_ids"][0]), batch_size=3, **fields)
    inputs["ref_per_token_logps"] = ref
    trainer.model.zero_grad()
    torch.manual_seed(5)  # LoRA dropout's masks
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return ref, loss.detach(), grads


def _assert_same(got, want, atol=1e-6):
    ref, loss, grads = got
    ref_want, loss_want, grads_want = want
    assert torch.allclose(ref, ref_want, atol=atol, rtol=1e-6)
    assert loss.item() == pytest.approx(loss_want.item(), rel=1e-6, abs=1e-7)
    assert grads.keys() == grads_want.keys() and len(grads) > 0
    scale = max(float(g.abs().max()) for g in grads_want.values())
    assert scale > 0
    for name, g in grads.items():
        assert torch.allclose(g, grads_want[name], atol=atol * scale, rtol=1e-5), name


def test_without_gradient_checkpointing_same_losses_and_gradients(tiny_model_dir, tmp_path):
    """TRL's `gradient_checkpointing: false`: no recompute in the backward, the same loss and gradients (LoRA
    dropout on: checkpointing replays the masks)."""
    results = []
    for checkpointing in (True, False):
        trainer = _trainer(tiny_model_dir, tmp_path, dropout=0.05, checkpointing=checkpointing)
        mlp = trainer.model.get_base_model().model.language_model.layers[0].mlp
        calls = []  # (a recompute runs the forward without its module hooks: count the forward itself)
        mlp.forward = lambda x, mlp=mlp, calls=calls: calls.append(1) or type(mlp).forward(mlp, x)
        results.append(_step(trainer))
        # reference + policy forward, and the backward's recompute of the layer when checkpointing
        assert len(calls) == (3 if checkpointing else 2)
    _assert_same(results[1], results[0], atol=1e-7)


def test_autocast_lora_same_losses_and_gradients(tiny_model_dir, tmp_path):
    """bf16 weights, fp32 adapters (PEFT's default), bf16 autocast (TRL's `bf16: true`; here on the CPU), gradient
    checkpointing on: LoRA inputs left in bf16 give bit for bit the reference log-probs, loss and LoRA gradients of
    PEFT's cast to fp32 (autocast casts them back for the products). Dropout off: the CPU's bf16 dropout rounds its
    scale to bf16 (CUDA's computes in fp32, as the cast path does: checked on the card by bench/perf.py)."""
    from repic.train.speed import lora_inputs_cast

    results, kept = [], []
    for lever in (False, True):
        trainer = _trainer(tiny_model_dir, tmp_path, checkpointing=True, bf16=True, autocast_lora=lever)
        assert trainer.accelerator.mixed_precision == "bf16"
        layer = trainer.model.get_base_model().model.language_model.layers[0].self_attn.q_proj
        assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
        seen = []
        layer.lora_A["default"].register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].dtype))
        results.append(_step(trainer))
        kept.append(set(seen))
        if lever:  # outside autocast PEFT's cast runs: the adapter gets fp32 inputs
            x = torch.randn(2, layer.in_features, dtype=torch.bfloat16)
            seen.clear()
            layer(x)
            assert seen == [torch.float32]
            lora_inputs_cast(trainer.model)
            assert "_cast_input_dtype" not in vars(layer)
    assert kept == [{torch.float32}, {torch.bfloat16}]
    ref, loss, grads = results[1]
    ref_want, loss_want, grads_want = results[0]
    assert torch.equal(ref, ref_want) and torch.equal(loss, loss_want)
    assert grads.keys() == grads_want.keys() and len(grads) > 0
    assert all(g.dtype == torch.float32 and g.abs().max() > 0 for g in grads.values())
    for name, g in grads.items():
        assert torch.equal(g, grads_want[name]), name


def _rows(inputs, rows):
    """The batch's `rows` as TRL's split hands them to `_compute_loss`: still padded to the whole batch's width."""
    grid = inputs["image_grid_thw"]
    first = [0, *np.cumsum(inputs["num_images"]).tolist()]
    starts = [0, *grid.prod(-1).cumsum(0).tolist()]
    out = {k: inputs[k][rows] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                        "advantages", "mm_token_type_ids", "ref_per_token_logps")}
    out["pixel_values"] = torch.cat([inputs["pixel_values"][starts[first[r]]:starts[first[r + 1]]] for r in rows])
    out["image_grid_thw"] = torch.cat([grid[first[r]:first[r + 1]] for r in rows])
    out["num_images"] = [inputs["num_images"][r] for r in rows]
    out["num_items_in_batch"] = out["completion_mask"].sum()
    return out


def test_trim_padding_same_losses_and_gradients(tiny_model_dir, tmp_path):
    """`trim_padding`: the reference forward in chunks of 2 rows ordered by length, each cut to its own longest row,
    and the policy forward of a micro-batch of the two shorter rows (padded to the batch's width, as TRL splits it)
    cut to its own: the reference log-probs of every row, the loss and the LoRA gradients of the padded path
    within fp32 rounding, while the model sees narrower inputs. LoRA dropout off: its masks are drawn over the
    input's shape, so a narrower input draws other masks (of the same distribution) for the same tokens."""
    from trl.trainer.utils import use_adapter

    results, widths = [], []
    for lever in (False, True):
        trainer = _trainer(tiny_model_dir, tmp_path, trim_padding=lever)
        seen = []
        trainer.model.get_base_model().register_forward_pre_hook(
            lambda m, a, k, seen=seen: seen.append(tuple(k["input_ids"].shape)), with_kwargs=True)
        inputs = _batch(trainer.processing_class)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        fields = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids")}
        with torch.no_grad(), use_adapter(trainer.model, None):
            ref, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, mask, inputs["completion_ids"].shape[1], batch_size=2, **fields)
        inputs["ref_per_token_logps"] = ref
        micro = _rows(inputs, [1, 2])
        trainer.model.zero_grad()
        torch.manual_seed(5)
        loss = trainer._compute_loss(trainer.model, micro)
        loss.backward()
        results.append((ref, loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                             if p.requires_grad}))
        widths.append(seen)
    batch = _batch(trainer.processing_class)
    prompts, completions = batch["prompt_mask"].sum(1).tolist(), batch["completion_mask"].sum(1).tolist()
    full = batch["prompt_ids"].shape[1] + batch["completion_ids"].shape[1]
    assert widths[0] == [(2, full), (1, full), (2, full)]  # TRL's chunks in row order, every one the batch's width
    shorter = sorted(range(3), key=lambda r: prompts[r] + completions[r])[:2]
    # ordered by length: the two shorter rows in one chunk, cut to its longest prompt + longest completion; the
    # longest row alone, whole; the micro-batch of rows 1-2 cut to its own
    assert widths[1][:2] == [(2, max(prompts[r] for r in shorter) + max(completions[r] for r in shorter)),
                             (1, full)]
    assert widths[1][2] == (2, max(prompts[1:]) + max(completions[1:])) and widths[1][2][1] < full
    _assert_same(results[1], results[0], atol=1e-5)


def test_packed_forwards_same_losses_and_gradients(tiny_model_dir, tmp_path):
    """`packed`: the reference forward and the policy forward (gradient checkpointing on: the backward replays the
    packed attention) run the decoder layers on one row of the batch's real tokens, each row attending to its own
    positions only; the reference log-probs, the loss and the LoRA gradients are the padded path's within fp32
    rounding. A forward with a KV cache (a rollout's) is not packed, and `disable_packing` restores SDPA."""
    from repic.train.speed import PACKED, disable_packing, packed_forwards

    results, shapes = [], []
    for lever in (False, True):
        trainer = _trainer(tiny_model_dir, tmp_path, checkpointing=True, packed=lever)
        lm = trainer.model.get_base_model().model.language_model
        seen = []
        lm.layers[0].register_forward_pre_hook(lambda m, a, k, seen=seen: seen.append(
            tuple((a[0] if a else k["hidden_states"]).shape[:2])), with_kwargs=True)
        results.append(_step(trainer))
        shapes.append(seen)
    batch = _batch(trainer.processing_class)
    real = int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
    width = batch["prompt_ids"].shape[1] + batch["completion_ids"].shape[1]
    assert shapes == [[(3, width), (3, width)], [(1, real), (1, real)]]
    _assert_same(results[1], results[0], atol=1e-5)

    assert lm.config._attn_implementation == PACKED
    ids = batch["prompt_ids"][:1, -4:]  # text only: a cached forward, as a rollout's, inside the block
    with torch.no_grad(), packed_forwards(trainer.model):
        out = trainer.model(input_ids=ids, use_cache=True)
    assert out.past_key_values is not None and seen[-1] == (1, 4)
    disable_packing(trainer.model)
    assert lm.config._attn_implementation == "sdpa" and "forward" not in vars(lm)


@pytest.mark.parametrize("release", ["2.10", "2.11", "2.13"])
def test_packed_attention_calls_each_torch_releases_varlen_attn(monkeypatch, release):
    """On CUDA `packed` attention runs torch's `varlen_attn`, whose arguments changed across releases (2.10:
    `is_causal`, no scale; 2.11: `window_size`, `scale`; 2.12+: also `enable_gqa`). A stand-in with each release's
    signature (per-row causal products inside, asserting how it is called) gives the per-row path's output for
    grouped keys: the adapter asks for causal attention, the model's scale, and repeats the key heads where the
    release cannot group them."""
    import torch.nn.functional as F

    from repic.train import speed

    def per_row(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        assert q.shape[1] == k.shape[1] or release == "2.13"
        assert max_q == max_k == 5 and torch.equal(cu_q, cu_k)
        cuts = cu_q.tolist()
        return torch.cat([F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, scale=scale,
            enable_gqa=True).transpose(0, 1) for a, b in zip(cuts, cuts[1:])])

    def v210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal
        return per_row(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)

    def v211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
             window_size=(-1, -1)):
        assert window_size == (-1, 0)
        return per_row(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)

    def v213(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
             window_size=(-1, -1), enable_gqa=False):
        assert window_size == (-1, 0) and enable_gqa
        return per_row(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)

    monkeypatch.setattr(speed, "_varlen_attn", lambda: {"2.10": v210, "2.11": v211, "2.13": v213}[release])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 9, 8, generator=g) for h in (4, 2, 2))
    bounds = torch.tensor([0, 4, 9], dtype=torch.int32)
    module = type("Attention", (), {"num_key_value_groups": 2})()
    scaling = 8 ** -0.5  # the model's (2.10 takes none: its default is the same)
    out = {}
    for kernel in ("varlen", "rows"):
        monkeypatch.setitem(speed.PACKED_ATTENTION, "kernel", kernel)
        out[kernel], _ = speed.packed_attention(module, q, k, v, None, dropout=0.0, scaling=scaling,
                                                cu_seq_lens_q=bounds, max_length_q=5)
    assert out["rows"].shape == (1, 9, 4, 8)
    torch.testing.assert_close(out["varlen"], out["rows"])


def test_micro_batches_by_length_draw_as_trl_and_restore_its_shuffle():
    """`by_length` draws TRL's permutation (the generator advances as TRL's shuffle advances it) and orders the
    rows by length, every field alike; `micro_batches_by_length` swaps it in for TRL's shuffle and back."""
    import trl.trainer.grpo_trainer as grpo
    from trl.trainer.utils import shuffle_sequence_dict

    from repic.train.speed import by_length, micro_batches_by_length

    lengths = [5, 3, 8, 3, 6, 1]
    prompt_mask = torch.tensor([[0] * (8 - n) + [1] * n for n in lengths])
    batch = {"prompt_mask": prompt_mask, "completion_mask": torch.ones(6, 2, dtype=torch.long),
             "row": torch.arange(6), "pixel_values": [torch.full((n, 3), float(i)) for i, n in enumerate(lengths)],
             "num_items_in_batch": torch.tensor(12)}
    torch.manual_seed(3)
    out = by_length(batch)
    after = torch.rand(1)
    torch.manual_seed(3)
    trl_out = shuffle_sequence_dict(batch)
    assert torch.rand(1) == after  # one randperm, as TRL's
    rows = out["row"].tolist()
    assert [lengths[r] for r in rows] == sorted(lengths) and sorted(rows) == list(range(6))
    # ties (the two rows of 3) in TRL's shuffled order
    tied = [r for r in trl_out["row"].tolist() if lengths[r] == 3]
    assert [r for r in rows if lengths[r] == 3] == tied
    assert all(int(pv[0, 0]) == r for pv, r in zip(out["pixel_values"], rows))
    assert torch.equal(out["prompt_mask"], prompt_mask[rows]) and out["num_items_in_batch"] == 12
    with micro_batches_by_length():
        assert grpo.shuffle_sequence_dict is by_length
    assert grpo.shuffle_sequence_dict is shuffle_sequence_dict


def test_memo_content_key_reads_arrays_in_memory_order():
    """The memo's key of an image array: its bytes as they lie (a channel-first view of a channel-last buffer, as
    the processor passes them, needs no transposing copy), equal for equal arrays, other for one changed pixel; an
    array with no memory order (a broadcast) is keyed by a contiguous copy."""
    from repic.vlm.image_memo import _content_key

    hwc = np.random.RandomState(0).randint(0, 256, (40, 30, 3), dtype=np.uint8)
    view = hwc.transpose(2, 0, 1)
    order, digest = _content_key(view)
    assert order == (1, 2, 0) and _content_key(hwc.copy().transpose(2, 0, 1)) == (order, digest)
    changed = hwc.copy()
    changed[5, 7, 1] ^= 1
    assert _content_key(changed.transpose(2, 0, 1))[1] != digest
    row = np.arange(30, dtype=np.uint8)
    wide = np.broadcast_to(row, (4, 30))
    assert _content_key(wide) == _content_key(np.tile(row, (4, 1)))
    assert _content_key(np.broadcast_to(row[::-1], (4, 30))) != _content_key(wide)


def test_preprocess_once_gives_the_processors_patches(tiny_model_dir, tmp_path):
    """Each distinct image (by content) preprocessed once, in threads: the same pixel values and grids as the
    processor's own; its saved config is unchanged."""
    from repic.vlm.image_memo import memoize_image_processor
    from repic.vlm.models import load_processor

    rng = np.random.RandomState(1)
    sizes = ((224, 336), (112, 112), (140, 84), (224, 336))  # the last: the first's size, other pixels
    pixels = [rng.randint(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    first = [Image.fromarray(p) for p in pixels]
    again = [Image.fromarray(p.copy()) for p in pixels[:2]]  # the same content, other objects (a dataset re-read)
    texts = ["<|vision_start|><|image_pad|><|vision_end|>a"] * 5
    calls = [[[first[0]], [first[1]], [again[0]], [first[2]], [again[1]]], [[again[1]], [first[3]], [first[0]]]]
    plain, memoized = load_processor(tiny_model_dir), load_processor(tiny_model_dir)
    memo = memoize_image_processor(memoized.image_processor, workers=2)
    for images in calls:
        want = plain(text=texts[:len(images)], images=images, return_tensors="pt", padding=True)
        got = memoized(text=texts[:len(images)], images=images, return_tensors="pt", padding=True)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
        arrays = memoized(text=texts[:len(images)], images=images, return_tensors="np", padding=True)
        assert all(isinstance(arrays[k], np.ndarray) and np.array_equal(arrays[k], want[k].numpy()) for k in want)
    assert (memo.requested, memo.processed) == (16, 4)
    # a call with more distinct images than the memo held: the memo grows to hold them, so a second call of the
    # same images (TRL's second of a step) processes none
    many = [Image.fromarray(rng.randint(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(memo.capacity + 3)]
    for _ in range(2):
        memoized.image_processor(many, return_tensors="pt")
    assert memo.processed == 4 + len(many) and memo.capacity == len(many)
    plain.save_pretrained(tmp_path / "plain")
    memoized.save_pretrained(tmp_path / "memo")
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "memo").iterdir()) and "processor_config.json" in names
    for name in names:
        assert (tmp_path / "memo" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
