"""Retrieval of a query's concepts from a RePIC database: detector crops -> image embeddings -> exact faiss.

The paper's recipe (RePIC's caption scripts): YOLO-World crops of the query (classes = database categories,
conf 0.1) -> CLIP ViT-L/14-336 image embeddings, L2-normalised -> exact inner-product faiss index over the
database images -> per-crop top-k, pooled, deduplicated -> top-k concepts (k = 2 for single and 2-concept,
4 for 4-concept). Embedders and detectors are looked up by name in `EMBEDDERS` / `DETECTORS`:

- embedders: "color_layout" (offline, no weights; separates the synthetic world's concepts) and "clip"
  (transformers `CLIPModel`, the paper's);
- detectors: "foreground" (offline connected components of non-background pixels, for the synthetic world),
  "owlv2" (transformers `Owlv2ForObjectDetection`, an open-vocabulary stand-in for YOLO-World, which has
  no transformers port) and "yolo_world" (RePIC's own, through the optional AGPL package `ultralytics`).
  Open-vocabulary detectors are prompted with the database's categories and run on the pipeline's device.

A database image that is missing from disk never crashes anything: `build_index` skips it (and
`missing_database_images` lists it), `retrieve` reports a hit whose image went missing with `missing: True`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
from PIL import Image, ImageOps

from repic.core.io import RepicError, atomic_path, read_json, resolve_image, write_json
from repic.core.layout import ID_MAP_FILE, INDEX_FILE, INDEX_META

log = logging.getLogger(__name__)


class Embedder(Protocol):
    name: str

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """float32 array [len(images), dim] with L2-normalised rows."""
        ...


class Detector(Protocol):
    name: str

    def detect(self, image: Image.Image) -> list[dict[str, Any]]:
        """Detections `{"box": [x1, y1, x2, y2], "score": float, "label": str}`, best first (coordinates in
        pixels, possibly fractional: `Image.crop` rounds them)."""
        ...


def _foreground_mask(arr: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixels that differ from the background colour, taken as the median of a 2-pixel image border."""
    border = np.concatenate(
        [arr[:2], arr[-2:], arr[:, :2].swapaxes(0, 1), arr[:, -2:].swapaxes(0, 1)], axis=1
    )
    bg = np.median(border.reshape(-1, 3), axis=0)
    return np.abs(arr - bg).max(axis=2) > threshold, bg


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def open_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image, upright as a camera meant it (real photos carry EXIF orientation).

    A file that cannot be decoded (truncated, not an image) is a RepicError naming it: PIL's own message
    ("image file is truncated") does not say which of thousands of files it was."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RepicError(f"{path}: cannot read image ({exc})") from None


