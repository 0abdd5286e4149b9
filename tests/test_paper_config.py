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

# ---------------------------------------------------------------------------------------- overlays keep the file
def _lines(text: str) -> list[tuple[str, str, str]]:
    """(dotted key path, the line without its comment, its comment) of every line of a params-style YAML file
    (block mappings and `- ` lists, comments after ` #` or on their own line; no `#` inside values)."""
    out, stack = [], []  # stack: (indent, key)
    for line in text.splitlines():
        body, _, comment = line.partition("#") if line.lstrip().startswith("#") else line.partition(" #")
        if not body.strip():
            out.append(("", "", comment.strip()))
            continue
        indent = len(body) - len(body.lstrip())
        stripped = body.strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stripped.startswith("- "):  # a list item: its index under the key above, its first key inside
            index = sum(1 for p, *_ in out if p.startswith(".".join(k for _, k in stack) + ".#"))
            stack.append((indent, f"#{index}"))
            indent, stripped = indent + 2, stripped[2:]
        key = stripped.split(":", 1)[0].strip() if ":" in stripped.split(" {")[0] else ""
        path = ".".join([k for _, k in stack] + ([key] if key else []))
        if key:
            stack.append((indent, key))
        out.append((path, body.rstrip(), comment.strip()))
    return out


def _set_by(path: str, overlay: dict, replaced: tuple[str, ...]) -> bool:
    """Whether an overlay sets the key at `path` (a key it gives, or inside a value it replaces whole)."""
    node, parts = overlay, [p for p in path.split(".") if not p.startswith("#")]
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            return False
        if not isinstance(node[part], dict) or (i == 0 and part in replaced):
            return True
        node = node[part]
    return True


def test_overlays_keep_params_yaml_comments_key_order_and_layout(tmp_path):
    """`python -m repic.core.params apply` (make paper) rewrites params.yaml through a round-trip YAML library:
    as `git diff` shows it, every line of the embedded default either stays as it was or is a value the overlay
    sets (its comment still on it), every comment is kept in order, keys keep their order (new ones after them),
    and the file reads as the merged params that were validated."""
    from repic.core.params import REPLACED_SECTIONS, deep_merge, main

    original = (REPO / "params.yaml").read_text()
    params_path = tmp_path / "params.yaml"
    params_path.write_text(original)
    overlays = [REPO / "configs" / "paper.yaml", REPO / "configs" / "paper_yolo_world.yaml"]
    expected = yaml.safe_load(original)
    for overlay_path in overlays:
        assert main(["apply", str(overlay_path), "--params", str(params_path)]) == 0
        expected = deep_merge(expected, yaml.safe_load(overlay_path.read_text()))
    text = params_path.read_text()
    assert yaml.safe_load(text) == expected
    before, after = _lines(original), _lines(text)
    overlay = {}
    for overlay_path in overlays:
        overlay = deep_merge(overlay, yaml.safe_load(overlay_path.read_text()))
    # the diff: a line of the default that is not in the result is a value the overlay sets, comment kept on it
    import difflib

    matcher = difflib.SequenceMatcher(a=[b for _, b, _ in before], b=[b for _, b, _ in after], autojunk=False)
    changed = [i for tag, i1, i2, _, _ in matcher.get_opcodes() if tag != "equal" for i in range(i1, i2)]
    assert changed, "the overlay changed nothing"
    for i in changed:
        path, body, comment = before[i]
        assert _set_by(path, overlay, REPLACED_SECTIONS), f"params.yaml line {i + 1} changed: {body!r} ({path})"
        if comment and not path.startswith("models."):  # a row the overlay drops takes its comment along
            assert any(p == path and c == comment for p, _, c in after), f"comment of {path} lost: {comment!r}"
    # every comment, in order (the file's header, full-line and end-of-line comments)
    comments = [c for _, _, c in after if c]
    position = 0
    for _, _, comment in before:
        if comment:
            assert comment in comments[position:], f"comment lost or moved: {comment!r}"
            position = comments.index(comment, position) + 1
    # key order: each mapping's keys as in the default, new keys after them; `models` in the overlay's order
    def order(node, prefix=""):
        return {prefix: list(node)} | {k: v for key, sub in node.items() if isinstance(sub, dict)
                                        for k, v in order(sub, f"{prefix}.{key}").items()}
    old_order, new_order = order(yaml.safe_load(original)), order(yaml.safe_load(text))
    for path, keys in old_order.items():
        if path == ".models" or path not in new_order:
            continue
        kept = [k for k in new_order[path] if k in keys]
        assert kept == [k for k in keys if k in new_order[path]] and new_order[path][:len(kept)] == kept, path
    assert list(yaml.safe_load(text)["models"]) == list(overlay["models"])
    # the rows our training makes left out (make paper-released): the same, those rows gone with their comments
    params_path.write_text(original)
    assert main(["apply", str(overlays[0]), "--params", str(params_path), "--released-only"]) == 0
    released = params_path.read_text()
    assert list(yaml.safe_load(released)["models"]) == ["base", "rap_qwen", "repic_lora", "repic_merged"]
    kept = [c for p, _, c in before if c and p not in ("models.trained", "models.merged")]
    assert [c for _, _, c in _lines(released) if c and c in kept] == kept


def test_a_key_given_twice_in_an_overlay_is_one_line(tmp_path, capsys):
    """PyYAML keeps the last of a key given twice; the round-trip reader refuses it: one line, naming the file."""
    from repic.core.params import main

    params_path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_path)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("caption:\n  batch_size: 4\n  batch_size: 5\n")
    assert main(["apply", str(overlay), "--params", str(params_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {overlay}: invalid YAML (found duplicate key \"batch_size\" with value \"5\" "
                   "(original value: \"4\"), line 3)")
    assert params_path.read_text() == (REPO / "params.yaml").read_text()


def test_make_paper_exp_runs_the_overlay_as_a_dvc_experiment():
    """`make paper EXP=name`: the overlays, then `dvc exp run -n name` (the default and the paper run side by side
    in `dvc exp show`); without EXP, `dvc repro`."""
    import subprocess

    def plan(*args):
        out = subprocess.run(["make", "-n", "paper", *args], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.splitlines()
        return [ln for ln in out if "repic.core.params apply" in ln or "dvc " in ln]

    assert plan("EXP=paper-g8", "PAPER_OVERLAYS=configs/paper_yolo_world.yaml") == [
        "python -m repic.core.params apply configs/paper.yaml",
        "python -m repic.core.params apply configs/paper_yolo_world.yaml && true",
        "HF_HUB_OFFLINE=0 WANDB_MODE=${WANDB_MODE:-offline} dvc exp run -n paper-g8"]
    assert plan()[-1] == "HF_HUB_OFFLINE=0 WANDB_MODE=${WANDB_MODE:-offline} dvc repro"
