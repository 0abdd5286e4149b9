"""`repic caption` (repic/cli_app.py): installed into a fresh venv, run from outside the project on concepts and
scenes of the embedded world, both RePIC modes; its retrieval is the pipeline's; bad input is one line naming the
file; the 7B class path (hub id + revision through the loopback hub, released-LoRA stand-in)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repic.cli_app import concept_key, defaults, highlight, main
from repic.synthetic.world import make_world

from .conftest import REPO, TINY_MODEL

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# offline retrieval (the embedded world's), short captions: the tiny model is not the point
FAST = ["--embedder", "color_layout", "--detector", "foreground", "--max-new-tokens", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The embedded world (6 concepts, a few scenes of each setting) and a user's concept folder made of its
    database images: one subfolder per concept, named after it, with info.yaml (info, category)."""
    root = tmp_path_factory.mktemp("world")
    summary = make_world(root, seed=11, n_concepts=6, n_distractors=1, queries_single=2, queries_multi2=2,
                         queries_multi4=2, train_per_method=0, image_size=160)
    db = json.loads((root / summary["database"]).read_text())
    concepts = tmp_path_factory.mktemp("mine") / "concepts"
    for entry in db["concept_dict"].values():
        folder = concepts / entry["name"]
        folder.mkdir(parents=True)
        shutil.copy(root / entry["image"], folder / Path(entry["image"]).name)
        (folder / "info.yaml").write_text(yaml.safe_dump({"info": entry["info"], "category": entry["category"]}))
    queries = {kind: {str((root / img).resolve()): keys
                      for img, keys in json.loads((root / rel).read_text()).items()}
               for kind, rel in summary["queries"].items()}
    return {"root": root, "summary": summary, "db": db, "concepts": concepts, "queries": queries}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`repic` pip-installed from a copy of the project into a fresh venv that sees the project venv's packages
    (no torch download on a CPU machine): the console script of that venv."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "repic", src / "repic", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    project = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "project_venv.pth").write_text(project + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-build-isolation", str(src)], check=True, env=ENV, capture_output=True)
    return venv / "bin" / "repic"


def _records(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in json.loads((out / "captions.json").read_text())}


def _pipeline_retrieval(world: dict, tmp: Path, k: int) -> dict[str, list[tuple[str, float]]]:
    """What caption_<setting> retrieves for the world's scenes under the paper config's caption settings: build_db's
    index over the database_mod.json and captioning's retriever (repic.eval.retrieve.make_retriever), on the same
    images."""
    from repic.core.io import resolve_image
    from repic.data.retrieval import build_index, make_embedder, save_index
    from repic.eval.retrieve import make_retriever

    database = world["root"] / world["summary"]["database"]
    index, id_map = build_index(database, world["root"], make_embedder("color_layout"))
    save_index(tmp / "index", index, id_map, {"embedder": "color_layout", "embedder_kwargs": {},
                                              "database": str(database)})
    # the caption section's retrieval options as the command's packaged settings give them (the paper config's)
    settings = {**defaults()["caption"], "detector": "foreground", "detector_kwargs": {}}
    retriever = make_retriever(tmp / "index", world["root"], settings, k, device="cpu")
    from PIL import Image

    return {img: [(h["key"], h["score"]) for h in retriever(Image.open(resolve_image(world["root"], img)))["hits"]]
            for img in world["queries"]["multi4"]}


# ------------------------------------------------------------------------------------------------ fast tests
def test_packaged_defaults_are_the_paper_configs_inference_settings():
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    ours = defaults()
    # every inference setting of the paper's caption section, but those set per device (below), per model row
    # (prompts) and the checkpoint paths (below)
    per_device_or_row = {"backend", "batch_size", "prompts", "detector_kwargs"}
    assert {k: v for k, v in ours["caption"].items() if k not in per_device_or_row} == {
        k: v for k, v in paper["caption"].items() if k not in per_device_or_row}
    assert ours["caption"]["detector_kwargs"]["threshold"] == paper["caption"]["detector_kwargs"]["threshold"]
    assert ours["build_db"]["embedder"] == paper["build_db"]["embedder"]
    assert (ours["device"]["cuda"]["batch_size"], ours["device"]["cuda"]["backend"]) == (
        paper["caption"]["batch_size"], paper["caption"]["backend"])
    # the detector and embedder checkpoints: the hub repos the paper config fetches into those folders
    sources = {s["dest"].split("/")[-1]: s["repo_id"] for s in paper["fetch_data"]["sources"].values()
               if s.get("kind") == "hf" and "dest" in s}
    for ours_id, paper_path in ((ours["caption"]["detector_kwargs"]["model_id"],
                                 paper["caption"]["detector_kwargs"]["model_id"]),
                                (ours["build_db"]["embedder_kwargs"]["model_id"],
                                 paper["build_db"]["embedder_kwargs"]["model_id"])):
        assert sources[paper_path.split("/")[-1]] == ours_id


