"""The static generation backend equals HF `generate` token for token (greedy, fp32, CPU), and plugs into TRL."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from repic.core.io import RepicError
from repic.core.prompts import caption_messages
from repic.vlm.generation import generate, generate_ids, rollout_trainer, select_rows
from repic.vlm.models import load_model, load_processor


def _prompts(processor, n: int):
    """Fixed prompts of different lengths and image counts/sizes, so batches need left padding."""
    sizes = [(112, 112), (84, 140), (56, 56), (140, 84), (112, 56), (56, 112), (98, 98)]
    texts, images = [], []
    for i in range(n):
        refs = [{"name": f"<c{j}>", "info": "x" * (3 + 5 * ((i + j) % 4))} for j in range(1 + i % 2)]
        msgs = caption_messages(refs, "Caption this." + " Please." * (i % 3))
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        images.append([Image.new("RGB", sizes[(i + j) % len(sizes)], (30 * i % 255, 90, 40 * j % 255))
                       for j in range(len(refs) + 1)])
    return texts, images


def _chaotic(model):
    """Re-draw the language model's matrices at unit gain: the stock tiny model's 0.02-std init makes greedy
    decoding repeat one token whatever the context, which would hide wrong positions, masks or caches."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return _chaotic(load_model(tiny_model_dir, device="cpu", dtype="float32")), load_processor(tiny_model_dir)


def _batch(processor, texts, images):
    return processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")


@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.3, "eos_token_id": [2, 5]},
                                   {"suppress_tokens": [7, 9]}])
def test_static_greedy_equals_hf_generate_token_for_token(tiny, extra):
    model, processor = tiny
    texts, images = _prompts(processor, 5)
    inputs = _batch(processor, texts, images)
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id, **extra)
    hf = generate_ids(model, inputs, backend="hf", **kw)
    static = generate_ids(model, inputs, backend="static", **kw)
    assert static == hf
    assert sum(map(len, hf)) > 5 * 4  # the comparison covers real decoding, not just an immediate EOS


def test_static_greedy_equals_hf_generate_with_a_lora_adapter(tiny_model_dir):
    """Captions of the trained model: PEFT LoRA layers (two adapters, one active) in the static decode step."""
    from peft import get_peft_model

    from repic.core.params import lora_config

    processor = load_processor(tiny_model_dir)
    model = get_peft_model(_chaotic(load_model(tiny_model_dir, device="cpu", dtype="float32")),
                           lora_config({"r": 4, "lora_alpha": 8}))
    model.add_adapter("other", lora_config({"r": 2, "lora_alpha": 2}))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: make the adapters change the output
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.eval()
    texts, images = _prompts(processor, 4)
    inputs = _batch(processor, texts, images)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    hf = generate_ids(model, inputs, backend="hf", **kw)
    assert generate_ids(model, inputs, backend="static", **kw) == hf
    with model.disable_adapter():
        base = generate_ids(model, inputs, backend="hf", **kw)
        assert generate_ids(model, inputs, backend="static", **kw) == base
    assert base != hf  # the adapter changes the captions, so the comparison covers its path


def _lora_model(tiny_model_dir):
    from peft import get_peft_model

    from repic.core.params import lora_config

    torch.manual_seed(0)  # PEFT draws A from the global generator: the same adapter whatever ran before
    model = get_peft_model(_chaotic(load_model(tiny_model_dir, device="cpu", dtype="float32")),
                           lora_config({"r": 4, "lora_alpha": 8}))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: make the adapter change the output
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_functional_decode_step_equals_hf_generate(tiny_model_dir, monkeypatch, attention):
    """The compiled step's functions (run uncompiled here: `torch.compile` is the identity) and the matmul attention
    give `generate`'s tokens, LoRA adapter included; stats say the step used them. (The matmul attention sums in
    another order than sdpa: equal within 1e-6 below, and on these fixed weights no greedy choice is that close.)"""
    from repic.vlm import generation

    q, k, v = torch.randn(3, 2, 4, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    mask = torch.rand(3, 1, 1, 40) > 0.3
    assert torch.allclose(generation._attend_matmul(q, k, v, mask, 0.25), generation._attend_sdpa(q, k, v, mask, 0.25),
                          atol=1e-6)

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(generation, "_COMPILED", {})
    processor = load_processor(tiny_model_dir)
    model = _lora_model(tiny_model_dir)
    texts, images = _prompts(processor, 4)
    inputs = _batch(processor, texts, images)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
              repetition_penalty=1.2)
    hf = generate_ids(model, inputs, backend="hf", **kw)
    stats: dict = {}
    assert generate_ids(model, inputs, backend="static", stats=stats, decode_compile=True,
                        decode_attention=attention, **kw) == hf
    assert stats["compiled"] and stats["compile_error"] is None
    assert generate_ids(model, inputs, backend="static", decode_compile=False, decode_attention=attention, **kw) == hf


