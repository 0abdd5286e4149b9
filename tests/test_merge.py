"""The merge stage's verification: the merged checkpoint reloads to base+adapter's logits, or nothing is left."""

import pytest
from PIL import Image

from repic.core.io import RepicError
from repic.core.prompts import caption_messages
from repic.train.merge import check, merge_and_verify


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from repic.core.params import LANGUAGE_MODEL_LINEAR
    from repic.vlm.models import load_model

    # init_lora_weights=False: a non-zero B, so the adapter really changes the logits.
    model = get_peft_model(load_model(tiny_model_dir, device="cpu"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_MODEL_LINEAR,
                                      init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def _conversations():
    return [(caption_messages([{"name": "<zorp>", "info": "a red toy"}], "Caption this."),
             [Image.new("RGB", (56, 56), (200, 30 * i, 0)), Image.new("RGB", (84, 56), "white")]) for i in range(2)]


def test_merged_checkpoint_matches_adapter(tiny_model_dir, adapter, tmp_path):
    report = merge_and_verify(tiny_model_dir, adapter, tmp_path / "merged", _conversations(),
                              tolerance={"float32": 1e-4, "bfloat16": 0.25}, max_new_tokens=6, device="cpu")
    assert report["ok"] and report["captions_identical_fp32"] and report["float32"]["n_caption_mismatches"] == 0
    assert report["float32"]["max_abs_logit_diff"] < 1e-4
    for key in ("float32", "bfloat16", "bfloat16_repic"):  # the tolerance's measure: relative to the logits' scale
        cell = report[key]
        assert cell["max_abs_logit"] > 0
        assert cell["relative_logit_diff"] == cell["max_abs_logit_diff"] / max(1.0, cell["max_abs_logit"])
    assert 0 < report["bfloat16"]["relative_logit_diff"] <= 0.25  # bf16 rounding of W + BA is visible
    assert report["bfloat16_repic"]["max_abs_logit_diff"] > 0  # RePIC's bf16 merge, reported beside ours
    assert report["device"] == "cpu" and report["saved_dtype"] == "float32"
    assert report["peak_memory_mb"]["process_peak_rss_mb"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging or temporary folder left
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "processor_config.json").is_file()
    check(report)


def test_merged_checkpoint_keeps_the_base_dtype(tiny_model_dir, adapter, tmp_path):
    """A bf16 base (Qwen2.5-VL-7B's checkpoint) gives a bf16 merged checkpoint: the fp32 merge cast once."""
    from safetensors import safe_open

    from repic.vlm.models import load_model, load_processor

    base = tmp_path / "base_bf16"
    load_model(tiny_model_dir, device="cpu", dtype="bfloat16").save_pretrained(base)
    load_processor(tiny_model_dir).save_pretrained(base)
    report = merge_and_verify(base, adapter, tmp_path / "merged", _conversations(),
                              tolerance={"float32": 1e-4, "bfloat16": 0.25}, max_new_tokens=6, device="cpu")
    assert report["saved_dtype"] == "bfloat16"
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    # ours rounds W + BA once; RePIC's bf16 merge rounds BA, then W + BA: never closer to base+adapter here
    assert report["bfloat16"]["max_abs_logit_diff"] <= report["bfloat16_repic"]["max_abs_logit_diff"]
    assert report["ok"]


def test_merge_above_tolerance_fails_and_leaves_nothing(tiny_model_dir, adapter, tmp_path):
    report = merge_and_verify(tiny_model_dir, adapter, tmp_path / "merged", _conversations(),
                              tolerance={"float32": 1e-4, "bfloat16": 0.0}, max_new_tokens=6, device="cpu")
    assert not report["ok"] and not report["bfloat16"]["ok"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RepicError, match="bfloat16"):
        check(report)


def test_adapter_checked_against_the_base_before_any_work(tiny_model_dir, adapter, tmp_path, monkeypatch):
    """An adapter made for another base (other shapes) or targeting layers the base lacks: one line naming both
    folders, from the files' headers, before the caption stage reads anything (its captioning is never reached)."""
    import shutil

    from safetensors.torch import load_file, save_file

    import stages.caption as caption
    from repic.vlm.models import check_adapter

    check_adapter(adapter, tiny_model_dir)  # a fitting adapter passes
    tensors = load_file(adapter / "adapter_model.safetensors")
    name = sorted(k for k in tensors if k.endswith("q_proj.lora_A.weight"))[0]
    wrong = tmp_path / "wrong_shape"
    shutil.copytree(adapter, wrong)
    r, width = tensors[name].shape
    save_file({**tensors, name: tensors[name].new_zeros(r, width * 2)}, wrong / "adapter_model.safetensors")
    with pytest.raises(RepicError, match=rf"^{wrong}: this LoRA adapter does not fit the base model "
                       rf"{tiny_model_dir} \(1 of {len(tensors)} matrices; made for .*\), e\.g\. .*q_proj\.lora_A "
                       rf"\[{r}, {width * 2}\] needs in_features {width * 2}, the base's weight is \[\d+, {width}\]$"):
        check_adapter(wrong, tiny_model_dir)
    missing = tmp_path / "missing_layer"
    shutil.copytree(adapter, missing)
    renamed = {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.nope_proj"): v for k, v in tensors.items()}
    save_file(renamed, missing / "adapter_model.safetensors")
    with pytest.raises(RepicError, match=r"\(2 of .* matrices; .*nope_proj: no such linear layer in the base$"):
        check_adapter(missing, tiny_model_dir)

    import stages.merge_lora as merge_stage

    from .conftest import REPO

    monkeypatch.setattr(merge_stage, "merge_and_verify", lambda *a, **k: pytest.fail("reached the merge"))
    with pytest.raises(RepicError, match="this LoRA adapter does not fit the base model"):
        merge_stage.main(["--params", str(REPO / "params.yaml"), "--model", str(tiny_model_dir), "--adapter",
                          str(wrong), "--root", str(tmp_path), "--out", str(tmp_path / "merged")])
    monkeypatch.setattr(caption, "run_setting", lambda *a, **k: pytest.fail("reached the captioning"))
    with pytest.raises(RepicError, match="this LoRA adapter does not fit the base model"):
        caption.main(["--setting", "single", "--root", str(tmp_path), "--retrieval", str(tmp_path), "--row", "x",
                      "--base-model", str(tiny_model_dir), "--adapter", str(wrong), "--out", str(tmp_path / "o"),
                      "--queries", "q.json", "--database", "d.json"])
def _scaled_merge(monkeypatch, factor):
    """A wrong merge: every LoRA delta merged `factor` times (the forward of base+adapter is untouched)."""
    from peft.tuners.lora.layer import Linear

    right = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, adapter: factor * right(self, adapter))


def test_a_wrong_merge_fails_on_captions_and_leaves_nothing(tiny_model_dir, adapter, tmp_path, monkeypatch):
    """With the logit check out of the way (tolerances no check can exceed), the caption check alone must catch a
    merge that adds the LoRA delta 4 times: the reference captions are base+adapter's, taken before any merge.
    (Before issue 24 they were the merged model's own, `merge_and_unload` having merged in place: this failed.)"""
    _scaled_merge(monkeypatch, 4.0)
    report = merge_and_verify(tiny_model_dir, adapter, tmp_path / "merged", _conversations(),
                              tolerance={"float32": 1e9, "bfloat16": 1e9}, max_new_tokens=6, device="cpu")
    assert not report["captions_identical_fp32"] and not report["ok"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RepicError, match="float32 captions"):
        check(report)


def test_a_wrong_merge_fails_on_logits(tiny_model_dir, adapter, tmp_path, monkeypatch):
    _scaled_merge(monkeypatch, 1.5)
    report = merge_and_verify(tiny_model_dir, adapter, tmp_path / "merged", _conversations(),
                              tolerance={"float32": 1e-4, "bfloat16": 0.25}, max_new_tokens=6, device="cpu")
    assert not report["float32"]["ok"] and report["float32"]["max_abs_logit_diff"] > 1e-2
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RepicError, match="float32"):
        check(report)


def test_repics_merge_is_bf16_on_cuda_with_merge_and_unload():
    """What `bfloat16_repic` reproduces (README, Fidelity to RePIC): RePIC's lora_merge.ipynb loads the base in
    bf16 on CUDA, applies the adapter with PeftModel and merges with merge_and_unload, with no check after."""
    import json

    from .conftest import SHARED, need_shared

    notebook = need_shared(SHARED / "repic_training/lora_merge.ipynb", "RePIC's training code")
    code = "\n".join("".join(c["source"]) for c in json.loads(notebook.read_text())["cells"]
                     if c["cell_type"] == "code")
    assert "torch_dtype=torch.bfloat16" in code and "device_map='cuda'" in code
    assert "PeftModel.from_pretrained(base_model, lora_model_id)" in code
    assert "model = model.merge_and_unload()" in code and "model.save_pretrained(output_path)" in code
    assert "logits" not in code and "generate" not in code