def test_pyproject_dependencies_hold_the_pins():
    import tomllib

    from packaging.requirements import Requirement

    pins = {ln.split("==")[0].lower().replace("_", "-"): ln.split("==")[1].strip()
            for ln in (REPO / "requirements.txt").read_text().splitlines() if re.match(r"^[A-Za-z0-9_.\-]+==", ln)}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["repic"] == "repic.cli_app:main"
    assert "defaults.yaml" in project["tool"]["setuptools"]["package-data"]["repic"]
    for dep in project["project"]["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        assert name in pins and req.specifier.contains(pins[name]), (dep, pins.get(name))


def test_highlight_marks_keys_and_bare_names_as_whole_words():
    colours = {"<bo>": "#fff", "<mia>": "#eee"}
    page = highlight("<bo> and bo meet Mia, mia and bob & <x>", ["<bo>", "<mia>"], colours)
    assert page.count('class="name"') == 3 and "bob &amp; &lt;x&gt;" in page and ">&lt;bo&gt;</span>" in page
    assert concept_key("bo") == "<bo>" and concept_key("<bo>") == "<bo>"


def test_retrieval_is_the_pipelines_on_the_worlds_4_concept_scenes(world, tiny_model_dir, tmp_path, monkeypatch,
                                                                   capsys, caplog):
    """Concept folder -> the cached index -> retrieval at k=4: the same concepts, scores and recall as
    caption_multi4's retrieval over the world's own database_mod.json (the same images)."""
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="repic")
    scenes = list(world["queries"]["multi4"])
    concepts = shutil.copytree(world["concepts"], tmp_path / "concepts")
    args = ["caption", "--concepts", str(concepts), "--model", str(tiny_model_dir), "--setting", "multi4",
            "--cache", str(tmp_path / "cache"), "--out", "out", *FAST, *scenes]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "2 photo(s) captioned (retrieval, 6 concepts, cpu)" in first.out
    ours = _records(tmp_path / "out")
    theirs = _pipeline_retrieval(world, tmp_path, k=4)
    for img in scenes:
        assert [(h["key"], pytest.approx(h["score"], abs=1e-5)) for h in ours[img]["retrieved"]] == theirs[img]
        assert ours[img]["concepts"] == [k for k, _ in theirs[img]] and ours[img]["mode"] == "retrieval"
        gt = world["queries"]["multi4"][img][0]
        assert set(gt) <= set(ours[img]["concepts"])  # the embedded world's scenes: every concept found
    # the index is cached by the concepts' content: reused as is, rebuilt when an image changes
    caplog.clear()
    assert main(args) == 0
    assert "retrieval index reused from" in caplog.text
    assert len(list((tmp_path / "cache" / "index").iterdir())) == 1
    from PIL import Image

    image = next(concepts.glob("*/*.png"))
    edited = Image.open(image).convert("RGB")
    edited.putpixel((0, 0), (1, 2, 3))
    edited.save(image)
    caplog.clear()
    assert main(args) == 0
    assert "retrieval index built in" in caplog.text
    assert len(list((tmp_path / "cache" / "index").iterdir())) == 2


