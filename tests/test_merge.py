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
                              tolerance={"float32": 1e-4, "bfloat16": 0.5}, max_new_tokens=6)
    assert report["ok"] and report["captions_identical_fp32"]
    assert report["float32"]["max_abs_logit_diff"] < 1e-4
    assert 0 < report["bfloat16"]["max_abs_logit_diff"] <= 0.5  # bf16 rounding of W + BA is visible
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "processor_config.json").is_file()
    check(report)


def test_merge_above_tolerance_fails_and_leaves_nothing(tiny_model_dir, adapter, tmp_path):
    report = merge_and_verify(tiny_model_dir, adapter, tmp_path / "merged", _conversations(),
                              tolerance={"float32": 1e-4, "bfloat16": 0.0}, max_new_tokens=6)
    assert not report["ok"] and not report["bfloat16"]["ok"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RepicError, match="bfloat16"):
        check(report)


def test_adapter_checked_against_the_base_before_any_work(tiny_model_dir, adapter, tmp_path, monkeypatch):
    """An adapter made for another base (other shapes) or targeting layers the base lacks: one line naming both
    folders, from the files' headers, before the caption stage's retrieval pass (which is never reached)."""
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
    monkeypatch.setattr(caption, "run_setting", lambda *a, **k: pytest.fail("reached the retrieval pass"))
    with pytest.raises(RepicError, match="this LoRA adapter does not fit the base model"):
        caption.main(["--setting", "single", "--root", str(tmp_path), "--index", str(tmp_path), "--row", "x",
                      "--base-model", str(tiny_model_dir), "--adapter", str(wrong), "--out", str(tmp_path / "o"),
                      "--queries", "q.json", "--database", "d.json"])
