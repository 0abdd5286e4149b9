# ruff: noqa: B023 -- the stand-ins' closures run inside the loop iteration that defines them
"""Write the RePIC reference data of tests/test_eval_fidelity.py (tests/data/repic_*.json) by running RePIC's own
evaluation code from the git mirror with stand-ins for the models. Run once by hand; the JSON is committed, RePIC's
code is not (it is read from the mirror at run time and executed in memory).

    python tools/repic_reference.py --mirror /work/.mirror/oyt9306+RePIC/repo --data ../shared/repic_eval/data \
        --qwen-vl-utils /path/to/site-packages/qwen_vl_utils/vision_process.py --out tests/data

What it records:
- repic_conversations.json: for every dataset x model (zero_shot, RePIC) in skip-retrieval mode, the conversation
  RePIC's caption script hands to `processor.apply_chat_template` for a sample of queries (exact messages, image
  paths included) and, for every query, the question it writes into its result file;
- repic_released_questions.json: the `question` column of RePIC's released 2- and 4-concept caption files;
- repic_retrieval.json: RePIC's detector.py + retriever.py on the four 4-concept photos with a stand-in YOLO-World
  (`standin_boxes`: fractional boxes, one case with none) and a stand-in CLIP (`standin_features`: a 16x16 RGB
  thumbnail, 768 values): the crops' sizes, the references' paths in order, or the KeyError RePIC raises on an image
  its database does not list, and then (`ranked`) the order its loop picks when such a path is given a placeholder
  concept;
- repic_judge_requests.json: the request RePIC's evaluation/GPT_eval_single.py and GPT_eval_multi.py send (a
  stand-in OpenAI client records it) for one pair of captions, images named by the file they encode;
- qwen_vl_utils_fetch_image.json: qwen_vl_utils' fetch_image (its source, given by path, executed with PIL) on a grid
  of generated images: output size and a sha256 of the pixels.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

DATASETS = {"myvlm": ("caption_eval_single.py", "myvlm"), "yollava": ("caption_eval_single.py", "yollava"),
            "dreambooth": ("caption_eval_single.py", "dreambooth"),
            "2_concepts": ("caption_eval_multi_2.py", "2_concepts"),
            "4_concepts": ("caption_eval_multi_4.py", "4_concepts")}
TOPK = {"myvlm": 2, "yollava": 2, "dreambooth": 2, "2_concepts": 2, "4_concepts": 4}  # execution_*.sh
SAMPLE = 7  # conversations kept per dataset x model: queries 0..SAMPLE-1 and a few spread over the file


def standin_features(image: Image.Image) -> np.ndarray:
    """The stand-in CLIP image embedding (not normalised): a 16x16 RGB thumbnail, 768 floats in [0, 1]."""
    return np.asarray(image.convert("RGB").resize((16, 16), Image.Resampling.BOX), np.float32).reshape(-1) / 255.0


CASES = 8  # stand-in detections: case i on 4-concept photo i % 4


def standin_boxes(width: int, height: int, case: int) -> list[list[float]]:
    """Stand-in YOLO-World boxes (xyxy, 3 decimals so that RePIC's 2-decimal rounding matters); case 2: none."""
    if case == 2:
        return []
    fr = [(0.05, 0.1, 0.3, 0.8), (0.35, 0.12, 0.6, 0.9), (0.62, 0.05, 0.97, 0.77), (0.2, 0.3, 0.45, 0.62),
          (0.5, 0.5, 0.58, 0.66)]
    fr = (fr[case % 3:] + fr[:case % 3])[: 1 + case % 5]
    return [[round(a * width + 0.3337, 3), round(b * height + 0.6661, 3), round(c * width - 0.4449, 3),
             round(d * height - 0.2251, 3)] for a, b, c, d in fr]


def git_show(mirror: Path, path: str) -> str:
    return subprocess.run(["git", "-C", str(mirror), "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout


class _Tensor:
    """Enough of a tensor for RePIC's retriever with the stand-in CLIP."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = np.asarray(a, np.float32)

    def to(self, *_: object) -> _Tensor:
        return self

    def norm(self, p: int = 2, dim: int = -1, keepdim: bool = True) -> _Tensor:
        return _Tensor(np.linalg.norm(self.a, axis=dim, keepdims=keepdim))

    def __truediv__(self, other: _Tensor) -> _Tensor:
        return _Tensor(self.a / other.a)

    def detach(self) -> _Tensor:
        return self

    def cpu(self) -> _Tensor:
        return self

    def numpy(self) -> np.ndarray:
        return self.a


def fake_modules(calls: list) -> dict[str, types.ModuleType]:
    tr = types.ModuleType("transformers")

    class Processor:
        def apply_chat_template(self, message, tokenize=False, add_generation_prompt=True):
            calls.append(copy.deepcopy(message))
            return ""

        def __call__(self, **kw):
            class Inputs(dict):
                input_ids = [[0]]

                def to(self, device):
                    return self
            return Inputs(input_ids=[[0]])

        def batch_decode(self, ids, **kw):
            return ["caption"]

    class Model:
        def generate(self, **kw):
            return [[0]]

    class CLIPFeatures:
        def __call__(self, images=None, text=None, return_tensors="pt", padding=True):
            images = images if isinstance(images, list) else [images]
            import torch
            return {"pixel_values": torch.tensor(np.stack([standin_features(im) for im in images]))}

    class CLIPModel:
        def to(self, device):
            return self

        def get_image_features(self, pixel_values):
            return _Tensor(pixel_values.numpy())

    tr.Qwen2_5_VLForConditionalGeneration = types.SimpleNamespace(from_pretrained=lambda *a, **k: Model())
    tr.AutoProcessor = types.SimpleNamespace(from_pretrained=lambda *a, **k: Processor())
    tr.CLIPModel = types.SimpleNamespace(from_pretrained=lambda *a, **k: CLIPModel())
    tr.CLIPTextModel = types.SimpleNamespace(from_pretrained=lambda *a, **k: CLIPModel())
    tr.CLIPVisionModel = tr.CLIPTextModel
    tr.CLIPProcessor = types.SimpleNamespace(from_pretrained=lambda *a, **k: CLIPFeatures())
    tr.DetrImageProcessor = tr.DetrForObjectDetection = types.SimpleNamespace(from_pretrained=None)
    qv = types.ModuleType("qwen_vl_utils")
    qv.process_vision_info = lambda message: (None, None)
    ul = types.ModuleType("ultralytics")
    ul.YOLOWorld = None  # replaced per photo below
    return {"transformers": tr, "qwen_vl_utils": qv, "ultralytics": ul}


@contextlib.contextmanager
def swapped_modules(modules: dict[str, object]) -> Iterator[None]:
    """`sys.modules` with `modules` in place of the real ones inside the block, restored after it."""
    saved = {k: sys.modules.get(k) for k in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def load(source: str, name: str, modules: dict[str, types.ModuleType]) -> types.ModuleType:
    mod = types.ModuleType(name)
    with swapped_modules(modules):
        exec(compile(source, name, "exec"), mod.__dict__)
    return mod


def workdir(data: Path, copy_db: str | None = None) -> Path:
    """A temp folder whose ./data mirrors `data` (symlinks; `copy_db` copied: RePIC's retriever writes into it)."""
    tmp = Path(tempfile.mkdtemp(prefix="repic_ref_"))
    (tmp / "data").mkdir()
    for entry in data.iterdir():
        if entry.name == "database_tot":
            (tmp / "data/database_tot").mkdir()
            for db in entry.iterdir():
                if db.name == copy_db:
                    shutil.copytree(db, tmp / "data/database_tot" / db.name)
                else:
                    os.symlink(db.resolve(), tmp / "data/database_tot" / db.name)
        else:
            os.symlink(entry.resolve(), tmp / "data" / entry.name)
    return tmp


def conversations(mirror: Path, data: Path) -> dict:
    out: dict = {}
    calls: list = []
    modules = fake_modules(calls)
    retriever_src = git_show(mirror, "retriever.py")
    for dataset, (script, name) in DATASETS.items():
        retr = load(retriever_src, "retriever", modules)

        class SkipRetriever(retr.ClipRetriever):
            def __init__(self, data_dir, index_path, **kw):  # skip-retrieval never searches: no index
                self.data_dir = data_dir

        mods = {**modules, "retriever": types.SimpleNamespace(ClipRetriever=SkipRetriever),
                "detector": types.SimpleNamespace(Detector=None)}
        caption = load(git_show(mirror, script), script, mods)
        caption.load_image = lambda path: Image.new("RGB", (8, 8))  # skip-retrieval: the image is not looked at
        caption.tqdm = lambda x: x
        caption.print = lambda *a, **k: None
        for model in ("zero_shot", "RePIC"):
            tmp = workdir(data)
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                os.mkdir("save_script")
                calls.clear()
                caption.run_captioning(model, name, False, TOPK[dataset], None, "cpu")
                saved = next(Path("save_script").iterdir())
                rows = json.loads(saved.read_text())
            finally:
                os.chdir(cwd)
                shutil.rmtree(tmp)
            n = len(calls)
            keep = sorted(set(range(min(SAMPLE, n))) | {n // 3, n // 2, n - 1})
            out[f"{dataset}/{model}"] = {"n": n, "questions": [r[3] for r in rows], "gt_keys": [r[1] for r in rows],
                                         "query_images": [r[0] for r in rows],
                                         "sample": {str(i): calls[i] for i in keep}}
    return out


def released_questions(mirror: Path) -> dict:
    files = subprocess.run(["git", "-C", str(mirror), "ls-tree", "-r", "--name-only", "HEAD", "captioning/"],
                           check=True, capture_output=True, text=True).stdout.split()
    out = {}
    for f in files:
        rows = json.loads(git_show(mirror, f))
        out[f] = [[r[0], r[1], r[3]] for r in rows]  # query image, gt keys, question
    return out


def retrieval(mirror: Path, data: Path) -> dict:
    calls: list = []
    modules = fake_modules(calls)
    tmp = workdir(data, copy_db="database_4_concepts")
    cwd = os.getcwd()
    os.chdir(tmp)
    out: dict = {"topK": 4, "cases": []}
    try:
        retr = load(git_show(mirror, "retriever.py"), "retriever", modules)
        retr.print = lambda *a, **k: None
        retr.tqdm = lambda x, total=None: x
        retriever = retr.ClipRetriever(data_dir="./data/database_tot/database_4_concepts", index_path=None,
                                       create_index=True, device="cpu")
        out["index_files"] = [retriever.id2filename[str(i)] for i in range(len(retriever.id2filename))]
        database = json.loads(Path("./data/database_tot/database_4_concepts/database_mod.json").read_text())
        queries = json.loads(Path("./data/query_tot/4_concept_query_templates.json").read_text())
        photos = list(queries)
        for case in range(CASES):
            img_path = photos[case % len(photos)]
            image = Image.open(img_path).convert("RGB")
            boxes = standin_boxes(image.width, image.height, case)

            class Boxes:
                def __init__(self, b):
                    import torch
                    self.xyxy = torch.tensor(b, dtype=torch.float64).reshape(-1, 4)

            class YOLOWorld:
                def __init__(self, *a):
                    pass

                def predict(self, source=None, save=True, conf=0.1):
                    return [types.SimpleNamespace(boxes=Boxes(boxes))]

            modules["ultralytics"].YOLOWorld = YOLOWorld
            det = load(git_show(mirror, "detector.py"), "detector", modules).Detector()
            crops = det.detect_and_crop(image)
            case = {"query_image": img_path, "boxes": boxes, "crop_sizes": [list(c.size) for c in crops]}
            try:
                extra_info, rag_images = retriever.retrieve(database, inp="", queries=crops, topK=4)
                case["references"] = list(rag_images)
                case["extra_info"] = extra_info
            except KeyError as exc:
                case["key_error"] = exc.args[0]

                class Tolerant(dict):
                    def __missing__(self, path):
                        return "<unlisted>"

                tolerant = {"concept_dict": {**database["concept_dict"], "<unlisted>": {"name": "?", "info": "?"}},
                            "path_to_concept": Tolerant(database["path_to_concept"])}
                case["ranked"] = list(retriever.retrieve(tolerant, inp="", queries=crops, topK=4)[1])
            out["cases"].append(case)
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp)
    return out


JUDGE_CAPTIONS = {"rap_llava": "llava says {x}.", "ours": "RePIC says {x}.", "rap_qwen_sft": "sft says {x}.",
                  "zero_shot": "base says {x}."}  # file load order of the multi scripts (single: ours, zero_shot)


def judge_requests(mirror: Path, data: Path) -> dict:
    import base64
    import builtins
    import json as real_json

    out: dict = {}
    for script, order, keys in (("evaluation/GPT_eval_single.py", ["ours", "zero_shot"], ["<bo>"]),
                                 ("evaluation/GPT_eval_multi.py", ["rap_llava", "ours", "rap_qwen_sft", "zero_shot"],
                                  ["<Anya>", "<Bond>"])):
        tmp = workdir(data)
        cwd = os.getcwd()
        os.chdir(tmp)
        files: dict[str, str] = {}
        try:
            Image.new("RGB", (8, 8), (10, 20, 30)).save("query.png")
            for path in ("query.png", "data/database_tot/database_2_concepts/Anya.jpg",
                         "data/database_tot/database_2_concepts/Bond.jpg"):
                files[base64.b64encode(Path(path).read_bytes()).decode()] = "./" + path
            loads = iter(order)
            captured: list = []

            def load(f):
                name = Path(f.name).name
                if name == "database_mod.json":
                    return real_json.load(f)
                which = next(loads)
                return [["./query.png", keys, JUDGE_CAPTIONS[which].format(x=keys[0]), "q"]]

            fake_json = types.SimpleNamespace(load=load, dump=lambda *a, **k: None)

            def create(model, messages):
                def url(block):
                    if block.get("type") == "image_url":
                        data_ = block["image_url"]["url"].split("base64,", 1)[1]
                        named = "data:image/png;base64,<" + files[data_] + ">"
                        return {"type": "image_url", "image_url": {"url": named}}
                    return block
                captured.append({"model": model, "messages": [
                    {**m, "content": m["content"] if isinstance(m["content"], str) else [url(b) for b in m["content"]]}
                    for m in messages]})
                answer = types.SimpleNamespace(message=types.SimpleNamespace(content="B"))
                return types.SimpleNamespace(choices=[answer])

            client = types.SimpleNamespace(chat=types.SimpleNamespace(completions=types.SimpleNamespace(create=create)))
            fake_openai = types.SimpleNamespace(OpenAI=lambda api_key=None: client)
            Path("path/to/your/generated").mkdir(parents=True)
            Path("path/to/your/generated/captions.json").write_text("[]")
            real_open = builtins.open
            with swapped_modules({"json": fake_json, "openai": fake_openai,
                                  "tqdm": types.SimpleNamespace(tqdm=lambda x: x)}):
                ns = {"__name__": "repic_judge", "print": lambda *a, **k: None,
                      "open": lambda path, *a, **k: real_open(path, *a, **k)}
                source = git_show(mirror, script)
                # GPT_eval_multi.py as published names its first method 'rap_llava,' (a stray comma), so its first
                # request raises NameError (string1 unset); the request's form is what is recorded here
                source = source.replace("'rap_llava,'", "'rap_llava'")
                exec(compile(source, script, "exec"), ns)
        finally:
            os.chdir(cwd)
            shutil.rmtree(tmp)
        out[script] = {"gt_keys": keys, "captions": {k: JUDGE_CAPTIONS[k].format(x=keys[0]) for k in order},
                       "requests": captured}
    return out


def fetch_image_grid(vision_process: Path) -> dict:
    """qwen_vl_utils' fetch_image (functions taken from its source, run with PIL) on generated images."""
    tree = ast.parse(vision_process.read_text())
    wanted = {"round_by_factor", "ceil_by_factor", "floor_by_factor", "smart_resize", "to_rgb", "fetch_image"}
    body = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in wanted) or (
        isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in n.targets)
        and "environ" not in ast.unparse(n))]
    import io
    import math
    import typing
    ns = {"math": math, "Image": Image, "BytesIO": io.BytesIO, "copy": copy,
          **{n: getattr(typing, n) for n in ("Any", "Dict", "List", "Optional", "Tuple", "Union")}}
    for node in body:  # constants that need the video readers (not defined here) are left out
        try:
            exec(compile(ast.Module(body=[node], type_ignores=[]), str(vision_process), "exec"), ns)
        except NameError:
            assert isinstance(node, ast.Assign), ast.unparse(node)[:80]
    rng = np.random.default_rng(0)
    out = []
    sizes = [(8, 8), (27, 29), (56, 56), (100, 37), (224, 224), (333, 500), (640, 480), (1000, 1000), (1023, 767),
             (1920, 1080), (2500, 2500), (3024, 4032), (4000, 3000), (50, 5000)]
    for (w, h) in sizes:
        for mode in ("RGB", "RGBA", "L", "P"):
            if w * h > 4_000_000 and mode != "RGB":
                continue
            arr = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
            image = Image.fromarray(arr, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(arr, "RGBA")
            got = ns["fetch_image"]({"image": image})
            out.append({"size": [w, h], "mode": mode, "seed_index": len(out), "out_size": list(got.size),
                        "sha256": hashlib.sha256(got.tobytes()).hexdigest()})
    return {"source": "qwen_vl_utils/vision_process.py, sha256 "
                      + hashlib.sha256(vision_process.read_bytes()).hexdigest(), "cases": out,
            "rng": "numpy default_rng(0), integers(0, 256, (h, w, 4)) per image in order"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mirror", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="RePIC's data/ folder (../shared/repic_eval/data)")
    p.add_argument("--qwen-vl-utils", type=Path, help="qwen_vl_utils/vision_process.py of qwen-vl-utils 0.0.14")
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args()
    data = a.data.resolve()
    a.out.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: dict) -> None:
        (a.out / name).write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")

    dump("repic_released_questions.json", released_questions(a.mirror))
    dump("repic_conversations.json", conversations(a.mirror, data))
    dump("repic_retrieval.json", retrieval(a.mirror, data))
    dump("repic_judge_requests.json", judge_requests(a.mirror, data))
    if a.qwen_vl_utils:
        dump("qwen_vl_utils_fetch_image.json", fetch_image_grid(a.qwen_vl_utils))


if __name__ == "__main__":
    main()