def test_skip_retrieval_shows_the_named_concepts_and_the_database_json_works_too(world, tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    singles = world["queries"]["single"]
    names = {img: [k.strip("<>") for k in keys] for img, keys in singles.items()}
    (tmp_path / "in.yaml").write_text(yaml.safe_dump(names))
    database = world["root"] / world["summary"]["database"]
    assert main(["caption", "--concepts", str(database), "--model", str(tiny_model_dir), "--concepts-in", "in.yaml",
                 "--out", "out", *FAST]) == 0
    recs = _records(tmp_path / "out")
    assert {img: r["concepts"] for img, r in recs.items()} == singles
    assert all(r["mode"] == "skip" and r["retrieved"] == [] and isinstance(r["caption"], str) for r in recs.values())


def _one_line_error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_line_naming_the_file(world, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from repic.rehearsal.standins import lora_adapter
    from repic.synthetic.tiny_model import build_tiny_model

    monkeypatch.chdir(tmp_path)
    scene = next(iter(world["queries"]["single"]))
    base = ["caption", "--model", str(tiny_model_dir), "--out", "out", *FAST]
    concepts = tmp_path / "c"
    shutil.copytree(world["concepts"], concepts)
    (concepts / "empty").mkdir()
    assert f"{concepts / 'empty'}: empty concept folder" in _one_line_error(capsys, [*base, "--concepts",
                                                                                    str(concepts), scene])
    (concepts / "empty").rmdir()
    broken = concepts / next(p.name for p in concepts.iterdir()) / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert f"{broken}: cannot read image" in _one_line_error(capsys, [*base, "--concepts", str(concepts), scene])
    broken.unlink()
    bad_query = tmp_path / "q.jpg"
    bad_query.write_bytes(b"nope")
    assert f"{bad_query}: cannot read image" in _one_line_error(capsys, [*base, "--concepts", str(concepts),
                                                                         str(bad_query)])
    twin = concepts / "twin"
    shutil.copytree(concepts / "rome" if (concepts / "rome").is_dir() else next(concepts.iterdir()), twin)
    clash = next(p for p in sorted(concepts.iterdir()) if p.name != "twin").name
    (twin / "info.yaml").write_text(yaml.safe_dump({"name": clash}))
    msg = _one_line_error(capsys, [*base, "--concepts", str(concepts), scene])
    assert f"concept name <{clash}> is also the name of {concepts / clash}" in msg and str(twin) in msg
    shutil.rmtree(twin)
    # a LoRA adapter made for another base model: named with both folders, before any work
    other = build_tiny_model(tmp_path / "other", ["a b c"] * 5, {**TINY_MODEL, "hidden_size": 32,
                                                                   "intermediate_size": 64}, seed=1)
    adapter = lora_adapter(other, tmp_path / "released" / "lora", seed=0)
    capsys.readouterr()
    msg = _one_line_error(capsys, [*base, "--concepts", str(concepts), "--adapter", str(tmp_path / "released"),
                                   scene])
    assert f"{adapter}: this LoRA adapter does not fit the base model {tiny_model_dir}" in msg
    assert "--model: needed outside the project" in _one_line_error(
        capsys, ["caption", "--concepts", str(concepts), scene])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ slow tests
@pytest.mark.slow  # reason: pip install into a fresh venv, two runs of the installed command, headless Chromium
def test_installed_command_from_outside_the_project_and_its_page(world, installed, tiny_model_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"  # no params.yaml, not the project
    elsewhere.mkdir()
    singles = world["queries"]["single"]
    skip_args = [f"--concepts-in={img}={','.join(k.strip('<>') for k in keys)}" for img, keys in singles.items()]
    run = subprocess.run([str(installed), "caption", "--concepts", str(world["concepts"]), "--model",
                          str(tiny_model_dir), "--out", "skip", *FAST, *skip_args], cwd=elsewhere, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {img: r["concepts"] for img, r in _records(elsewhere / "skip").items()} == singles
    scenes = world["queries"]["multi4"]
    run = subprocess.run([str(installed), "caption", "--concepts", str(world["concepts"]), "--model",
                          str(tiny_model_dir), "--top-k", "4", "--cache", str(tmp_path / "cache"), *FAST,
                          str(Path(next(iter(scenes))).parent)], cwd=elsewhere, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("repic caption: 2 photo(s) captioned (retrieval")
    assert "retrieve: 2/2" in run.stderr and "caption: 2/2" in run.stderr  # progress
    out = elsewhere / "repic-captions"
    recs = _records(out)
    assert all(set(scenes[img][0]) <= set(recs[img]["concepts"]) for img in scenes)
    page = (out / "index.html").read_text()
    for r in recs.values():
        assert html_escape(r["image"]) in page
        for k in r["concepts"]:
            assert f">{html_escape(k)}</span>" in page
    if CHROMIUM is None:  # a user's machine may lack it (skip); CI installs it (.ci/run), so there it fails
        reason = "headless Chromium is not installed (.ci/run installs Debian's)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI (env CI is set) must have it", pytrace=False)
        pytest.skip(reason)
    url = (out / "index.html").as_uri()
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'p1'}", "--virtual-time-budget=5000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-images="(\d+)" data-images-loaded="(\d+)"', dom)
    assert m and int(m.group(1)) == 2 * (1 + 4) and m.group(1) == m.group(2), dom[:500]  # refs + query, decoded
    assert dom.count('class="caption"') == 2
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'p2'}", "--window-size=1000,900",
                    f"--screenshot={shot}", url], capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1000, 900) and len(img.getcolors(1 << 20) or []) > 50  # images drawn, not a blank page


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


