"""configs/paper.yaml: one documented overlay selects the paper recipe; the built trainer configs carry it."""

import shutil

import yaml

from repic.params import apply_overlay, load_params
from repic.train import LANGUAGE_MODEL_LINEAR, grpo_config, lora_config

from .conftest import REPO


def test_paper_overlay_builds_the_paper_recipe(tmp_path):
    params_path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_path)
    apply_overlay(params_path, REPO / "configs" / "paper.yaml")
    params = load_params(params_path)  # still valid against the schema
    train = params["train_grpo_lora"]
    args = grpo_config({**train["grpo"], "bf16": False, "report_to": "none"}, tmp_path, use_cpu=True)
    assert args.num_generations == 8 and args.temperature == 1.0
    assert args.beta == 0.04 and args.loss_type == "grpo" and args.scale_rewards == "group"
    assert args.learning_rate == 1e-5 and args.num_train_epochs == 2
    assert args.per_device_train_batch_size == 8 and args.gradient_accumulation_steps == 2
    assert args.max_completion_length == 256 and args.gradient_checkpointing
    assert train["grpo"]["bf16"] is True
    lora = lora_config(train["lora"])
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (64, 128, 0.05)
    assert lora.target_modules == LANGUAGE_MODEL_LINEAR
    assert params["subset_2k"]["n_samples"] == 2000 and params["base"]["dtype"] == "bfloat16"
    assert train["launch"].startswith("accelerate launch --config_file configs/accelerate/zero2.yaml")
    # the paper's five evaluation sets, each with its own database; the embedded default's other keys survive
    assert [d["name"] for d in params["base"]["data"]["datasets"]] == [
        "myvlm", "yollava", "dreambooth", "2_concepts", "4_concepts"]
    assert len({d["database"] for d in params["base"]["data"]["datasets"]}) == 5
    default = yaml.safe_load((REPO / "params.yaml").read_text())["fetch_data"]
    assert params["fetch_data"] == {**default, "source": "real", "sources": {}}


def test_paper_fetch_without_pinned_sources_stops_with_a_clear_error(tmp_path):
    import pytest

    from repic.io import RepicError
    from stages.fetch_data import main

    params_path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_path)
    apply_overlay(params_path, REPO / "configs" / "paper.yaml")
    with pytest.raises(RepicError, match="fetch_data.sources is empty"):
        main(["--params", str(params_path), "--out-data", str(tmp_path / "d"), "--out-model", str(tmp_path / "m")])
    assert not (tmp_path / "d").exists() and not (tmp_path / "m").exists()
