"""configs/paper.yaml: one documented overlay selects the paper recipe; the built trainer configs carry it."""

import shutil

import yaml

from repic.core.params import LANGUAGE_MODEL_LINEAR, apply_overlay, grpo_config, load_params, lora_config
from repic.train.grpo import batch_plan

from .conftest import REPO


def test_paper_overlay_builds_the_paper_recipe(tmp_path):
    params_path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_path)
    apply_overlay(params_path, REPO / "configs" / "paper.yaml")
    params = load_params(params_path)  # still valid against the schema
    train = params["train_grpo_lora"]
    grpo = batch_plan(train["grpo"], train["completions_per_step"], 1)  # 1 GPU (launch: python)
    args = grpo_config({**grpo, "bf16": False, "report_to": "none"}, tmp_path, use_cpu=True)
    assert args.num_generations == 8 and args.temperature == 1.0 and args.top_k == 50
    assert args.beta == 0.04 and args.loss_type == "grpo" and args.scale_rewards == "group"
    assert args.learning_rate == 1e-5 and args.num_train_epochs == 2
    # RePIC's 16 completions an optimizer step (tests/test_training_fidelity.py counts them at 1, 8, 16 GPUs)
    assert args.per_device_train_batch_size == 8 and args.gradient_accumulation_steps == 2
    assert train["grouping"] == "repic" and train["lora_targets"] == "repic" and train["rollout_dropout"] is True
    assert args.max_completion_length == 256 and args.gradient_checkpointing
    assert train["grpo"]["bf16"] is True
    lora = lora_config(train["lora"])
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (64, 128, 0.05)
    assert lora.target_modules == LANGUAGE_MODEL_LINEAR  # replaced by RePIC's list when training (lora_targets)
    assert params["subset_2k"]["n_samples"] == 2000 and params["base"]["dtype"] == "bfloat16"
    assert train["launch"].startswith("accelerate launch --config_file configs/accelerate/zero2.yaml")
    # the paper's five evaluation sets, each with its own database; the embedded default's other keys survive
    assert [d["name"] for d in params["base"]["data"]["datasets"]] == [
        "myvlm", "yollava", "dreambooth", "2_concepts", "4_concepts"]
    assert len({d["database"] for d in params["base"]["data"]["datasets"]}) == 5
    default = yaml.safe_load((REPO / "params.yaml").read_text())["fetch_data"]
    assert params["fetch_data"]["source"] == "real" and params["fetch_data"]["world"] == default["world"]
    # RePIC's inference settings (its caption scripts)
    caption = params["caption"]
    assert caption["max_pixels"] == 1024 * 28 * 28 and caption["max_new_tokens"] == 1024
    assert caption["top_k"] == {"single": 2, "multi2": 2, "multi4": 4}
    assert caption["detector"] == "owlv2" and caption["detector_kwargs"]["threshold"] == 0.1
    # the retrieval models are fetched into the data root, where build_db and caption find them
    sources = params["fetch_data"]["sources"]
    assert caption["detector_kwargs"]["model_id"] == "data/repic/" + sources["owlv2"]["dest"].split("/", 1)[1]
    assert params["build_db"]["embedder_kwargs"]["model_id"] == "data/repic/" + sources["clip"]["dest"].split("/", 1)[1]