def _dropout_runner(tiny_model_dir):
    """generate_ids on a LoRA model with dropout 0.5 (and strong adapters), `keep_mode`, greedy, seeded: run(backend,
    train=True, **options) -> (tokens, stats)."""
    from peft import get_peft_model

    from repic.core.params import lora_config

    processor = load_processor(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(_chaotic(load_model(tiny_model_dir, device="cpu", dtype="float32")),
                           lora_config({"r": 4, "lora_alpha": 8, "lora_dropout": 0.5}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 2.0)
    texts, images = _prompts(processor, 3)
    inputs = _batch(processor, texts, images)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)

    def run(backend, train=True, **options):
        model.train(train)
        torch.manual_seed(7)
        stats: dict = {}
        return generate_ids(model, inputs, backend=backend, stats=stats, keep_mode=True, **kw, **options), stats

    return run


def test_functional_decode_step_drops_lora_inputs_as_peft_in_training_mode(tiny_model_dir, monkeypatch):
    """GRPO rollouts with LoRA dropout (`keep_mode`, the model in training mode): the compiled step's functions (run
    uncompiled here) drop each adapter's input as PEFT's forward does, one mask per adapter drawn in the eager
    step's order: the same tokens as the eager step and as `generate` from the same seed, and other tokens than
    the same run without dropout (so the masks are really drawn)."""
    from repic.vlm import generation

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(generation, "_COMPILED", {})
    run = _dropout_runner(tiny_model_dir)
    compiled, stats = run("static", decode_compile=True)
    assert stats["compiled"] and stats["compile_error"] is None
    assert compiled == run("static", decode_compile=False)[0] == run("hf")[0]
    assert compiled != run("static", train=False, decode_compile=True)[0]


def test_prefill_autocast_computes_lora_as_the_all_bf16_model(tiny_model_dir):
    """`prefill_autocast` (the GRPO rollouts' prefill on CUDA): a bf16 model with PEFT's fp32 adapters prefills
    exactly as the same model with its adapters cast to bf16 (RePIC's DeepSpeed bf16 model), and as its decode step
    computes them; without it the prefill's LoRA products are fp32 and its logits differ (the test can fail)."""
    import copy

    from repic.vlm.generation import _core, _prefill, _prompt_positions

    processor = load_processor(tiny_model_dir)
    model = _lora_model(tiny_model_dir).to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # PEFT's default with a bf16 base: fp32 adapters
    repic_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    inputs = _batch(processor, *_prompts(processor, 3))
    core, ref_core = _core(model), _core(repic_bf16)
    with torch.inference_mode():
        positions = _prompt_positions(core, inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cache, logits = _prefill(core, inputs, positions)
        ref_cache, ref_logits = _prefill(ref_core, inputs, positions)
        _, fp32_logits = _prefill(core, inputs, positions)
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
               for a, b in zip(cache.layers, ref_cache.layers))
    assert not torch.equal(fp32_logits, ref_logits)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    assert generate_ids(model, inputs, backend="static", prefill_autocast=True, **kw) == \
        generate_ids(repic_bf16, inputs, backend="static", **kw)


def _assert_same_cache(cache, batched, mask):
    """`cache` holds the padded batch's keys and values where the rows hold tokens (within fp32 rounding), zeros
    in the pad slots."""
    for a, b in zip(batched.layers, cache.layers):
        keep = mask[:, None, :, None].expand_as(a.keys)
        assert torch.allclose(b.keys[keep], a.keys[keep], atol=1e-5) and not b.keys[~keep].any()
        assert torch.allclose(b.values[keep], a.values[keep], atol=1e-5)


@pytest.mark.parametrize("mode", ["rows", "rows_vision_once"])
def test_prefill_by_rows_equals_the_padded_batch(tiny, mode):
    """A padded batch prefilled one unpadded prompt at a time (its images encoded per prompt, or the whole batch's
    in one tower call first): the same cache where the rows hold tokens, the same last logits (within fp32
    rounding: unmasked vs masked attention) and `generate`'s tokens."""
    from repic.vlm.generation import _prefill, _prompt_positions

    model, processor = tiny
    texts, images = _prompts(processor, 4)
    inputs = _batch(processor, texts, images)
    mask = inputs["attention_mask"].bool()
    assert not mask.all()  # the batch is padded, so the per-row path runs
    tower_calls = []  # images per vision-tower call
    hook = model.model.visual.register_forward_pre_hook(lambda m, a, k: tower_calls.append(len(k["grid_thw"])),
                                                        with_kwargs=True)
    try:
        with torch.inference_mode():
            positions = _prompt_positions(model, inputs)
            batched, logits = _prefill(model, inputs, positions, "batch")
            assert tower_calls == [len(inputs["image_grid_thw"])]
            rows, row_logits = _prefill(model, inputs, positions, mode)
    finally:
        hook.remove()
    per_prompt = [int(n) for n in ((inputs["input_ids"] == model.config.vision_start_token_id) & mask).sum(1)]
    assert tower_calls[1:] == ([sum(per_prompt)] if mode == "rows_vision_once" else per_prompt)
    assert torch.allclose(row_logits, logits, atol=1e-4, rtol=1e-4)
    _assert_same_cache(rows, batched, mask)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    assert generate_ids(model, inputs, backend="static", prefill_rows=True,
                        prefill_vision_once=mode == "rows_vision_once", **kw) == \
        generate_ids(model, inputs, backend="hf", **kw)


def test_packed_prefill_equals_the_padded_batch(tiny):
    """A padded batch prefilled as one forward of its prompts' real tokens packed into one row (`prefill_packed`,
    each prompt attending to its own): the padded batch's cache where the rows hold tokens (zeros in the pad slots)
    and last logits within fp32 rounding, `generate`'s tokens; the decoder layers see one row of the real tokens."""
    from repic.train.speed import disable_packing, enable_packing
    from repic.vlm.generation import _prefill, _prompt_positions

    model, processor = tiny
    texts, images = _prompts(processor, 4)
    inputs = _batch(processor, texts, images)
    mask = inputs["attention_mask"].bool()
    assert not mask.all()
    with torch.inference_mode():
        positions = _prompt_positions(model, inputs)
        batched, logits = _prefill(model, inputs, positions, "batch")
        with pytest.raises(RepicError, match="enable_packing"):
            _prefill(model, inputs, positions, "packed")
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    want = generate_ids(model, inputs, backend="hf", **kw)
    enable_packing(model)
    widths = []  # the first decoder layer's input: [rows, positions]
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: widths.append(tuple((a[0] if a else k["hidden_states"]).shape[:2])), with_kwargs=True)
    try:
        with torch.inference_mode():
            packed, packed_logits = _prefill(model, inputs, positions, "packed")
        assert widths == [(1, int(mask.sum()))]
        assert torch.allclose(packed_logits, logits, atol=1e-4, rtol=1e-4)
        _assert_same_cache(packed, batched, mask)
        stats: dict = {}
        assert generate_ids(model, inputs, backend="static", prefill_packed=True, stats=stats, **kw) == want
        assert stats["prefill"] == "packed"
        # G copies of each prompt (grouping `grpo`): the distinct prompts packed, the cache expanded for the decode
        assert generate_ids(model, inputs, backend="static", prefill_packed=True, repeats=2, **kw) == \
            [row for row in want for _ in range(2)]
        with pytest.raises(RepicError, match="prefill_packed excludes"):
            generate_ids(model, inputs, backend="static", prefill_packed=True, prefill_vision_once=True, **kw)
    finally:
        hook.remove()
        disable_packing(model)


