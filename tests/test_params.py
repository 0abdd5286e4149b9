import re
from pathlib import Path

import pytest
import yaml

from repic.core.io import RepicError
from repic.core.params import check_fields, deep_merge, load_params

from .conftest import REPO


def _write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_default_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params["fetch_data"]["source"] == "synthetic"


def test_unknown_key_is_named(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["caption"]["batchsize"] = 4
    with pytest.raises(RepicError, match=r"caption\.batchsize: unknown key"):
        load_params(_write(tmp_path, params))


def test_mistyped_value_is_named(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["subset_2k"]["n_samples"] = "many"
    with pytest.raises(RepicError, match=r"subset_2k\.n_samples: 'many' is not of type 'integer'"):
        load_params(_write(tmp_path, params))
    params["subset_2k"]["n_samples"] = 24
    params["fetch_data"]["warmup"]["learning_rate"] = "3e-3"  # what YAML makes of `learning_rate: 3e-3`
    with pytest.raises(RepicError, match=r"warmup\.learning_rate: '3e-3' is not of type 'number' \(YAML reads "
                                         r"3e-3 as a string, a number needs a dot: write 3\.0e-3\)"):
        load_params(_write(tmp_path, params))


def test_training_pixel_bounds_are_checked(tmp_path):
    """`train_grpo_lora.min_pixels`/`max_pixels` (the paper config sets RePIC's): whole numbers from 3136 up, the
    floor not above the cap."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train_grpo_lora"].update(min_pixels=20000, max_pixels=10000)
    with pytest.raises(RepicError, match=r"train_grpo_lora\.min_pixels: 20000 is above max_pixels 10000"):
        load_params(_write(tmp_path, params))
    params["train_grpo_lora"]["min_pixels"] = 100
    with pytest.raises(RepicError, match=r"train_grpo_lora\.min_pixels: 100 is less than the minimum of 3136"):
        load_params(_write(tmp_path, params))
    params["train_grpo_lora"]["min_pixels"] = 3136
    assert load_params(_write(tmp_path, params))["train_grpo_lora"]["max_pixels"] == 10000


def test_missing_section_is_named(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["score"]
    with pytest.raises(RepicError, match="'score' is a required property"):
        load_params(_write(tmp_path, params))


def test_library_sections_checked_against_dataclasses():
    from peft import LoraConfig

    check_fields("train_grpo_lora.lora", {"r": 8, "lora_alpha": 16}, LoraConfig)
    with pytest.raises(RepicError, match=r"train_grpo_lora\.lora\.rank: unknown key \(not a field of LoraConfig\)"):
        check_fields("train_grpo_lora.lora", {"rank": 8}, LoraConfig)


def test_deep_merge_overlays_nested_keys():
    merged = deep_merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"c": 3}, "d": [2]})
    assert merged == {"a": {"b": 1, "c": 3}, "d": [2]}


def test_dataset_entries_are_checked(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["data"]["datasets"][0]["queries"]["multi3"] = "q.json"
    with pytest.raises(RepicError, match=r"base\.data\.datasets\.0\.queries\.multi3: unknown key"):
        load_params(_write(tmp_path, params))
    params["base"]["data"]["datasets"][0]["queries"] = {}
    with pytest.raises(RepicError, match=r"base\.data\.datasets\.0\.queries"):
        load_params(_write(tmp_path, params))


def test_duplicate_dataset_names_are_refused():
    from repic.core.layout import eval_datasets

    one = {"name": "myvlm", "database": "d.json", "queries": {"single": "q.json"}}
    with pytest.raises(RepicError, match="dataset name 'myvlm' appears more than once"):
        eval_datasets([one, dict(one)])


def test_an_overlay_replaces_the_dataset_list():
    # lists replace on overlay, so configs/real_eval_local.yaml's five datasets do not keep `synthetic`
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    overlay = yaml.safe_load((REPO / "configs/real_eval_local.yaml").read_text())
    merged = deep_merge(base, overlay)
    assert [d["name"] for d in merged["base"]["data"]["datasets"]] == [
        "myvlm", "yollava", "dreambooth", "2_concepts", "4_concepts"]


def test_check_catches_what_the_training_stage_would(tmp_path, capsys):
    """`python -m repic.core.params check` validates GRPOConfig/LoraConfig field names and value types (YAML reads
    `1e-4` as a string) and the dataclasses' own checks, as the stage does before touching any output."""
    from repic.core.params import main

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    assert main(["check", "--params", str(_write(tmp_path, base))]) == 0
    for section, bad, message in [
        ("grpo", {"learning_rate": "1e-4"}, "train_grpo_lora.grpo.learning_rate: '1e-4' is not a number "
                                            "(GRPOConfig.learning_rate) (YAML reads 1e-4 as a string"),
        ("grpo", {"num_generation": 4}, "train_grpo_lora.grpo.num_generation: unknown key (not a field of GRPOConfig)"),
        ("grpo", {"num_generations": 3}, "train_grpo_lora.completions_per_step: 4 is not a multiple of "
                                         "grpo.num_generations (3)"),
        ("grpo", {"gradient_accumulation_steps": 2}, "train_grpo_lora.grpo.gradient_accumulation_steps: set from "
                                                     "train_grpo_lora.completions_per_step"),
        ("lora", {"r": "8"}, "train_grpo_lora.lora.r: '8' is not an integer (LoraConfig.r)"),
        ("lora", {"bias": "some"}, "train_grpo_lora.lora.bias: 'some' is not one of ['none', 'all', 'lora_only']"),
    ]:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["train_grpo_lora"][section].update(bad)
        assert main(["check", "--params", str(_write(tmp_path, params))]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train_grpo_lora"]["rewards"] = ["bleu"]
    assert main(["check", "--params", str(_write(tmp_path, params))]) == 2
    assert ("train_grpo_lora.rewards.0: 'bleu' is not one of ['object_consistency', 'visual_localization', "
            "'identity_consistency']") in capsys.readouterr().err
    with pytest.raises(RepicError, match=r"rewards\.0: 'bleu' is not one of"):  # the schema alone, no TRL import
        load_params(_write(tmp_path, params))


def test_library_sections_are_checked_when_params_load(tmp_path):
    """`load_params(..., libraries=True)` (the Snakefile, fetch_data, train_grpo_lora) checks GRPOConfig and
    LoraConfig too; the overlay's name is in the message when an overlay brings the typo."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train_grpo_lora"]["lora"]["rank"] = 8
    path = _write(tmp_path, params)
    load_params(path)  # the schema leaves library sections open
    with pytest.raises(RepicError, match=r"params.yaml: train_grpo_lora.lora.rank: unknown key \(not a field of "
                                         r"LoraConfig\)"):
        load_params(path, libraries=True)


def test_keys_dvc_run_cache_ignores_are_refused(tmp_path):
    """A key named `size`/`nfiles` anywhere (e.g. in a library's kwargs) would be left out of DVC's run-cache key."""
    from dvc_data.hashfile.meta import Meta

    from repic.core.params import RUN_CACHE_BLIND_KEYS

    assert set(RUN_CACHE_BLIND_KEYS) == {Meta.PARAM_SIZE, Meta.PARAM_NFILES}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["caption"]["detector_kwargs"] = {"size": 768}
    with pytest.raises(RepicError, match=r"caption\.detector_kwargs\.size: a key named 'size' is ignored by DVC"):
        load_params(_write(tmp_path, params))


@pytest.mark.parametrize("text, expected", [
    (None, "overlay file not found"),
    ("fetch_data: [unclosed\n", "invalid YAML"),
    ("- base\n- fetch_data\n", "expected a mapping of params sections (base:, fetch_data:, ...), got a list"),
])
def test_bad_overlay_is_one_line_naming_the_file(tmp_path, capsys, text, expected):
    from repic.core.params import main

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    overlay = tmp_path / "overlay.yaml"
    if text is not None:
        overlay.write_text(text)
    before = params.read_text()
    assert main(["apply", str(overlay), "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {overlay}: {expected}") and err.count("\n") == 1
    assert params.read_text() == before


def test_every_torch_stage_runs_on_base_threads(tmp_path):
    """`base.threads` (torch's CPU threads: the count changes float addition order, hence the bytes) is 1 in the
    embedded default and null (torch's default) only in the GPU paper config; every stage that loads
    repic/vlm/models.py (torch) declares it in dvc.yaml and applies it (`use_threads`), so a change reruns it."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["base"]["threads"] == 1
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    assert paper["base"]["threads"] is None
    for bad, expected in [(0, "0 is less than the minimum of 1"), (1.5, "1.5 is not of type 'integer', 'null'")]:
        params["base"]["threads"] = bad
        with pytest.raises(RepicError, match=rf"base\.threads: {re.escape(expected)}"):
            load_params(_write(tmp_path, params))
    stages = {name: stage.get("do", stage) for name, stage in
              yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items()}
    torch_stages = {name: stage for name, stage in stages.items()
                    if "repic/vlm/models.py" in stage.get("deps", [])}
    assert {"fetch_data", "build_db", "train_grpo_lora", "merge_lora", "caption_single", "judge_llm"} \
        <= set(torch_stages)
    for name, stage in torch_stages.items():
        assert "base.threads" in stage["params"], name
        module = re.search(r"-m\s+stages\.(\w+)", stage["cmd"]).group(1)
        source = (REPO / "stages" / f"{module}.py").read_text()
        assert re.search(r"use_threads\((base|params\[\"base\"\])\[\"threads\"\]\)|threads=base\[\"threads\"\]",
                         source), name
