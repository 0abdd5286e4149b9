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