def test_shared_prefixes_prefilled_once_equal_the_padded_batch(tiny):
    """Prompts that begin alike (the same first references, as RePIC's conversations of one photo), prefilled one at
    a time from the cache of the prompt before them (`rows_prefix`): the padded batch's cache and last logits within
    fp32 rounding, `generate`'s tokens, and the language model runs fewer tokens (only each prompt's own suffix;
    an image is shared whole or not at all, the tower encoding only the suffixes' images)."""
    from repic.vlm.generation import _prefill, _prompt_positions, _prompt_units

    model, processor = tiny
    texts, images, _ = _recurring(processor, 6)
    # two more prompts: one equal to the first but for its query image, one a duplicate of the second
    texts += [texts[0], texts[1]]
    images += [images[0][:-1] + [images[1][-1]], list(images[1])]
    inputs = _batch(processor, texts, images)
    mask = inputs["attention_mask"].bool()
    units, _ = _prompt_units(inputs, model.config)
    query = max(i for i, u in enumerate(units[0]) if u < 0)  # the query image's unit: the last image
    assert units[6][:query] == units[0][:query] and units[6][query] != units[0][query] and units[7] == units[1]
    fed, encoded = [], []
    lm = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: fed.append(k["inputs_embeds"].shape[1]), with_kwargs=True)
    tower = model.model.visual.register_forward_pre_hook(lambda m, a, k: encoded.append(len(k["grid_thw"])),
                                                         with_kwargs=True)
    try:
        with torch.inference_mode():
            positions = _prompt_positions(model, inputs)
            batched, logits = _prefill(model, inputs, positions, "batch")
            fed.clear()
            encoded.clear()
            shared, shared_logits = _prefill(model, inputs, positions, "rows_prefix")
    finally:
        lm.remove()
        tower.remove()
    tokens = [int(n) for n in mask.sum(1)]
    assert len(fed) == 8 and sum(fed) < sum(tokens) - 200  # the common beginnings ran once
    assert sorted(fed)[0] == 1  # the duplicate: only its last token
    assert sum(encoded) < sum(map(len, images))
    assert torch.allclose(shared_logits, logits, atol=1e-4, rtol=1e-4)
    _assert_same_cache(shared, batched, mask)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    assert generate_ids(model, inputs, backend="static", prefill_rows=True, prefill_prefix=True, **kw) == \
        generate_ids(model, inputs, backend="hf", **kw)


