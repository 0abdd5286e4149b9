"""Images as RePIC's caption scripts hand them to the processor: qwen_vl_utils' `process_vision_info` behaviour.

RePIC's scripts put image paths into the conversation and call `qwen_vl_utils.process_vision_info`, whose
`fetch_image` opens each file (no EXIF rotation), composites an RGBA image on white (any other mode is converted to
RGB), and resizes it with PIL's default filter to `smart_resize`'s size: both sides multiples of 28, the area
between 4*28*28 and 16384*28*28 pixels. The processor (max_pixels 1024*28*28 in RePIC's scripts) then resizes that
image again, so the token grid is not always the one the processor alone gives the original (a 2500x2500 photo:
32x32 patches of 28 px after fetch_image, 31x31 from the processor alone). Reimplemented here (qwen_vl_utils needs
torchvision, which the CPU environment lacks); tests/test_eval_fidelity.py compares sizes and pixels with
qwen_vl_utils 0.0.14's on a grid of sizes (tests/data/qwen_vl_utils_fetch_image.json).
"""

from __future__ import annotations

import math
import os

from PIL import Image

from repic.core.io import RepicError, open_rgb, resolve_image

IMAGE_FACTOR = 28                 # patch 14 x spatial merge 2
MIN_PIXELS = 4 * IMAGE_FACTOR ** 2
MAX_PIXELS = 16384 * IMAGE_FACTOR ** 2
MAX_RATIO = 200
PREPROCESS = ("qwen_vl_utils", "processor")  # params caption.preprocess


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width): both multiples of `factor`, the area within [min_pixels, max_pixels], the aspect ratio kept
    as closely as possible (qwen_vl_utils' rule: round to the factor, else scale down with floor / up with ceil)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise RepicError(f"image {width}x{height}: aspect ratio above {MAX_RATIO}, which qwen_vl_utils refuses")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """RGBA composited on a white background; every other mode converted to RGB."""
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def fetch_image(image: Image.Image) -> Image.Image:
    """The image as qwen_vl_utils' `fetch_image` returns it (defaults: no min/max_pixels in the message)."""
    rgb = to_rgb(image)
    height, width = smart_resize(rgb.height, rgb.width)
    return rgb.resize((width, height))


# Decoded (and, for qwen_vl_utils, resized) images kept per process, least recently used dropped past this many
# bytes of pixels. A caption stage shows each reference image of a database in many conversations (4-concept: 210
# conversations, 1,050 images, 36 distinct files). In the paper rehearsal's copy of RePIC's data, a dataset's
# references and query photos come to at most 192 MB of RGB pixels after fetch_image (4_concepts: 32 references +
# 4 photos; myvlm 33 MB), so one dataset's images all fit, with room; a larger set drops query photos first (the
# references come back every few conversations), and a stage's memory grows by at most this bound.
CACHE_BYTES = 512 * 2 ** 20


class _LoadCache:
    """Images by (file identity, preprocessing); `decoded`/`requested` count files read and images asked for."""

    def __init__(self, max_bytes: int) -> None:
        from collections import OrderedDict

        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict = OrderedDict()
        self.decoded = self.requested = 0

    def get(self, key: tuple) -> Image.Image | None:
        image = self.entries.get(key)
        if image is not None:
            self.entries.move_to_end(key)
        return image

    def put(self, key: tuple, image: Image.Image) -> None:
        size = image.width * image.height * len(image.getbands())
        if size > self.max_bytes:
            return
        self.entries[key] = image
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.width * old.height * len(old.getbands())

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = self.decoded = self.requested = 0


LOADED = _LoadCache(CACHE_BYTES)


def load_for_processor(root: str | os.PathLike, rel: str, preprocess: str) -> Image.Image:
    """An image stored at `rel` (relative to `root`) as the captioning processor gets it: `qwen_vl_utils`
    (RePIC's scripts: `fetch_image`) or `processor` (opened as RGB, the processor alone resizes).

    Each file (path, device, inode, size, modification time) is read and resized once per process (`LOADED`, an
    LRU of `CACHE_BYTES`): the same file gives the same image object again, which callers must not modify."""
    if preprocess not in PREPROCESS:
        raise RepicError(f"caption.preprocess: expected {'|'.join(PREPROCESS)}, got {preprocess!r}")
    path = resolve_image(root, rel)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise RepicError(f"cannot read image {path} ({exc})") from None
    resize = (IMAGE_FACTOR, MIN_PIXELS, MAX_PIXELS) if preprocess == "qwen_vl_utils" else None
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, preprocess, resize)
    LOADED.requested += 1
    image = LOADED.get(key)
    if image is None:
        image = _load(root, rel, preprocess)
        LOADED.decoded += 1
        LOADED.put(key, image)
    return image


def _load(root: str | os.PathLike, rel: str, preprocess: str) -> Image.Image:
    if preprocess == "processor":
        return open_rgb(root, rel)
    path = resolve_image(root, rel)
    try:
        with Image.open(path) as im:
            im.load()
            return fetch_image(im)
    except OSError as exc:
        raise RepicError(f"cannot read image {path} ({exc})") from None
