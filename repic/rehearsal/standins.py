"""What the rehearsal's loopback servers serve: same-class tiny stand-ins under the paper run's real ids and layouts.

Driven by the paper config's own `fetch_data.sources` (repo ids, revisions, commits, Drive links, file names), so
the rehearsal follows `configs/paper.yaml` as it is:

- hub models: a tiny `Qwen2_5_VLForConditionalGeneration` (+ its processor) for the base model and the two released
  merged models, a tiny `CLIPModel`, a tiny `Owlv2ForObjectDetection` (+ processor; its image processor needs scipy);
- RePIC's ``data/`` packed as GitHub packs a commit (``RePIC-<sha>/data/...`` in a tar.gz): the real files of
  ``../shared/repic_eval`` wherever they match the pinned blob id, a stand-in only for the files that copy lacks;
- DreamBooth's archive, Yo'LLaVA's LFS objects, MyVLM's hub dataset and the 2-concept Drive zip: small generated
  images under the file names RePIC's query maps expect;
- the training JSON (Drive) in RePIC's schema with its images (hub dataset), and a LoRA adapter (PEFT's
  `adapter_config.json` + `adapter_model.safetensors`, as RePIC's released checkpoint) zipped on Drive.

Content that cannot carry the real checksums (generated images, the files missing from the local RePIC copy) gets
manifests rewritten for it (`Served.manifests`): the one thing besides network and the allow-listed overlay that the
rehearsal changes, and it says which entries it rewrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from repic.data.sources import read_manifest
from repic.rehearsal.servers import DRIVE_HOST, blob_id

_DRIVE_ID = ("/file/d/", "id=")


@dataclass
class Served:
    """Everything the servers answer with, plus the rewritten manifests (path in the checkout -> text)."""

    hub: dict[tuple[str, str], tuple[str, dict[str, bytes | Path]]] = field(default_factory=dict)
    files: dict[str, bytes | Path] = field(default_factory=dict)
    drive: dict[str, bytes | Path] = field(default_factory=dict)
    manifests: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_bytes(name: str, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small deterministic picture (a coloured shape on a plain ground) in the format `name`'s suffix says."""
    rng = random.Random(name)
    ground = tuple(rng.randint(180, 255) for _ in range(3))
    image = Image.new("RGB", size, ground)
    draw = ImageDraw.Draw(image)
    w, h = size
    x1, y1 = rng.randint(2, w // 3), rng.randint(2, h // 3)
    x2, y2 = rng.randint(2 * w // 3, w - 3), rng.randint(2 * h // 3, h - 3)
    colour = tuple(rng.randint(0, 150) for _ in range(3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x1, y1, x2, y2), fill=colour)
    buf = io.BytesIO()
    fmt = "JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG"
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def standin_bytes(path: str) -> bytes:
    """Stand-in content for a file of RePIC's data/ that the local copy lacks."""
    if path.lower().endswith((".jpg", ".jpeg", ".png")):
        return image_bytes(path)
    if path.endswith(".json"):
        return b"{}\n"
    return f"rehearsal stand-in for {path}\n".encode()


def _targz(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        for name, data in sorted(entries.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in sorted(entries.items()):
            zf.writestr(name, data)
    return buf.getvalue()


def drive_id(url: str) -> str:
    for marker in _DRIVE_ID:
        if marker in url:
            return url.split(marker, 1)[1].split("/")[0].split("&")[0].split("?")[0]
    raise ValueError(f"not a Google Drive link: {url}")


def _folder(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _expected(checkout: Path, spec: dict[str, Any]) -> list[str]:
    """Paths of the spec's expect file relative to its destination (``./data/myvlm_data/x`` -> ``x``)."""
    prefix = "./" + spec["dest"].split("/", 1)[1] + "/"
    lines = (checkout / spec["expect"]).read_text(encoding="utf-8").split()
    return [line[len(prefix):] for line in lines if line.startswith(prefix)]


# ================================================================================================== models
def tiny_qwen(out: Path, texts: list[str], tiny: dict[str, Any], seed: int) -> Path:
    from repic.synthetic.tiny_model import build_tiny_model

    return build_tiny_model(out, texts, tiny, seed=seed)


def tiny_clip(out: Path, seed: int) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                max_position_embeddings=16, bos_token_id=53, eos_token_id=54, pad_token_id=54)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def tiny_owlv2(out: Path, seed: int, max_text: int = 64) -> Path:
    """A random tiny OWLv2 with a character-level CLIP tokenizer (prompts up to `max_text` characters)."""
    import string

    import torch
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokens = ["!", *string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # last: OWL masks queries whose first id is 0
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=len(tokens), max_position_embeddings=max_text, bos_token_id=len(tokens) - 2,
                eos_token_id=len(tokens) - 1, pad_token_id=len(tokens) - 1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32))
    with torch.no_grad():  # random box heads predict zero-width boxes; zeroed, boxes sit on the patch grid
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(out)
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_text)
    image_processor = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def lora_adapter(base: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter on the tiny base: what RePIC's released checkpoint holds (adapter config + weights)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from repic.core.params import LANGUAGE_MODEL_LINEAR

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(base))
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LANGUAGE_MODEL_LINEAR,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out)
    return out


# ================================================================================================= content
def build(checkout: Path, shared: Path, params: dict[str, Any], work: Path) -> Served:
    """Stand-ins for every source of `params["fetch_data"]["sources"]` (the paper config applied in `checkout`)."""
    from repic.data.fetch import world_texts
    from repic.synthetic.world import make_world

    sources = params["fetch_data"]["sources"]
    served = Served()
    seed = int(params["base"]["seed"])
    work.mkdir(parents=True, exist_ok=True)
    substituted: dict[str, int] = {}

    def git_archive(spec: dict[str, Any], entries: dict[str, bytes]) -> None:
        repo, commit = spec["repo"], spec["commit"]
        top = f"{repo.split('/')[1]}-{commit}"
        served.files[f"/github.com/{repo}/archive/{commit}.tar.gz"] = _targz(
            {f"{top}/{p}": b for p, b in entries.items()})

    for name, spec in sources.items():
        kind = spec["kind"]
        if kind == "git":
            manifest = read_manifest(checkout / spec["manifest"], label=name)
            header, rows = _manifest_rows(checkout / spec["manifest"])
            repic_eval = shared / "repic_eval"
            entries: dict[str, bytes] = {"README.md": b"rehearsal: code files of the repository\n"}
            new_rows: list[str] = []
            n_real = n_sub = 0
            for (repo_path, algo, digest), row in zip(manifest, rows, strict=True):
                real = repic_eval / repo_path
                data = real.read_bytes() if real.is_file() else None
                if data is None or (blob_id(data) if algo == "blob" else sha256(data)) != digest:
                    data = standin_bytes(repo_path)
                    row = _rewrite_row(row, header, data)
                    n_sub += 1
                else:
                    n_real += 1
                entries[repo_path] = data
                new_rows.append(row)
                if spec.get("lfs"):
                    media = f"/media.githubusercontent.com/media/{spec['repo']}/{spec['commit']}/{repo_path}"
                    served.files[media] = data
            if not spec.get("lfs"):
                git_archive(spec, entries)
            if n_sub:
                served.manifests[spec["manifest"]] = "".join(
                    line + "\n" for line in ([header] if header else []) + new_rows)
            substituted[name] = n_sub
            served.report.setdefault("real_files_checked", {})[name] = n_real
    served.report["manifest_entries_rewritten"] = substituted

    # --------------------------------------------------------------------- training data (RePIC's schema)
    world = work / "world"
    if not world.exists():
        make_world(world, seed=seed, n_concepts=8, n_distractors=2, queries_single=2, queries_multi2=2,
                   queries_multi4=1, train_per_method=int(params["fetch_data"]["world"]["train_per_method"]),
                   image_size=int(params["fetch_data"]["world"]["image_size"]))
    train_rows = json.loads((world / "data" / "training" / "train.json").read_text(encoding="utf-8"))
    train_images = _folder(world / "data" / "training")
    train_images.pop("train.json", None)

    # --------------------------------------------------------------------------------------------- models
    texts = [*world_texts(shared / "repic_eval"), json.dumps(train_rows)]
    base = work / "qwen"
    if not (base / "config.json").is_file():
        tiny_qwen(base, texts, params["fetch_data"]["tiny_model"], seed)
    clip = work / "clip"
    if not (clip / "config.json").is_file():
        tiny_clip(clip, seed)
    owl = work / "owlv2"
    if not (owl / "config.json").is_file():
        tiny_owlv2(owl, seed)
    lora = work / "lora"
    if not (lora / "adapter_config.json").is_file():
        lora_adapter(base, lora, seed)

    for name, spec in sources.items():
        kind = spec["kind"]
        if kind == "hf":
            repo_type = spec.get("repo_type", "model")
            revision = spec.get("revision") or hashlib.sha1(f"{name}/{spec['repo_id']}".encode()).hexdigest()  # noqa: S324
            if name == "clip":
                content: dict[str, bytes | Path] = {**_folder(clip), "README.md": b"model card"}
            elif name == "owlv2":
                content = {**_folder(owl), "README.md": b"model card"}
            elif repo_type == "model":  # the base model and the released merged models: Qwen2.5-VL
                content = {**_folder(base), "README.md": b"model card"}
            elif spec.get("expect"):  # a query-image dataset (MyVLM): the expected names, plus a card it skips
                content = {rel: image_bytes(rel) for rel in _expected(checkout, spec)}
                content["README.md"] = b"dataset card"
            else:  # the training images
                content = dict(train_images)
            served.hub[(repo_type, spec["repo_id"])] = (revision, content)
        elif kind == "url" and "drive.google.com" in spec["url"]:
            key = drive_id(spec["url"])
            if spec.get("expect"):  # the 2-concept zip, wrapped in its folder as a zip of a folder is
                folder = spec["dest"].rsplit("/", 1)[1]
                body: bytes | Path = _zip({f"{folder}/{rel}": image_bytes(rel) for rel in _expected(checkout, spec)})
            elif spec.get("extract"):  # the released LoRA checkpoint
                body = _zip({f"RePIC_lora/{rel}": p.read_bytes() for rel, p in _folder(lora).items()})
            else:  # the training JSON
                body = json.dumps(train_rows, indent=1).encode()
            served.drive[key] = body
        elif kind == "url":
            raise ValueError(f"rehearsal: no stand-in for url source {name!r} ({spec['url']})")
        elif kind == "local":
            raise ValueError(f"rehearsal: source {name!r} is a local folder: the paper run declares none")
    served.report["hub_repos"] = sorted(f"{t}:{r}" for t, r in served.hub)
    served.report["drive_files"] = sorted(served.drive)
    served.report["drive_host"] = DRIVE_HOST
    return served


def _manifest_rows(path: Path) -> tuple[str | None, list[str]]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and "_repo_path" in lines[0]:
        return lines[0], lines[1:]
    return None, lines


def _rewrite_row(row: str, header: str | None, data: bytes) -> str:
    """A manifest row with the checksums (and size) of the stand-in `data`."""
    if header is None:  # git ls-tree -r -l
        meta, path = row.split("\t", 1)
        mode, kind, _, _ = meta.split()
        return f"{mode} {kind} {blob_id(data)} {len(data):>7}\t{path}"
    cols = header.split("\t")
    cells = row.split("\t")
    values = {"git_blob": blob_id(data), "sha256": sha256(data), "lfs_sha256": sha256(data), "size": str(len(data))}
    return "\t".join(values.get(col, cell) for col, cell in zip(cols, cells, strict=True))