def test_compile_failure_decodes_eagerly_with_a_warning(tiny, monkeypatch):
    from repic.vlm import generation

    def broken(fn, **kw):
        def run(*args, **kwargs):
            raise RuntimeError("no compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(generation, "_COMPILED", {})
    model, processor = tiny
    texts, images = _prompts(processor, 3)
    inputs = _batch(processor, texts, images)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    stats: dict = {}
    with pytest.warns(UserWarning, match="decoding eagerly"):
        static = generate_ids(model, inputs, backend="static", stats=stats, decode_compile=True, **kw)
    assert static == generate_ids(model, inputs, backend="hf", **kw)
    assert not stats["compiled"] and "no compiler" in stats["compile_error"]
    with pytest.raises(RepicError, match="decode_attention: expected one of sdpa|matmul"):
        generate_ids(model, inputs, backend="static", decode_attention="flash", **kw)


@pytest.mark.slow
def test_compiled_decode_step_equals_hf_generate(tiny_model_dir):
    """Inductor-compiled layer functions (CPU C++ backend here; Triton on CUDA) give `generate`'s tokens."""
    processor = load_processor(tiny_model_dir)
    model = _lora_model(tiny_model_dir)
    texts, images = _prompts(processor, 3)
    inputs = _batch(processor, texts, images)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    stats: dict = {}
    static = generate_ids(model, inputs, backend="static", stats=stats, decode_compile=True, **kw)
    assert stats["compiled"], stats["compile_error"]
    assert static == generate_ids(model, inputs, backend="hf", **kw)
    # training mode, LoRA dropout active (GRPO rollouts): compiled too; inductor draws its own masks, so the
    # tokens are not the eager step's, but they are not the undropped model's either
    run = _dropout_runner(tiny_model_dir)
    dropped, stats = run("static", decode_compile=True)
    assert stats["compiled"], stats["compile_error"]
    assert dropped != run("static", train=False, decode_compile=True)[0]


def test_static_runs_past_eos_rows_and_without_eos(tiny):
    """Rows that stop early keep stopped while others go on; with no EOS every row runs max_new_tokens."""
    model, processor = tiny
    texts, images = _prompts(processor, 3)
    inputs = _batch(processor, texts, images)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    first = generate_ids(model, inputs, backend="hf", **kw)
    # make a token that the greedy rows produce an EOS: rows stop at different steps
    eos = first[0][min(3, len(first[0]) - 1)]
    assert generate_ids(model, inputs, backend="static", eos_token_id=eos, **kw) == \
        generate_ids(model, inputs, backend="hf", eos_token_id=eos, **kw)
    model.generation_config.eos_token_id, saved = None, model.generation_config.eos_token_id
    try:
        rows = generate_ids(model, inputs, backend="static", **kw)
    finally:
        model.generation_config.eos_token_id = saved
    assert [len(r) for r in rows] == [20, 20, 20]


def test_generate_captions_equal_across_backends_and_batch_sizes(tiny):
    model, processor = tiny
    texts, images = _prompts(processor, 7)
    hf = generate(model, processor, texts, images, backend="hf", max_new_tokens=16, batch_size=3)
    assert generate(model, processor, texts, images, backend="static", max_new_tokens=16, batch_size=3) == hf
    assert generate(model, processor, texts, images, backend="static", max_new_tokens=16, batch_size=7) == hf


def _recurring(processor, n: int):
    """Conversations whose references come from a small database (the same image objects, as the caption stage's
    loader gives) and whose query images recur too, as in RePIC's 4-concept evaluation."""
    pool = [Image.new("RGB", size, (40 * i, 200 - 30 * i, 90)) for i, size in
            enumerate([(112, 84), (56, 112), (112, 84), (140, 56)])]  # two of a size: the content tells them apart
    queries = [Image.new("RGB", (98, 84), (10, 90 * i, 200)) for i in range(2)]
    texts, images = [], []
    for i in range(n):
        refs = [(i + j) % len(pool) for j in range(1 + i % 3)]
        msgs = caption_messages([{"name": f"<c{r}>", "info": "x" * (3 + 4 * r)} for r in refs], "Caption this.")
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        images.append([pool[r] for r in refs] + [queries[i % 2]])
    return texts, images, len(pool) + len(queries)


@pytest.mark.parametrize("prefill", ["batch", "rows", "rows_vision_once"])
def test_features_once_same_captions_each_distinct_image_encoded_once(tiny, prefill):
    """Captioning with the tower's features kept across batches (`features_once`): the same tokens as HF `generate`
    (RePIC's path, every image encoded in every prompt), while the tower encodes each distinct image once over all
    batches; the cache is gone after the call."""
    model, processor = tiny
    texts, images, distinct = _recurring(processor, 8)
    shown = sum(map(len, images))
    assert (shown, distinct) == (23, 6)
    encoded = []
    hook = model.model.visual.register_forward_pre_hook(lambda m, a, k: encoded.append(len(k["grid_thw"])),
                                                        with_kwargs=True)
    kw = dict(max_new_tokens=16, batch_size=3)
    try:
        hf = generate(model, processor, texts, images, backend="hf", **kw)
        assert sum(encoded) == shown
        encoded.clear()
        once = generate(model, processor, texts, images, backend="static", features_once=True,
                        prefill_rows=prefill != "batch", prefill_vision_once=prefill == "rows_vision_once", **kw)
        assert sum(encoded) == distinct
        encoded.clear()
        every = generate(model, processor, texts, images, backend="static", features_once=False, **kw)
        assert sum(encoded) == shown
    finally:
        hook.remove()
    assert once == hf == every
    assert len(set(hf)) > 1  # captions depend on the images and text, so a wrong feature would show
    assert not hasattr(model.model, "_repic_feature_cache")
    with pytest.raises(RepicError, match="features_once needs backend 'static'"):
        generate(model, processor, texts, images, backend="hf", features_once=True, **kw)


def test_repeats_share_one_prefill_and_sampling_is_seeded(tiny):
    model, processor = tiny
    texts, images = _prompts(processor, 2)
    inputs = _batch(processor, texts, images)
    kw = dict(max_new_tokens=12, pad_token_id=processor.tokenizer.pad_token_id)
    greedy = generate_ids(model, inputs, backend="static", repeats=3, do_sample=False, **kw)
    assert greedy == [r for r in generate_ids(model, inputs, backend="hf", do_sample=False, **kw) for _ in range(3)]
    torch.manual_seed(0)
    a = generate_ids(model, inputs, backend="static", repeats=4, do_sample=True, temperature=1.5, **kw)
    torch.manual_seed(0)
    b = generate_ids(model, inputs, backend="static", repeats=4, do_sample=True, temperature=1.5, **kw)
    assert a == b and len(a) == 8
    assert len({tuple(r) for r in a[:4]}) > 1  # the 4 samples of one prompt differ


def test_select_rows_keeps_each_prompts_images(tiny):
    model, processor = tiny
    texts, images = _prompts(processor, 3)
    inputs = _batch(processor, texts, images)
    one = select_rows(inputs, [1], model.config)
    alone = _batch(processor, [texts[1]], [images[1]])
    assert torch.equal(one["input_ids"], alone["input_ids"])
    assert torch.equal(one["pixel_values"], alone["pixel_values"])
    assert torch.equal(one["image_grid_thw"], alone["image_grid_thw"])


def test_unsupported_options_are_refused_not_ignored(tiny):
    model, processor = tiny
    texts, images = _prompts(processor, 1)
    inputs = _batch(processor, texts, images)
    with pytest.raises(RepicError, match="no_repeat_ngram_size"):
        generate_ids(model, inputs, backend="static", max_new_tokens=4, no_repeat_ngram_size=2)
    with pytest.raises(RepicError, match="top_p"):
        generate_ids(model, inputs, backend="static", max_new_tokens=4, do_sample=True, top_p=0.9)
    with pytest.raises(RepicError, match="expected one of hf|static"):
        generate_ids(model, inputs, backend="vllm", max_new_tokens=4)


def test_grpo_rollouts_through_static_backend(tiny_model_dir, tmp_path):
    """One GRPO step of TRL's trainer with rollouts from the static backend (G=4, LoRA)."""
    from datasets import Dataset
    from peft import get_peft_model
    from trl import GRPOTrainer

    from repic.core.params import grpo_config, lora_config

    processor = load_processor(tiny_model_dir)
    model = get_peft_model(load_model(tiny_model_dir, device="cpu").train(), lora_config({"r": 4, "lora_alpha": 8}))
    examples = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Is it {c}?"}]}],
                 "images": [Image.new("RGB", (56, 84), c)]} for c in ("red", "blue")]
    args = grpo_config({"num_generations": 4, "per_device_train_batch_size": 4, "max_completion_length": 8,
                        "max_steps": 1, "logging_steps": 1, "beta": 0.04, "loss_type": "grpo"}, tmp_path,
                       use_cpu=True)
    calls = []

    def length_reward(completions, **kwargs):
        calls.append(len(completions))
        return [float(len(c[0]["content"])) for c in completions]

    trainer = rollout_trainer(GRPOTrainer)(model=model, reward_funcs=[length_reward], args=args,
                                           train_dataset=Dataset.from_list(examples), processing_class=processor)
    assert type(trainer).__name__ == "StaticGRPOTrainer"
    trainer.train()
    assert calls == [4]
    assert model.training  # the trainer's modes come back after the eval-mode rollouts