def test_paper_declares_every_source_pinned_or_recorded():
    from repic.data.sources import read_manifest

    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())["fetch_data"]
    sources = paper["sources"]
    pins = {n: s.get("revision") or s.get("commit") or s.get("sha256") for n, s in sources.items()}
    assert pins == {  # ../shared/pins/SOURCES.md
        "qwen": "cc594898137f460bfe9f0759e9844b3ce807cfb5", "clip": "ce19dc912ca5cd21c8a653c79e251e808ccabcd1",
        "owlv2": "cfd3195ba4ea9592eec887ded089f4c08eff231d", "repic": "122ffa6cbcdf713e94b11ebad1e01580d07c9faf",
        "dreambooth": "4f887af7970a06fc0cd3adaa1d0b368547d6a1d0",
        "yollava": "dd6e47aa28b489b8acbfff23eab14e44278fb7ae", "myvlm": "a1eae861a46636bd3bb822e70791c00fbfce82a1",
        "two_concepts": None, "training_images": None, "training_json": None, "released_lora": None,
        "released_repic": None, "released_rap": None}
    recorded = {n for n, s in sources.items() if s.get("record")}
    assert recorded == {n for n, pin in pins.items() if pin is None}  # no public pin: recorded on first download
    assert {sources[n].get("repo_id") or sources[n]["url"].split("/d/")[1].split("/")[0] for n in recorded} == {
        "1VzNLzzjqEfVcpWDT-3m6O71CAImoD8qE", "Yeongtak/RePIC-training-data", "1DKPmLI58NZUpSUFEUgzpUmMKKPK3Oguc",
        "1d33cP7VWxS_7PWqaV7yAYgNIfMFWcrlA", "Yeongtak/RePIC_Qwen2.5VL_7B", "Yeongtak/RAP_Qwen2.5VL_7B"}
    assert (REPO / paper["lock"]).is_file()
    # query images land in RePIC's layout under the data root
    assert {n: sources[n]["dest"] for n in ("myvlm", "dreambooth", "yollava", "two_concepts")} == {
        "myvlm": "data/data/myvlm_data", "dreambooth": "data/data/dreambooth", "yollava": "data/data/yollava-data",
        "two_concepts": "data/data/query-image-2-concepts"}
    # the committed manifests are the pins of ../shared/pins, and every one parses
    counts = {n: len(read_manifest(REPO / sources[n]["manifest"], label=n)) for n in ("repic", "dreambooth", "yollava")}
    assert counts == {"repic": 886, "dreambooth": 158, "yollava": 333}
    shared = REPO.parent / "shared" / "pins"
    if shared.is_dir():
        for rel in ("repic_data_tree.txt", "dreambooth_query_manifest.tsv", "yollava_query_lfs_manifest.tsv",
                    "myvlm_expected_files.txt", "two_concept_expected_files.txt"):
            assert (REPO / "configs/pins" / rel).read_bytes() == (shared / rel).read_bytes(), rel


def test_yolo_world_overlay_applies_on_top_of_the_paper_run(tmp_path):
    params_path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_path)
    apply_overlay(params_path, REPO / "configs" / "paper.yaml")
    params = apply_overlay(params_path, REPO / "configs" / "paper_yolo_world.yaml")
    assert params["caption"]["detector"] == "yolo_world"
    kwargs = params["caption"]["detector_kwargs"]
    assert kwargs["sha256"] == params["fetch_data"]["sources"]["yolo_world"]["sha256"] == (
        "41e771bfbbb8894dd857f3fef7cac3b3578dffd49fd3547101efa6a606a02a0e")
    assert kwargs["model_id"] == "data/repic/models/yolov8x-worldv2.pt"


def test_true_grpo_overlay_changes_only_the_groups_and_our_rows_label(tmp_path):
    """configs/paper_true_grpo.yaml: the paper run with true GRPO groups; the same rows as the paper (an overlay
    replaces `models` whole), our rows (LoRA and merged) relabelled."""
    params_path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_path)
    paper = apply_overlay(params_path, REPO / "configs" / "paper.yaml")
    true = apply_overlay(params_path, REPO / "configs" / "paper_true_grpo.yaml")
    assert true["train_grpo_lora"] == {**paper["train_grpo_lora"], "grouping": "grpo"}
    assert {n: {**r, "label": None} for n, r in true["models"].items()} == {
        n: {**r, "label": None} for n, r in paper["models"].items()}
    assert [n for n in true["models"] if true["models"][n] != paper["models"][n]] == ["trained", "merged"]