# =============================================================================================== embedders
class ColorLayoutEmbedder:
    """Offline embedding of an object's colours, silhouette and texture (no learned weights).

    The background colour is estimated from the image border and the foreground is what differs from it,
    so a reference image (object on a large canvas) and a padded detector crop of the same object embed
    alike. Blocks: a hue x value histogram of the foreground (soft hue bins, greys apart), the silhouette
    on an 8x8 grid, where the colours sit (centre/rim, left/right, top/bottom), and a gradient-orientation
    histogram of the interior (stripes vs dots vs checks). Built for the synthetic world; on real photos it
    is a weak colour retrieval baseline, not CLIP.
    """

    name = "color_layout"

    def __init__(self, work_size: int = 48, bg_threshold: float = 30.0, hue_bins: int = 12) -> None:
        self.work_size = work_size
        self.bg_threshold = bg_threshold
        self.hue_bins = hue_bins

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _l2_normalise(np.stack([self._features(im) for im in images]))

    @property
    def dim(self) -> int:
        return self.hue_bins * 2 + 4 + 64 + 18 + 9

    def _features(self, image: Image.Image) -> np.ndarray:
        rgb = image.convert("RGB")
        rgb.thumbnail((2 * self.work_size, 2 * self.work_size), Image.Resampling.BOX)
        arr = np.asarray(rgb, dtype=np.float32)
        mask, bg = self._foreground(arr)
        ys, xs = np.nonzero(mask)
        arr, mask = (
            arr[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1],
            mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1],
        )
        # Square the object's box with background so the silhouette keeps its aspect ratio.
        side = max(arr.shape[:2])
        sq = np.empty((side, side, 3), dtype=np.float32)
        sq[:] = bg
        sq_mask = np.zeros((side, side), dtype=bool)
        oy, ox = (side - arr.shape[0]) // 2, (side - arr.shape[1]) // 2
        sq[oy : oy + arr.shape[0], ox : ox + arr.shape[1]] = arr
        sq_mask[oy : oy + arr.shape[0], ox : ox + arr.shape[1]] = mask
        s = self.work_size
        small = np.asarray(
            Image.fromarray(sq.astype(np.uint8)).resize((s, s), Image.Resampling.BOX), np.float32
        )
        small_mask = (
            np.asarray(
                Image.fromarray(sq_mask.astype(np.uint8) * 255).resize((s, s), Image.Resampling.BOX),
                np.float32,
            )
            / 255.0
        )
        hist = self._colour_histogram(arr[mask])
        shape = self._silhouette(small_mask)
        where = self._colour_layout(small, small_mask)
        texture = self._texture(small, small_mask)
        # Colour identifies a concept best; silhouette, colour placement and texture break colour ties.
        return np.concatenate([1.0 * hist, 0.6 * shape, 1.0 * where, 0.5 * texture]).astype(np.float32)

    def _foreground(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask, bg = _foreground_mask(arr, self.bg_threshold)
        frac = mask.mean()
        if frac < 0.01 or frac > 0.97:  # no separable background (e.g. a photo): describe the whole image
            mask = np.ones(mask.shape, dtype=bool)
        return mask, bg

    def _colour_histogram(self, pixels: np.ndarray) -> np.ndarray:
        hsv = np.asarray(
            Image.fromarray(pixels.reshape(1, -1, 3).astype(np.uint8)).convert("HSV"), np.float32
        )[0]
        h, s, v = hsv[:, 0] / 256.0, hsv[:, 1], hsv[:, 2]
        chromatic = (s >= 64) & (v >= 50)
        hist = np.zeros((self.hue_bins, 2), dtype=np.float32)
        # Soft hue bins centred on 0 (red) so a hue near a bin edge is not split arbitrarily by noise.
        pos = h[chromatic] * self.hue_bins
        lo = np.floor(pos).astype(int)
        w_hi = pos - lo
        vbin = (v[chromatic] >= 160).astype(int)
        np.add.at(hist, (lo % self.hue_bins, vbin), 1.0 - w_hi)
        np.add.at(hist, ((lo + 1) % self.hue_bins, vbin), w_hi)
        greys = np.bincount(np.minimum(v[~chromatic] // 64, 3).astype(int), minlength=4).astype(np.float32)
        out = np.concatenate([hist.ravel(), greys])
        return np.sqrt(out / max(out.sum(), 1.0))  # Hellinger: cosine of sqrt-histograms ~ Bhattacharyya

    @staticmethod
    def _silhouette(small_mask: np.ndarray) -> np.ndarray:
        s = small_mask.shape[0] - small_mask.shape[0] % 8
        grid = small_mask[:s, :s].reshape(8, s // 8, 8, s // 8).mean(axis=(1, 3)).ravel()
        grid = grid - grid.mean()  # centred: every silhouette overlaps in the middle, compare the differences
        return grid / max(float(np.linalg.norm(grid)), 1e-6)

    @staticmethod
    def _colour_layout(small: np.ndarray, small_mask: np.ndarray) -> np.ndarray:
        s = small.shape[0]
        yy, xx = np.mgrid[0:s, 0:s]
        r = np.hypot(yy - (s - 1) / 2, xx - (s - 1) / 2) / (s / 2)
        regions = [
            r < 0.35,
            r >= 0.55,
            xx < s / 2,
            xx >= s / 2,
            yy < s / 2,
            yy >= s / 2,
            np.ones_like(r, bool),
        ]
        w = small_mask[..., None]
        means = [
            (small * w * reg[..., None]).sum((0, 1)) / max(float((w[..., 0] * reg).sum()), 1e-6)
            for reg in regions
        ]
        overall = means[-1]
        # Deviations from the object's mean colour: "blue centre" vs "blue right half" vs evenly mixed.
        dev = np.concatenate([m - overall for m in means[:-1]]) / 128.0
        return dev.astype(np.float32)

    @staticmethod
    def _texture(small: np.ndarray, small_mask: np.ndarray) -> np.ndarray:
        grey = small.mean(axis=2)
        gy, gx = np.gradient(grey)
        mag = np.hypot(gx, gy)
        interior = small_mask > 0.99
        # Erode so the silhouette's own edge does not count as texture.
        interior[1:] &= interior[:-1]
        interior[:-1] &= interior[1:]
        interior[:, 1:] &= interior[:, :-1]
        interior[:, :-1] &= interior[:, 1:]
        if not interior.any():
            return np.zeros(9, dtype=np.float32)
        angle = (np.arctan2(gy, gx)[interior] % np.pi) / np.pi * 8
        hist = np.bincount(np.minimum(angle.astype(int), 7), weights=mag[interior], minlength=8)
        hist = hist / max(hist.sum(), 1e-6)
        density = min(float(mag[interior].mean()) / 40.0, 1.5)
        return np.concatenate([hist, [density]]).astype(np.float32)


class ClipEmbedder:
    """CLIP image embeddings (the paper: openai/clip-vit-large-patch14-336), L2-normalised."""

    name = "clip"

    uses_device = True

    def __init__(
        self, model_id: str = "openai/clip-vit-large-patch14-336", device: str = "cpu", batch_size: int = 16
    ) -> None:
        from transformers import AutoImageProcessor, CLIPModel

        self.device = device
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(model_id).to(device).eval()
        # The PIL backend: the default ("fast") one needs torchvision, which the pinned environment lacks.
        self.processor = AutoImageProcessor.from_pretrained(model_id, backend="pil")

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            with torch.inference_mode():
                feats = self.model.get_image_features(pixel_values=pixels)
            # transformers >= 5 returns a model output whose pooler_output is the projected embedding.
            feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
            out.append(feats.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.model.config.projection_dim), dtype=np.float32)
        return _l2_normalise(np.concatenate(out))


EMBEDDERS: dict[str, Callable[..., Embedder]] = {
    ColorLayoutEmbedder.name: ColorLayoutEmbedder,
    ClipEmbedder.name: ClipEmbedder,
}


def make_embedder(name: str, *, device: str = "cpu", **kw: Any) -> Embedder:
    """Build the embedder registered as `name` (see `EMBEDDERS`) with its keyword arguments, on `device`
    (the pipeline's `base.device`) when it runs a model; weight-free embedders ignore it."""
    if name not in EMBEDDERS:
        raise RepicError(f"unknown embedder {name!r}; expected one of {sorted(EMBEDDERS)}")
    cls = EMBEDDERS[name]
    if getattr(cls, "uses_device", False):
        kw = {"device": device, **kw}
    return cls(**kw)


# =============================================================================================== detectors
def connected_components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a boolean mask (0 = background); each component is labelled by its
    largest flat pixel index + 1, a label that does not depend on how the components are enumerated (the
    detector breaks ties between equal-sized regions by it)."""
    from scipy import ndimage

    h, w = mask.shape
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    flat = np.arange(1, h * w + 1).reshape(h, w)
    if n == 0:
        return np.zeros_like(flat)
    top = np.asarray(ndimage.maximum(flat, labels, index=np.arange(1, n + 1)), dtype=flat.dtype).reshape(-1)
    return np.concatenate([np.zeros(1, dtype=flat.dtype), top])[labels]


class ForegroundDetector:
    """Boxes of connected regions that differ from the background colour (estimated on the image border).

    Meant for scenes of separate objects on a plain background (the synthetic world); `min_area` (pixels of
    the analysed image, at most `max_side` on its longer side) drops specks and noise.
    """

    name = "foreground"

    def __init__(
        self, min_area: int = 64, threshold: float = 30.0, max_boxes: int = 16, max_side: int = 256
    ) -> None:
        self.min_area = min_area
        self.threshold = threshold
        self.max_boxes = max_boxes
        self.max_side = max_side

    def detect(self, image: Image.Image) -> list[dict[str, Any]]:
        rgb = image.convert("RGB")
        scale = min(1.0, self.max_side / max(rgb.size))
        if scale < 1.0:  # label a small copy: labelling cost grows with pixels x component diameter
            rgb = rgb.resize(
                (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.BOX
            )
        arr = np.asarray(rgb, dtype=np.float32)
        mask, _ = _foreground_mask(arr, self.threshold)
        labels = connected_components(mask)
        ids, counts = np.unique(labels[labels > 0], return_counts=True)
        keep = [(int(c), int(i)) for i, c in zip(ids, counts, strict=True) if c >= self.min_area]
        keep.sort(key=lambda t: (-t[0], t[1]))
        total = float(mask.size)
        out = []
        for count, label in keep[: self.max_boxes]:
            ys, xs = np.nonzero(labels == label)
            box = [xs.min() / scale, ys.min() / scale, (xs.max() + 1) / scale, (ys.max() + 1) / scale]
            box = [min(round(v), lim) for v, lim in zip(box, (image.width, image.height) * 2, strict=True)]
            out.append({"box": box, "score": count / total, "label": "object"})
        return out


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first."""
    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(i)
        rest = np.array(order, dtype=int)
        if rest.size == 0:
            break
        x1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = [j for j, o in zip(order, overlap, strict=True) if o < iou]
    return keep


class Owlv2Detector:
    """Open-vocabulary boxes from transformers' OWLv2, prompted with the database categories.

    The paper used YOLO-World (conf 0.1); OWLv2 plays its role here because it loads through
    `from_pretrained` like every other model of the pipeline. Overlapping boxes are merged by NMS, as
    YOLO-World does internally.
    """

    name = "owlv2"
    open_vocabulary = True

    def __init__(
        self,
        classes: Sequence[str],
        model_id: str = "google/owlv2-base-patch16-ensemble",
        threshold: float = 0.1,
        max_boxes: int = 16,
        nms_iou: float = 0.5,
        prompt: str = "a photo of a {}",
        device: str = "cpu",
    ) -> None:
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        if not classes:
            raise RepicError("owlv2 detector: needs at least one class (the database categories)")
        self.classes = list(classes)
        self.prompts = [prompt.format(c) for c in self.classes]
        self.threshold = threshold
        self.max_boxes = max_boxes
        self.nms_iou = nms_iou
        self.device = device
        self.model = Owlv2ForObjectDetection.from_pretrained(model_id).to(device).eval()
        self.processor = Owlv2Processor.from_pretrained(model_id)

    def detect(self, image: Image.Image) -> list[dict[str, Any]]:
        import torch

        rgb = image.convert("RGB")
        inputs = self.processor(text=[self.prompts], images=rgb, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        # OWLv2 pads the image to a square before resizing: boxes are relative to that square.
        side = max(rgb.size)
        result = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.threshold, target_sizes=[(side, side)], text_labels=[self.classes]
        )[0]
        boxes = result["boxes"].float().cpu().numpy().reshape(-1, 4)
        scores = result["scores"].float().cpu().numpy().reshape(-1)
        labels = result["labels"].cpu().numpy().reshape(-1)
        boxes = np.clip(boxes, 0, [rgb.width, rgb.height, rgb.width, rgb.height])
        valid = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
        return [
            {
                "box": [round(float(v), 2) for v in boxes[i]],  # as RePIC's detector.py rounds YOLO-World's
                "score": float(scores[i]),
                "label": self.classes[int(labels[i])],
            }
            for i in _nms(boxes, scores, self.nms_iou)[: self.max_boxes]
        ]


class YoloWorldDetector:
    """RePIC's own detector: YOLO-World (`yolov8x-worldv2.pt`) through `ultralytics`, `set_classes(categories)`,
    confidence 0.1, as in RePIC's retrieval script.

    Optional: `ultralytics` is AGPL-3.0, so it is not in requirements.txt; install it yourself
    (`pip install ultralytics`) to use this detector. `model_id` is the weights file (fetch it as a pinned `url`
    source; `sha256` checks it again here). `set_classes` embeds the class names with CLIP ViT-B/32, which
    ultralytics downloads on first use (pins/SOURCES.md lists its sha256).
    """

    name = "yolo_world"
    open_vocabulary = True

    def __init__(
        self,
        classes: Sequence[str],
        model_id: str = "yolov8x-worldv2.pt",
        threshold: float = 0.1,
        max_boxes: int = 16,
        sha256: str | None = None,
        device: str = "cpu",
    ) -> None:
        try:
            from ultralytics import YOLO
        except ImportError:
            raise RepicError("yolo_world detector: the optional package 'ultralytics' (AGPL-3.0) is not installed: "
                             "pip install ultralytics, or use detector: owlv2") from None
        path = Path(model_id)
        if not path.is_file():
            raise RepicError(f"yolo_world detector: model_id: {path} does not exist (fetch yolov8x-worldv2.pt "
                             "as a pinned url source)")
        if sha256 is not None:
            from repic.data.sources import file_sha256

            actual = file_sha256(path)
            if actual != sha256:
                raise RepicError(f"yolo_world detector: {path}: sha256 mismatch: expected {sha256}, got {actual}")
        self.classes = list(classes)
        self.threshold = threshold
        self.max_boxes = max_boxes
        self.device = device
        self.model = YOLO(str(path))
        self.model.set_classes(self.classes)

    def detect(self, image: Image.Image) -> list[dict[str, Any]]:
        rgb = image.convert("RGB")
        result = self.model.predict(rgb, conf=self.threshold, device=self.device, verbose=False)[0]
        boxes = np.asarray(result.boxes.xyxy.cpu().numpy(), dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(result.boxes.conf.cpu().numpy(), dtype=np.float32).reshape(-1)
        labels = np.asarray(result.boxes.cls.cpu().numpy()).reshape(-1).astype(int)
        boxes = np.clip(boxes, 0, [rgb.width, rgb.height, rgb.width, rgb.height])
        order = np.argsort(-scores, kind="stable")[: self.max_boxes]  # YOLO-World has applied its own NMS
        # RePIC's detector.py: each box rounded to 2 decimals, then cropped (PIL rounds it to pixels)
        return [{"box": [round(float(v), 2) for v in boxes[i]], "score": float(scores[i]),
                 "label": self.classes[labels[i]] if 0 <= labels[i] < len(self.classes) else str(labels[i])}
                for i in order if boxes[i, 2] - boxes[i, 0] >= 1 and boxes[i, 3] - boxes[i, 1] >= 1]


DETECTORS: dict[str, Callable[..., Detector]] = {
    ForegroundDetector.name: ForegroundDetector,
    Owlv2Detector.name: Owlv2Detector,
    YoloWorldDetector.name: YoloWorldDetector,
}


def make_detector(name: str, *, classes: Sequence[str] = (), device: str = "cpu", **kw: Any) -> Detector:
    """Build the detector registered as `name` (see `DETECTORS`) with its keyword arguments.

    An open-vocabulary detector (owlv2, yolo_world) is prompted with `classes` (the database's categories,
    `database_categories`) and runs on `device` (the pipeline's `base.device`); the offline foreground detector
    needs neither.
    """
    if name not in DETECTORS:
        raise RepicError(f"unknown detector {name!r}; expected one of {sorted(DETECTORS)}")
    cls = DETECTORS[name]
    if getattr(cls, "open_vocabulary", False):
        if not classes:
            raise RepicError(f"{name} detector: needs at least one class (the database categories)")
        kw = {"classes": list(classes), "device": device, **kw}
    return cls(**kw)


# =================================================================================================== index
def database_entries(database_json: Path) -> list[tuple[str, str]]:
    """(image path as stored, concept key) for every database image, in file order, each image once."""
    from repic.data.validate import load_database

    db = load_database(database_json)
    entries: dict[str, str] = {}
    for image, key in (db.get("path_to_concept") or {}).items():
        entries.setdefault(image, key)
    # Concepts whose image path_to_concept forgot are still retrievable.
    for key, concept in db["concept_dict"].items():
        if isinstance(concept, dict) and concept.get("image"):
            entries.setdefault(concept["image"], key)
    unknown = sorted({k for k in entries.values() if k not in db["concept_dict"]})
    if unknown:
        log.warning("%s: path_to_concept names keys absent from concept_dict: %s", database_json, unknown)
    return list(entries.items())


def database_categories(database_json: Path) -> list[str]:
    """The distinct concept categories of a database, sorted: the open-vocabulary detector's classes."""
    db = read_json(database_json)
    return sorted({c["category"] for c in db.get("concept_dict", {}).values() if c.get("category")})


def missing_database_images(database_json: Path, root: Path) -> list[str]:
    """Database image paths (as stored in the JSON) that do not exist under `root`."""
    return [
        image for image, _ in database_entries(database_json) if not resolve_image(root, image).is_file()
    ]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif")  # the files RePIC's retriever.py indexes


def unlisted_images(database_json: Path, root: Path) -> list[str]:
    """Image files under the database's folder that the database does not list (as `./`-relative paths in the
    JSON's style when the listed ones are, sorted). RePIC's retriever walks the folder and indexes every such file
    (its 4-concept database: three squidgame images with no concept); `build_index(..., unlisted=True)` does too."""
    listed = [image for image, _ in database_entries(database_json)]
    folder = Path(database_json).parent
    prefix = "./" if listed and all(p.startswith("./") for p in listed) else ""
    known = {os.path.normpath(resolve_image(root, p)) for p in listed}
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and os.path.normpath(path) not in known:
            out.append(prefix + os.path.relpath(path, root).replace(os.sep, "/"))
    return out


def build_index(
    database_json: Path, root: Path, embedder: Embedder, *, batch_size: int = 32, unlisted: bool = False
) -> tuple[faiss.Index, list[dict[str, Any]]]:
    """An exact inner-product index (cosine on L2-normalised rows) with one entry per database image.

    `id_map[i]` = `{"id": i, "key": "<concept>", "image": path as stored in the JSON}`. Images missing from
    disk are skipped with a warning (list them with `missing_database_images`). With `unlisted`, the image files
    under the database folder that it does not list follow (`unlisted_images`), each with `"key": None`: RePIC's
    index holds them too (same ranking: RePIC's L2 distance on unit vectors orders as this inner product).
    """
    present = []
    entries = database_entries(database_json)
    if unlisted:
        entries += [(image, None) for image in unlisted_images(database_json, root)]
    for image, key in entries:
        if resolve_image(root, image).is_file():
            present.append((image, key))
        else:
            log.warning("%s: database image %s is missing; it is not indexed", database_json, image)
    if not present:
        raise RepicError(f"{database_json}: none of its images exist under {root}")
    from repic.core.progress import Progress

    chunks = []
    with Progress(len(present), f"embed {Path(database_json).parent.name}", unit="image") as bar:
        for start in range(0, len(present), batch_size):
            batch = [open_image(resolve_image(root, image)) for image, _ in present[start : start + batch_size]]
            chunks.append(embedder.embed(batch))
            bar.update(len(batch))
    vectors = np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    id_map = [{"id": i, "key": key, "image": image} for i, (image, key) in enumerate(present)]
    return index, id_map


def save_index(
    directory: Path, index: faiss.Index, id_map: list[dict[str, Any]], meta: dict[str, Any]
) -> None:
    """Write `index.faiss`, `id_map.json` and `meta.json` into `directory`, each atomically, meta last."""
    if index.ntotal != len(id_map):
        raise RepicError(
            f"save_index: index holds {index.ntotal} vectors but id_map has {len(id_map)} entries"
        )
    directory = Path(directory)
    with atomic_path(directory / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    write_json(directory / ID_MAP_FILE, id_map)
    write_json(directory / INDEX_META, {**meta, "ntotal": int(index.ntotal), "dim": int(index.d)})


def load_index(directory: Path) -> tuple[faiss.Index, list[dict[str, Any]], dict[str, Any]]:
    """(index, id_map, meta) as written by `save_index`; checks that the three files agree."""
    directory = Path(directory)
    path = directory / INDEX_FILE
    if not path.is_file():
        raise RepicError(f"{path}: file not found")
    index = faiss.read_index(str(path))
    id_map = read_json(directory / ID_MAP_FILE)
    meta = read_json(directory / INDEX_META)
    if index.ntotal != len(id_map) or meta.get("ntotal", index.ntotal) != index.ntotal:
        raise RepicError(
            f"{directory}: index holds {index.ntotal} vectors, id_map {len(id_map)} entries, "
            f"meta says {meta.get('ntotal')}: rebuild the index"
        )
    return index, id_map, meta


# =============================================================================================== retrieval
def _padded(box: Sequence[float], pad: float, width: int, height: int) -> tuple[float, ...]:
    """A box grown by `pad` of its size on each side (at least 2 px), so a crop shows some background; `pad` 0
    keeps the box as the detector gave it (RePIC's detector.py)."""
    if pad == 0:
        return tuple(box)
    x1, y1, x2, y2 = box
    px, py = max(2, round((x2 - x1) * pad)), max(2, round((y2 - y1) * pad))
    return max(0, x1 - px), max(0, y1 - py), min(width, x2 + px), min(height, y2 + py)


ON_EMPTY = ("whole_image", "no_references")  # params caption.retrieval.on_empty


def retrieve(
    query_image: Image.Image | str | os.PathLike,
    index: faiss.Index,
    id_map: list[dict[str, Any]],
    embedder: Embedder,
    detector: Detector | None,
    k: int,
    *,
    root: Path | None = None,
    include_whole_image: bool = True,
    pad: float = 0.1,
    on_empty: str = "whole_image",
) -> list[dict[str, Any]]:
    """The top-`k` distinct concepts for a query: crops -> embeddings -> per-crop top-k -> pooled top-k.

    Crops are the detector's boxes (padded by `pad`; 0: as given, as RePIC crops them) plus, if
    `include_whole_image`, the whole query. When the detector finds nothing: `on_empty` `whole_image` searches
    with the whole query, `no_references` returns no hit (RePIC: its retriever gets no crop, the model no
    reference). Pooled hits are deduplicated by concept key (an unlisted image, key None, by its path), keeping
    the most similar one. Each result: `{"rank", "key", "image", "score" (cosine similarity),
    "crop": [x1, y1, x2, y2], "missing": bool}`; `missing` is True when the hit's database image no longer exists
    under `root` (paths are taken as stored when `root` is None) -- reported, never raised.
    """
    if k < 1:
        raise RepicError(f"retrieve: k must be >= 1, got {k}")
    if on_empty not in ON_EMPTY:
        raise RepicError(f"retrieve: on_empty: expected {'|'.join(ON_EMPTY)}, got {on_empty!r}")
    image = query_image if isinstance(query_image, Image.Image) else open_image(query_image)
    image = image.convert("RGB")
    boxes = (
        [_padded(d["box"], pad, image.width, image.height) for d in detector.detect(image)]
        if detector
        else []
    )
    if not boxes and on_empty == "no_references" and not include_whole_image:
        return []
    if include_whole_image or not boxes:
        boxes.append((0, 0, image.width, image.height))
    vectors = embedder.embed([image.crop(b) for b in boxes])
    if vectors.shape[1] != index.d:
        raise RepicError(
            f"retrieve: embedder gives {vectors.shape[1]}-d vectors, the index holds {index.d}-d"
        )
    scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, index.ntotal))
    best: dict[Any, tuple[float, int, int]] = {}
    for crop_i in range(len(boxes)):
        for score, idx in zip(scores[crop_i], ids[crop_i], strict=True):
            if idx < 0 or idx >= len(id_map):  # faiss pads with -1 when it has fewer hits
                continue
            key = id_map[idx]["key"]
            key = key if key is not None else ("unlisted", id_map[idx]["image"])
            if key not in best or score > best[key][0]:
                best[key] = (float(score), int(idx), crop_i)
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:k]
    results = []
    for rank, (_, (score, idx, crop_i)) in enumerate(ranked, start=1):
        stored = id_map[idx]["image"]
        path = resolve_image(root, stored) if root is not None else Path(stored)
        results.append(
            {
                "rank": rank,
                "key": id_map[idx]["key"],
                "image": stored,
                "score": score,
                "crop": list(boxes[crop_i]),
                "missing": not path.is_file(),
            }
        )
    return results


def retrieval_recall(retrieved_keys: list[list[str]], gt_keys: list[list[str]]) -> float:
    """Recall@k over all queries: the fraction of ground-truth keys found among the retrieved ones.

    >>> retrieval_recall([["<a>", "<b>"], ["<c>"]], [["<a>"], ["<d>", "<c>"]])
    0.6666666666666666
    """
    if len(retrieved_keys) != len(gt_keys):
        raise RepicError(f"retrieval_recall: {len(retrieved_keys)} retrievals for {len(gt_keys)} queries")
    total = sum(len(g) for g in gt_keys)
    if total == 0:
        return 0.0
    found = sum(len(set(g) & set(r)) for r, g in zip(retrieved_keys, gt_keys, strict=True))
    return found / total