def test_the_benchmarks_4_concept_workload_is_repics(tmp_path):
    """bench/repic4_workload.json (bench/perf.py's captioning workload) is what bench/make_repic4_workload.py makes
    from RePIC's own 4-concept query map and database, and its conversations are RePIC's skip-retrieval references:
    the ground-truth keys of each subset in `concept_dict` order (`skip_references`), the query photo last."""
    import importlib.util
    import json

    from repic.eval.captioning import skip_references

    from .conftest import REPO, SHARED, need_shared

    data = need_shared(SHARED / "repic_eval/data", "RePIC's 4-concept query map and database")
    spec = importlib.util.spec_from_file_location("make_repic4", REPO / "bench/make_repic4_workload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(str(data), str(tmp_path / "w.json"))
    made = json.loads((tmp_path / "w.json").read_text())
    assert made == json.loads((REPO / "bench/repic4_workload.json").read_text())
    database = json.loads((data / "database_tot/database_4_concepts/database_mod.json").read_text())
    subsets = [s for q in json.loads((data / "query_tot/4_concept_query_templates.json").read_text()).values()
               for s in q]
    assert [p[:-1] for p in made["prompts"]] == [skip_references(s, database, "repic") for s in subsets]
    assert (len(made["prompts"]), sum(map(len, made["prompts"])), len(made["images"])) == (105, 525, 35)