@pytest.mark.slow  # reason: a subprocess that downloads the stand-in through the loopback hub and loads it + LoRA
def test_7b_class_path_hub_id_revision_and_released_lora(world, tiny_model_dir, tmp_path):
    """The rehearsal's stand-ins: the base under Qwen/Qwen2.5-VL-7B-Instruct at a pinned commit (the same class,
    Qwen2_5_VLForConditionalGeneration), the released LoRA unpacked into a folder of its own."""
    from repic.rehearsal.servers import HubServer
    from repic.rehearsal.standins import lora_adapter

    sha = "0123456789abcdef0123456789abcdef01234567"
    files = {str(p.relative_to(tiny_model_dir)): p for p in tiny_model_dir.rglob("*") if p.is_file()}
    assert json.loads((tiny_model_dir / "config.json").read_text())["architectures"] == [
        "Qwen2_5_VLForConditionalGeneration"]
    hub = HubServer({("model", "Qwen/Qwen2.5-VL-7B-Instruct"): (sha, files)})
    lora_adapter(tiny_model_dir, tmp_path / "RePIC_LoRA" / "checkpoint-1000", seed=0)
    try:
        env = {**ENV, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
               "PYTHONPATH": str(REPO)}
        scene = next(iter(world["queries"]["single"]))
        run = subprocess.run([sys.executable, "-m", "repic.cli_app", "caption", "--concepts", str(world["concepts"]),
                              "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--revision", sha, "--adapter",
                              str(tmp_path / "RePIC_LoRA"), *FAST, scene], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    finally:
        hub.close()
    assert run.returncode == 0, run.stderr[-3000:]
    assert any(path.endswith(f"/resolve/{sha}/model.safetensors") for _, path in hub.requests)
    assert (tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-VL-7B-Instruct" / "snapshots" / sha).is_dir()
    (rec,) = json.loads((tmp_path / "repic-captions" / "captions.json").read_text())
    assert rec["mode"] == "retrieval" and len(rec["concepts"]) == 2


def test_page_shows_each_photo_with_its_references_and_the_highlighted_caption(world, tmp_path):
    from repic.cli_app import concepts_from_folder, write_page

    database = concepts_from_folder(world["concepts"])
    a, b = list(database["concept_dict"])[:2]
    scene = next(iter(world["queries"]["multi2"]))
    records = [{"image": "p.png", "path": scene, "mode": "retrieval", "concepts": [a, b],
                "retrieved": [{"key": a, "score": 0.9, "image": ""}, {"key": b, "score": 0.5, "image": ""}],
                "caption": f"{a} sits beside {b.strip('<>')} & a <b>tag</b>"},
               {"image": "q.png", "path": scene, "mode": "skip", "concepts": [b], "retrieved": [], "caption": " "}]
    write_page(tmp_path, records, database, "summary line")
    page = (tmp_path / "index.html").read_text()
    captions = re.findall(r'<div class="caption">(.*?)</div>', page)
    assert len(captions) == 2 and "(empty caption)" in captions[1]
    assert captions[0].count('class="name"') == 2 and "&lt;b&gt;tag&lt;/b&gt;" in captions[0]
    assert "score 0.900" in page and "score 0.500" in page and "summary line" in page
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 2 + 1 + 1 + 1 and len(set(srcs)) == 3  # a, b, the scene once each
    assert all((tmp_path / s).is_file() for s in srcs)


def test_inside_the_project_the_pipelines_base_and_adapter_are_the_defaults(world, tiny_model_dir, tmp_path,
                                                                             monkeypatch, caplog):
    """Run where a params.yaml is (the project after `make repro`): --model and --adapter default to its base model
    and its trained adapter row."""
    from repic.rehearsal.standins import lora_adapter

    adapter = lora_adapter(tiny_model_dir, tmp_path / "results" / "train" / "adapter", seed=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "base": {"base_model": str(tiny_model_dir)},
        "models": {"base": {"label": "base", "kind": "model", "path": str(tiny_model_dir)},
                   "trained": {"label": "trained", "kind": "adapter", "path": "results/train/adapter"}}}))
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="repic")
    img, keys = next(iter(world["queries"]["single"].items()))
    assert main(["caption", "--concepts", str(world["concepts"]), *FAST,
                 f"--concepts-in={img}={','.join(keys)}"]) == 0
    assert f"model {tiny_model_dir} + LoRA adapter {Path('results/train/adapter')}" in caplog.text
    assert adapter.is_dir() and [r["concepts"] for r in _records(tmp_path / "repic-captions").values()] == [keys]


def test_queries_from_files_folders_and_globs_each_once(tmp_path, monkeypatch):
    from repic.cli_app import expand_queries
    from repic.core.io import RepicError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    for rel in ("photos/a.jpg", "photos/b.PNG", "photos/sub/c.webp", "photos/notes.txt", "photos/.hidden.jpg"):
        (tmp_path / rel).write_bytes(b"x")
    assert [str(p) for p in expand_queries(["photos/b.PNG", "photos", "photos/*.jpg"])] == [
        "photos/b.PNG", "photos/a.jpg", "photos/sub/c.webp"]
    assert [str(p) for p in expand_queries(["photos/**/*.webp"])] == ["photos/sub/c.webp"]
    for arg, message in (("nope.jpg", "nope.jpg: no such file or folder"),
                         ("photos/*.gif", r"photos/\*.gif: no image matches this pattern")):
        with pytest.raises(RepicError, match=f"^{message}$"):
            expand_queries([arg])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepicError, match="^empty: no image in this folder"):
        expand_queries(["empty"])
