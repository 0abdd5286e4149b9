"""The bucketed vision forward (repic/vlm/vision.py) equals transformers' Qwen2.5-VL vision tower (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from repic.vlm.vision import Layout, disable_fast_vision, enable_fast_vision, fast_vision

# (t, h, w) in patches: several windows per image, edge windows of several sizes, two images of one size (one
# full-attention bucket of two), a tall thin one, and one smaller than a window.
GRIDS = [[1, 16, 24], [1, 10, 14], [1, 8, 8], [1, 22, 6], [1, 16, 24], [1, 4, 6]]


def _tower(seed: int = 0):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vision = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=24, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3])
    config = Qwen2_5_VLConfig(vision_config=vision).vision_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    tower = Qwen2_5_VisionTransformerPretrainedModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # unit-gain weights: the stock 0.02-std init leaves attention almost uniform
        for p in tower.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 4))
    return tower


def _inputs(grids, seed: int = 1):
    grid = torch.tensor(grids)
    n = int(grid.prod(-1).sum())
    return torch.randn(n, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed)), grid


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("grids", [GRIDS, GRIDS[2:3], list(reversed(GRIDS))])
def test_bucketed_tower_equals_transformers(grids):
    tower = _tower()
    pixels, grid = _inputs(grids)
    with torch.no_grad():
        ref = tower(pixels, grid_thw=grid)
        with fast_vision(tower):
            ours = tower(pixels, grid_thw=grid)
        again = tower(pixels, grid_thw=grid)  # the context restored transformers' forward
    assert ours.pooler_output.shape == ref.pooler_output.shape
    assert torch.allclose(ours.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert _rel(ours.pooler_output, ref.pooler_output) < 1e-6
    assert torch.equal(again.pooler_output, ref.pooler_output)
    # not trivially equal: features differ between images and between positions of one image
    assert ref.pooler_output.std(0).mean() > 0.1


def test_layout_groups_windows_by_length_and_covers_every_patch_once():
    tower = _tower()
    _, grid = _inputs(GRIDS)
    layout = Layout(tower, grid)
    lengths = [length for *_, length in layout.windows]
    assert lengths == sorted(set(lengths))  # one run per distinct window length, shortest first
    assert sum(count * length for _, _, count, length in layout.windows) == int(grid.prod(-1).sum())
    assert layout.windows[-1][3] == 64  # full windows: 4x4 merge units of 2x2 patches
    assert sorted(layout.order.tolist()) == list(range(len(layout.order)))
    patches = torch.cat([idx.reshape(-1) for idx in layout.images])
    assert sorted(patches.tolist()) == list(range(layout.n_patches))
    assert [tuple(idx.shape) for idx in layout.images] == [(1, 24), (1, 64), (1, 132), (1, 140), (2, 384)]


def test_a_wrong_window_order_is_caught():
    """Mutation check: attention across the wrong windows must change the output beyond the tolerance."""
    tower = _tower()
    pixels, grid = _inputs(GRIDS)
    with torch.no_grad():
        ref = tower(pixels, grid_thw=grid).pooler_output
        enable_fast_vision(tower)
        original = Layout.__init__

        def shifted(self, visual, grid_thw):
            original(self, visual, grid_thw)
            self.windows = [(s, e, c * 2, n // 2) for s, e, c, n in self.windows]  # halve every window

        Layout.__init__ = shifted
        try:
            bad = tower(pixels, grid_thw=grid).pooler_output
        finally:
            Layout.__init__ = original
            disable_fast_vision(tower)
    assert not torch.allclose(bad, ref, atol=1e-3)


def test_whole_model_logits_and_gradients_unchanged(tiny_model_dir):
    from repic.vlm.models import load_model, load_processor

    model, processor = load_model(tiny_model_dir, device="cpu", dtype="float32"), load_processor(tiny_model_dir)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 224 * 336}  # several windows
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Hi."}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    images = [Image.effect_noise((224, 336), 60).convert("RGB"), Image.effect_noise((168, 112), 40).convert("RGB")]
    inputs = processor(text=[text], images=[images], return_tensors="pt")
    assert len(Layout(model.model.visual, inputs["image_grid_thw"]).windows) > 1

    def run():
        model.zero_grad()
        logits = model(**inputs).logits
        logits.float().square().mean().backward()
        return logits.detach(), model.model.visual.blocks[0].attn.qkv.weight.grad.clone()

    ref_logits, ref_grad = run()
    with fast_vision(model):
        logits, grad = run()
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_compiled_blocks_equal_transformers_and_do_not_recompile_per_size():
    """`compile=True` (inductor, dynamic shapes) gives the same output; a second set of sizes reuses the graphs."""
    tower = _tower()
    first, second = _inputs(GRIDS), _inputs(GRIDS[:3], seed=3)
    with torch.no_grad():
        refs = [tower(p, grid_thw=g).pooler_output for p, g in (first, second)]
        with fast_vision(tower, compile=True):
            outs = [tower(p, grid_thw=g).pooler_output for p, g in (first, second)]
    for out, ref in zip(outs, refs):
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def _lora_tiny(tiny_model_dir):
    from peft import get_peft_model

    from repic.core.params import lora_config
    from repic.vlm.models import load_model, load_processor

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_dir, device="cpu", dtype="float32").train(),
                           lora_config({"r": 4, "lora_alpha": 8}))
    processor = load_processor(tiny_model_dir)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 224 * 336}
    return model, processor


def test_image_features_once_per_group_loss_and_gradients_unchanged(tiny_model_dir):
    from repic.vlm.vision import disable_image_feature_cache, enable_image_feature_cache

    model, processor = _lora_tiny(tiny_model_dir)
    with torch.no_grad():  # B = 0 would hide a wrong feature in the gradient of A
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": t}]}
            for t in ("Is it the same?", "Name it.")]
    texts = [processor.apply_chat_template([m], add_generation_prompt=True, tokenize=False) for m in msgs]
    group = [Image.effect_noise((224, 336), 60).convert("RGB"), Image.effect_noise((168, 112), 40).convert("RGB")]
    other = [Image.effect_noise((112, 112), 30).convert("RGB"), Image.effect_noise((140, 84), 50).convert("RGB")]
    # a group of G = 3 completions of one prompt (same images) and one row of another prompt
    inputs = processor(text=[texts[0]] * 3 + [texts[1]], images=[group] * 3 + [other], return_tensors="pt",
                       padding=True, padding_side="left")

    def loss_and_grads(batch):
        model.zero_grad()
        logits = model(**batch).logits
        loss = logits.float().square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads(inputs)
    cache = enable_image_feature_cache(model)
    try:
        with torch.no_grad():  # as TRL's reference forward, before the policy's
            model(**inputs)
        assert (cache.requested_images, cache.tower_images) == (8, 4)  # each distinct image encoded once
        copy = {k: v.clone() for k, v in inputs.items()}  # TRL rebuilds pixel_values between the two passes
        loss, grads = loss_and_grads(copy)
        assert cache.tower_images == 4  # the policy forward reused the reference forward's features
    finally:
        disable_image_feature_cache(model)
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-7, rtol=1e-5), name
    # a changed image is not mistaken for a cached one
    cache = enable_image_feature_cache(model)
    try:
        with torch.no_grad():
            model(**inputs)
            changed = dict(inputs, pixel_values=inputs["pixel_values"].clone())
            changed["pixel_values"][-1, 0] += 1.0  # one value of the last image
            model(**changed)
        assert cache.tower_images == 5
    finally:
        disable_image_feature_cache(model)


def test_grpo_step_with_feature_cache_equals_without(tiny_model_dir, tmp_path, monkeypatch):
    """One TRL GRPO step through the static-rollout trainer: the same loss and the same LoRA gradients whether the
    image features are cached per group or recomputed in every pass (fp32, CPU). The step is plain SGD, so the
    adapter after it is the initial one minus lr x gradient: comparing it within a tolerance compares gradients.
    (After one Adam step a weight moves by about lr x sign(gradient): where a gradient is near zero, float noise
    between the two paths, which differs from one CPU to another, flips the sign, so the adapters compared a
    sign, not the claim.)"""
    from datasets import Dataset
    from trl import GRPOTrainer

    import repic.vlm.vision
    from repic.core.params import grpo_config
    from repic.vlm.generation import rollout_trainer

    examples = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                          {"type": "text", "text": f"Is it {c}?"}]}],
                 "images": [Image.effect_noise((224, 336), 40 + i).convert("RGB"), Image.new("RGB", (56, 84), c)]}
                for i, c in enumerate(("red", "blue"))]

    def reward(completions, **kwargs):
        return [float(len(c[0]["content"]) % 7) for c in completions]

    def run(cached: bool, out):
        if not cached:
            monkeypatch.setattr(repic.vlm.vision, "enable_image_feature_cache", lambda model: None)
        model, processor = _lora_tiny(tiny_model_dir)
        args = grpo_config({"num_generations": 4, "per_device_train_batch_size": 4, "max_completion_length": 6,
                            "max_steps": 1, "logging_steps": 1, "beta": 0.04, "loss_type": "grpo", "seed": 0,
                            "learning_rate": 1e-2, "optim": "sgd", "bf16": False}, out, use_cpu=True)
        trainer = rollout_trainer(GRPOTrainer)(model=model, reward_funcs=[reward], args=args,
                                               train_dataset=Dataset.from_list(examples), processing_class=processor)
        trainer.train()
        monkeypatch.undo()
        loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
        sgd = trainer.optimizer.optimizer  # accelerate's wrapper around torch's
        assert type(sgd).__name__ == "SGD" and sgd.param_groups[0]["momentum"] == 0
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        return loss, adapter, trainer.image_feature_cache

    loss, adapter, cache = run(True, tmp_path / "a")
    ref_loss, ref_adapter, no_cache = run(False, tmp_path / "b")
    assert no_cache is None
    # the step's one prompt (G = 4 completions) has 2 images: the rollout (under inference mode, one row per group)
    # encodes them once and the reference and policy forwards (4 rows each) reuse its features
    assert (cache.tower_images, cache.requested_images) == (2, 2 + 8 + 8)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    moved = [n for n in adapter if "lora_B" in n and ref_adapter[n].abs().max() > 0]
    assert moved  # the step did change the adapter (LoRA's B starts at 0, so B = -lr x its gradient)
    for name, value in adapter.items():
        # each tensor to 1e-4 of its largest entry: float noise is ~1e-7 relative, a wrong gradient is O(1)
        scale = float(ref_adapter[name].abs().max())
        assert torch.allclose(value, ref_adapter[name], rtol=0, atol=1e-4 * scale + 1e-12), name


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    tower = _tower()
    pixels, grid = _inputs(GRIDS[:2])

    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with torch.no_grad():
        ref = tower(pixels, grid_thw=grid).pooler_output
        with fast_vision(tower, compile=True), pytest.warns(UserWarning, match="running eagerly"):
            out = tower(pixels, grid_thw=grid).pooler_output
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
