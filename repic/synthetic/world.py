"""Seeded synthetic "concept world" written in exactly RePIC's data formats (the embedded default's data).

`make_world(root, seed=...)` writes, under `root` (laid out like the RePIC repository root):

    data/database_tot/database_synthetic/database_mod.json   + one reference PNG per concept
    data/query-image-synthetic/{single,multi2,multi4}/scene_NNN.png
    data/query_tot/synthetic_{single,2_concept,4_concept}_query_templates.json
    data/query_tot/synthetic_boxes.json                       ground-truth boxes (sidecar, not a RePIC file)
    data/training/train.json                                  RePIC's training schema, all four reward methods
    data/training/images_synthetic/*.png

Every path stored inside the JSON files is relative to `root` and written "./data/...", as in RePIC's files,
so `repic.core.io.resolve_image(root, path)` opens it. Boxes are `[x1, y1, x2, y2]` integer pixels with x2/y2
exclusive (PIL's `getbbox` convention), covering the pixels of the object whose alpha is at least one half.

Concepts are procedural objects (shape x colour pair x pattern), drawn with PIL on a neutral background with
seeded jitter of rotation, scale and position, so a reference rendering and a query rendering of one concept
differ. Distractors use shapes and muted colours that no concept uses. Training uses its own concepts (names
and looks disjoint from the evaluation database), so nothing evaluated is seen in training, as in RePIC
(trained on other data than its evaluation sets). Same arguments -> byte-identical files.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from repic.core.io import RepicError, atomic_path, write_json
from repic.core.layout import REWARD_METHODS
from repic.core.prompts import CAPTION_QUESTIONS, reference_line

# Saturated or dark colours only: all of them must stand clearly apart from the light neutral background,
# otherwise the foreground detector would split an object where its pattern touches the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (245, 133, 24),
    "yellow": (236, 200, 20),
    "green": (44, 160, 44),
    "teal": (23, 160, 160),
    "blue": (31, 87, 220),
    "purple": (128, 60, 190),
    "pink": (231, 84, 168),
    "brown": (120, 68, 28),
    "black": (28, 28, 32),
}
# Muted colours for distractors: no concept uses them, so a distractor crop never looks like a concept.
DISTRACTOR_PALETTE: dict[str, tuple[int, int, int]] = {
    "grey": (132, 132, 132),
    "slate": (96, 108, 120),
    "white": (252, 252, 250),
    "olive": (140, 138, 96),
}
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star", "heart", "semicircle")
DISTRACTOR_SHAPES = ("cross", "crescent", "bar", "ring")
PATTERNS = ("stripes", "dots", "checks", "core", "half")
CATEGORIES = ("toy", "pet", "mug", "robot", "plush toy", "figurine")
METHODS = REWARD_METHODS

DATABASE_DIR = "data/database_tot/database_synthetic"
QUERY_DIR = "data/query-image-synthetic"
QUERY_TEMPLATES_DIR = "data/query_tot"
TRAIN_DIR = "data/training"
TRAIN_IMAGE_DIR = "data/training/images_synthetic"
QUERY_FILES = {
    "single": "synthetic_single_query_templates.json",
    "multi2": "synthetic_2_concept_query_templates.json",
    "multi4": "synthetic_4_concept_query_templates.json",
}
BOXES_FILE = "synthetic_boxes.json"

_CONSONANTS = "bdfgklmprstvz"
_CLUSTERS = ("bl", "br", "dr", "fl", "gl", "gr", "kl", "kr", "pl", "pr", "sk", "sl", "sp", "st", "tr", "zw")
_VOWELS = "aeiou"
# Words our prompts and infos use: a name equal to one of them would be "found" in any caption.
_RESERVED = (
    set(PALETTE) | set(DISTRACTOR_PALETTE) | set(SHAPES) | set(PATTERNS) | {w for c in CATEGORIES for w in c.split()}
    | {"shaped", "image", "first", "query", "name", "info", "other", "objects", "corner", "light", "together"}
)


@dataclass(frozen=True)
class Concept:
    name: str
    shape: str
    primary: str
    secondary: str
    pattern: str
    category: str

    @property
    def key(self) -> str:
        return f"<{self.name}>"

    @property
    def info(self) -> str:
        looks = {
            "stripes": f"with {self.secondary} stripes",
            "dots": f"with {self.secondary} polka dots",
            "checks": f"with a {self.secondary} checkered pattern",
            "core": f"with a {self.secondary} {self.shape} in its centre",
            "half": f"whose right half is {self.secondary}",
        }[self.pattern]
        article = "An" if self.primary[0] in "aeiou" else "A"
        return f"{article} {self.primary} {self.shape}-shaped {self.category} {looks}."


@dataclass(frozen=True)
class _Placed:
    """One object drawn into a scene: its concept key (None for a distractor) and its box."""

    key: str | None
    box: tuple[int, int, int, int]


# ----------------------------------------------------------------------------------------------- names
def made_up_names(rng: random.Random, n: int) -> list[str]:
    """`n` distinct pronounceable made-up names of 4-6 letters (concepts, and the warm-up's practice names)."""
    names: list[str] = []
    for _ in range(10000 * max(n, 1)):
        if len(names) == n:
            return names
        form = rng.choice(("CVC", "CCVC", "CVCV", "CVCVC", "CCVCV"))
        parts, i = [], 0
        while i < len(form):
            if form[i : i + 2] == "CC":
                parts.append(rng.choice(_CLUSTERS))
                i += 2
                continue
            parts.append(rng.choice(_CONSONANTS if form[i] == "C" else _VOWELS))
            i += 1
        name = "".join(parts)
        # "no"/"yes" inside a name would be caught by the yes/no reward's substring search (RePIC's quirk);
        # a name inside another name would make substring-based name rewards ambiguous.
        if not 4 <= len(name) <= 6 or "no" in name or "yes" in name or name in _RESERVED:
            continue
        if any(name in other or other in name for other in names):
            continue
        names.append(name)
    raise RepicError(f"could not invent {n} distinct concept names")


# -------------------------------------------------------------------------------------------- concepts
def _pick_looks(rng: random.Random, n: int) -> list[tuple[str, str, str, str]]:
    """Choose `n` (shape, primary, secondary, pattern) looks, as different from each other as possible."""
    combos = [
        (shape, p, s, pattern)
        for shape in SHAPES
        for p in PALETTE
        for s in PALETTE
        for pattern in PATTERNS
        if p != s
    ]
    rng.shuffle(combos)
    chosen: list[tuple[str, str, str, str]] = []
    # Strictest rule first (3 of 4 attributes differ and a colour pair is never reused), relaxed only when a
    # large world cannot satisfy it: colour is the strongest cue any embedder has.
    for min_diff, unique_pair in ((3, True), (2, True), (2, False), (1, False)):
        for combo in combos:
            if len(chosen) == n:
                return chosen
            if combo in chosen:
                continue
            if unique_pair and any({combo[1], combo[2]} == {c[1], c[2]} for c in chosen):
                continue
            if all(sum(a != b for a, b in zip(combo, c, strict=True)) >= min_diff for c in chosen):
                chosen.append(combo)
    if len(chosen) < n:
        raise RepicError(f"at most {len(chosen)} distinct concepts can be drawn, {n} requested")
    return chosen


def make_concepts(seed: int, n_eval: int, n_train: int) -> tuple[list[Concept], list[Concept]]:
    """Evaluation and training concepts of the world: names and looks are disjoint between the two sets."""
    rng = random.Random(f"{seed}/concepts")
    total = n_eval + n_train
    names = made_up_names(rng, total)
    looks = _pick_looks(rng, total)
    concepts = [
        Concept(name, *look, category=rng.choice(CATEGORIES)) for name, look in zip(names, looks, strict=True)
    ]
    return concepts[:n_eval], concepts[n_eval:]


# ------------------------------------------------------------------------------------------- rendering
def _polygon(
    n: int, cx: float, cy: float, r: float, phase: float = -math.pi / 2
) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(phase + 2 * math.pi * i / n), cy + r * math.sin(phase + 2 * math.pi * i / n))
        for i in range(n)
    ]


def _shape_mask(shape: str, s: int) -> Image.Image:
    """A white-on-black mask of `shape` filling an s x s square (small margin)."""
    mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(mask)
    m = s * 0.04
    c = s / 2
    r = s / 2 - m
    if shape == "circle":
        d.ellipse((m, m, s - m, s - m), fill=255)
    elif shape == "square":
        d.rectangle((s * 0.1, s * 0.1, s * 0.9, s * 0.9), fill=255)
    elif shape == "triangle":
        d.polygon([(c, m), (s - m, s - m), (m, s - m)], fill=255)
    elif shape == "diamond":
        d.polygon([(c, m), (s - m, c), (c, s - m), (m, c)], fill=255)
    elif shape == "hexagon":
        d.polygon(_polygon(6, c, c, r, phase=0.0), fill=255)
    elif shape == "star":
        outer, inner = (
            _polygon(5, c, c * 1.08, r),
            _polygon(5, c, c * 1.08, r * 0.45, phase=-math.pi / 2 + math.pi / 5),
        )
        d.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=255)
    elif shape == "heart":
        pts = []
        for i in range(64):
            t = 2 * math.pi * i / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((c + x * r / 17, c * 0.95 - y * r / 17))
        d.polygon(pts, fill=255)
    elif shape == "semicircle":
        top = s * 0.27
        d.pieslice((m, top, s - m, top + s - 2 * m), 180, 360, fill=255)
    elif shape == "cross":
        w = s * 0.14
        d.rectangle((c - w, m, c + w, s - m), fill=255)
        d.rectangle((m, c - w, s - m, c + w), fill=255)
    elif shape == "crescent":
        d.ellipse((m, m, s - m, s - m), fill=255)
        d.ellipse((m + s * 0.28, m - s * 0.06, s - m + s * 0.28, s - m - s * 0.06), fill=0)
    elif shape == "bar":
        d.rectangle((m, c - s * 0.11, s - m, c + s * 0.11), fill=255)
    elif shape == "ring":
        d.ellipse((m, m, s - m, s - m), fill=255)
        d.ellipse((s * 0.24, s * 0.24, s * 0.76, s * 0.76), fill=0)
    else:
        raise RepicError(f"unknown shape {shape!r}")
    return mask


def _pattern_layer(concept: Concept, s: int) -> Image.Image:
    """The concept's surface (primary colour + secondary pattern) over a full s x s square."""
    layer = Image.new("RGB", (s, s), PALETTE[concept.primary])
    d = ImageDraw.Draw(layer)
    sec = PALETTE[concept.secondary]
    if concept.pattern == "stripes":
        period = s / 5
        for i in range(6):
            d.rectangle((0, i * period, s, i * period + period / 2), fill=sec)
    elif concept.pattern == "dots":
        step, rad = s / 4, s / 12
        for i, j in itertools.product(range(4), range(4)):
            x, y = (i + 0.5) * step, (j + 0.5) * step
            d.ellipse((x - rad, y - rad, x + rad, y + rad), fill=sec)
    elif concept.pattern == "checks":
        step = s / 4
        for i, j in itertools.product(range(4), range(4)):
            if (i + j) % 2:
                d.rectangle((i * step, j * step, (i + 1) * step, (j + 1) * step), fill=sec)
    elif concept.pattern == "core":
        inner = _shape_mask(concept.shape, s // 2)
        layer.paste(Image.new("RGB", inner.size, sec), (s // 4, s // 4), inner)
    elif concept.pattern == "half":
        d.rectangle((s // 2, 0, s, s), fill=sec)
    return layer


def _sprite(look: Concept | tuple[str, str], extent: int, angle: float) -> Image.Image:
    """An RGBA rendering, rotated by `angle` degrees, whose larger side is exactly `extent` pixels."""
    s = max(2 * extent, 48)  # drawn at 2x, then box-filtered down: smooth edges, crisp pattern
    if isinstance(look, Concept):
        mask, surface = _shape_mask(look.shape, s), _pattern_layer(look, s)
    else:
        shape, colour = look
        mask, surface = _shape_mask(shape, s), Image.new("RGB", (s, s), DISTRACTOR_PALETTE[colour])
    sprite = surface.convert("RGBA")
    sprite.putalpha(mask)
    sprite = sprite.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    sprite = sprite.crop(sprite.getbbox())
    scale = extent / max(sprite.size)
    size = (max(1, round(sprite.width * scale)), max(1, round(sprite.height * scale)))
    return sprite.resize(size, resample=Image.Resampling.BOX)


def _canvas(rng: random.Random, size: int) -> Image.Image:
    """A light neutral background with faint noise (a flat colour would make detection trivially exact)."""
    grey = rng.randint(196, 218)
    base = np.array([grey + rng.randint(-5, 5) for _ in range(3)], dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(63)).integers(-3, 4, size=(size, size, 3), dtype=np.int16)
    return Image.fromarray((base + noise).astype(np.uint8), "RGB")


def _paste(canvas: Image.Image, sprite: Image.Image, x: int, y: int) -> tuple[int, int, int, int]:
    canvas.paste(sprite, (x, y), sprite)
    alpha = np.asarray(sprite.getchannel("A")) >= 128
    ys, xs = np.nonzero(alpha)
    return (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)


def render_reference(concept: Concept, rng: random.Random, size: int) -> Image.Image:
    """One concept alone, roughly centred, as in RePIC's database images."""
    canvas = _canvas(rng, size)
    sprite = _sprite(concept, round(size * rng.uniform(0.55, 0.72)), rng.uniform(-20, 20))
    free_x, free_y = size - sprite.width, size - sprite.height
    x = round(free_x / 2 + rng.uniform(-0.3, 0.3) * free_x)
    y = round(free_y / 2 + rng.uniform(-0.3, 0.3) * free_y)
    _paste(canvas, sprite, x, y)
    return canvas


def render_scene(
    concepts: Sequence[Concept], n_distractors: int, rng: random.Random, size: int
) -> tuple[Image.Image, list[_Placed]]:
    """Concepts and distractors in distinct cells of a grid, so their boxes never overlap or touch.

    The grid is 2x2 for up to 2 concepts and 3x3 above; distractors fill free cells only, so a large
    `n_distractors` never shrinks the concepts.
    """
    grid = 2 if len(concepts) <= 2 else 3
    n_distractors = max(0, min(n_distractors, grid * grid - len(concepts)))
    n_objects = len(concepts) + n_distractors
    cell = size // grid
    margin = 3
    canvas = _canvas(rng, size)
    objects: list[Concept | tuple[str, str]] = list(concepts)
    objects += [
        (rng.choice(DISTRACTOR_SHAPES), rng.choice(sorted(DISTRACTOR_PALETTE))) for _ in range(n_distractors)
    ]
    placed = []
    for obj, slot in zip(objects, rng.sample(range(grid * grid), n_objects), strict=True):
        extent = min(round(cell * rng.uniform(0.6, 0.85)), cell - 2 * margin)
        sprite = _sprite(obj, extent, rng.uniform(-20, 20))
        x0, y0 = (slot % grid) * cell + margin, (slot // grid) * cell + margin
        x = x0 + rng.randint(0, cell - 2 * margin - sprite.width)
        y = y0 + rng.randint(0, cell - 2 * margin - sprite.height)
        box = _paste(canvas, sprite, x, y)
        placed.append(_Placed(obj.key if isinstance(obj, Concept) else None, box))
    return canvas, placed


# ------------------------------------------------------------------------------------------------ files
def _rel(root: Path, path: Path) -> str:
    return "./" + path.relative_to(root).as_posix()


class _ImageWriter:
    """Saves PNGs atomically and remembers them, so stale images of an earlier world can be removed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.written: set[Path] = set()

    def save(self, image: Image.Image, rel_path: str) -> str:
        path = self.root / rel_path
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", compress_level=1)  # speed over size: the world is rebuilt often
        self.written.add(path)
        return _rel(self.root, path)

    def remove_stale(self, dirs: Sequence[str]) -> None:
        for d in dirs:
            for path in sorted((self.root / d).rglob("*.png")):
                if path not in self.written:
                    path.unlink()


def _cycle(rng: random.Random, items: Sequence[Any], n: int) -> list[Any]:
    """`n` items drawn by going through seeded permutations of `items`: balanced use of every item."""
    out: list[Any] = []
    while len(out) < n:
        perm = list(items)
        rng.shuffle(perm)
        out += perm
    return out[:n]


def _groups(rng: random.Random, concepts: Sequence[Concept], size: int, n: int) -> list[list[Concept]]:
    """`n` distinct `size`-subsets of concepts (repeating only once all subsets are used)."""
    if n == 0:
        return []
    if len(concepts) < size:
        raise RepicError(f"{size}-concept scenes need at least {size} concepts, got {len(concepts)}")
    # Enumerating all subsets is fine for the small worlds this module is for; sample when it would not be.
    if math.comb(len(concepts), size) <= 20000:
        subsets = [list(c) for c in itertools.combinations(concepts, size)]
        return [rng.sample(g, size) for g in _cycle(rng, subsets, n)]
    return [rng.sample(list(concepts), size) for _ in range(n)]


def _write_queries(
    writer: _ImageWriter,
    concepts: list[Concept],
    *,
    seed: int,
    counts: dict[str, int],
    n_distractors: int,
    multi4_scene_concepts: int,
    image_size: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, list[int]]]]:
    templates: dict[str, dict[str, Any]] = {kind: {} for kind in QUERY_FILES}
    boxes: dict[str, dict[str, list[int]]] = {}
    rng = random.Random(f"{seed}/queries")
    scenes = {
        "single": [[c] for c in _cycle(rng, concepts, counts["single"])],
        "multi2": _groups(rng, concepts, 2, counts["multi2"]),
        "multi4": _groups(rng, concepts, multi4_scene_concepts, counts["multi4"]),
    }
    for kind, groups in scenes.items():
        for i, group in enumerate(groups):
            image_rng = random.Random(f"{seed}/query/{kind}/{i}")
            image, placed = render_scene(group, n_distractors, image_rng, image_size)
            rel = writer.save(image, f"{QUERY_DIR}/{kind}/scene_{i:03d}.png")
            keys = [c.key for c in group]
            # RePIC's 4-concept file maps a group photo to the list of 4-key subsets asked about it.
            templates[kind][rel] = (
                [list(s) for s in itertools.combinations(keys, 4)] if kind == "multi4" else keys
            )
            boxes[rel] = {p.key: list(p.box) for p in placed if p.key is not None}
    return templates, boxes


def captioning_problem(concepts: Sequence[Concept], question: str, keys: Sequence[str] | None = None) -> str:
    """The text of a captioning prompt in one block (a training sample's images all come first): one
    reference line per concept (under `keys`, default its own), then the query line and `question`."""
    keys = [c.key for c in concepts] if keys is None else keys
    refs = "".join(reference_line(i, {"name": k, "info": c.info})
                   for i, (k, c) in enumerate(zip(keys, concepts, strict=True), start=1))
    return f"{refs}This is the query image. {question}"


def _training_samples(
    writer: _ImageWriter,
    concepts: list[Concept],
    *,
    seed: int,
    per_method: int,
    n_distractors: int,
    image_size: int,
) -> list[dict[str, Any]]:
    rng = random.Random(f"{seed}/training")
    samples: list[dict[str, Any]] = []

    def ref(c: Concept, tag: str) -> str:
        return writer.save(
            render_reference(c, random.Random(f"{seed}/train/{tag}"), image_size),
            f"{TRAIN_IMAGE_DIR}/{tag}.png",
        )

    def scene(group: list[Concept], tag: str) -> tuple[str, list[_Placed]]:
        image, placed = render_scene(group, n_distractors, random.Random(f"{seed}/train/{tag}"), image_size)
        return writer.save(image, f"{TRAIN_IMAGE_DIR}/{tag}.png"), placed

    def others(c: Concept, n: int) -> list[Concept]:
        return rng.sample([o for o in concepts if o != c], min(n, len(concepts) - 1))

    for i, c in enumerate(_cycle(rng, concepts, per_method)):
        positive = i % 2 == 0  # alternate so "yes" and "no" are balanced (differ by at most one)
        group = [c, *others(c, rng.randint(0, 1))] if positive else others(c, rng.randint(1, 2))
        scene_path, _ = scene(group, f"yes_no_{i:03d}_scene")
        samples.append(
            {
                "image": [ref(c, f"yes_no_{i:03d}_ref"), scene_path],
                "problem": f"The first image shows {c.key}. Is {c.key} in the second image?",
                "solution": "yes" if positive else "no",
                "accu_reward_method": "yes_no",
            }
        )
    for i, c in enumerate(_cycle(rng, concepts, per_method)):
        scene_path, placed = scene([c, *others(c, rng.randint(0, 1))], f"iou_{i:03d}_scene")
        box = next(p.box for p in placed if p.key == c.key)
        samples.append(
            {
                "image": scene_path,
                "problem": f"{c.key} is {c.info[0].lower()}{c.info[1:-1]}. "
                f"Give the bounding box of {c.key} in the image as [x1, y1, x2, y2] in pixels.",
                "solution": list(box),
                "accu_reward_method": "iou",
            }
        )
    # Identity consistency is trained on the personalized-captioning task itself, as RePIC does: the reference
    # lines and questions of the captioning prompt (repic.core.prompts), the images first, training concepts only.
    for i, c in enumerate(_cycle(rng, concepts, per_method)):
        scene_path, _ = scene([c, *others(c, rng.randint(0, 1))], f"name_{i:03d}_scene")
        samples.append(
            {
                "image": [ref(c, f"name_{i:03d}_ref"), scene_path],
                "problem": captioning_problem([c], rng.choice(CAPTION_QUESTIONS)),
                "solution": c.key,
                "accu_reward_method": "yes_no_name",
            }
        )
    for i, (a, b) in enumerate(_groups(rng, concepts, 2, per_method)):
        scene_path, _ = scene([a, b], f"multi_{i:03d}_scene")
        samples.append(
            {
                "image": [ref(a, f"multi_{i:03d}_ref1"), ref(b, f"multi_{i:03d}_ref2"), scene_path],
                "problem": captioning_problem([a, b], rng.choice(CAPTION_QUESTIONS)),
                "solution": [a.key, b.key],
                "accu_reward_method": "yes_no_name_multi",
            }
        )
    rng.shuffle(samples)
    return samples


def make_world(
    root: Path,
    *,
    seed: int,
    n_concepts: int,
    n_distractors: int,
    queries_single: int,
    queries_multi2: int,
    queries_multi4: int,
    train_per_method: int,
    image_size: int,
    n_train_concepts: int | None = None,
    multi4_scene_concepts: int = 4,
) -> dict[str, Any]:
    """Write the synthetic world under `root` (see the module docstring) and return a summary of it.

    `n_distractors` is per query scene (capped by the free cells of the scene's grid); `n_train_concepts`
    (default `n_concepts`) concepts, disjoint from the database, are used for training; a 4-concept scene
    holds `multi4_scene_concepts` concepts (>= 4) and its query entry lists all their 4-key subsets.
    """
    root = Path(root)
    n_train = n_concepts if n_train_concepts is None else n_train_concepts
    if (
        n_concepts < 1
        or image_size < 64
        or min(n_distractors, queries_single, queries_multi2, queries_multi4) < 0
    ):
        raise RepicError("make_world: need n_concepts >= 1, image_size >= 64 and non-negative counts")
    if not 4 <= multi4_scene_concepts <= 8:
        raise RepicError(f"make_world: multi4_scene_concepts must be in 4..8, got {multi4_scene_concepts}")
    if train_per_method > 0 and n_train < 2:
        raise RepicError(f"make_world: training needs at least 2 training concepts, got {n_train}")
    concepts, train_concepts = make_concepts(seed, n_concepts, n_train)
    writer = _ImageWriter(root)

    # ---- database: one reference image per concept
    concept_dict, path_to_concept = {}, {}
    for c in concepts:
        rel = writer.save(
            render_reference(c, random.Random(f"{seed}/reference/{c.name}"), image_size),
            f"{DATABASE_DIR}/{c.name}.png",
        )
        concept_dict[c.key] = {"name": c.name, "image": rel, "info": c.info, "category": c.category}
        path_to_concept[rel] = c.key

    # ---- query scenes and their templates
    counts = {"single": queries_single, "multi2": queries_multi2, "multi4": queries_multi4}
    templates, boxes = _write_queries(
        writer,
        concepts,
        seed=seed,
        counts=counts,
        n_distractors=n_distractors,
        multi4_scene_concepts=multi4_scene_concepts,
        image_size=image_size,
    )

    # ---- training samples (own concepts, own images)
    train = (
        _training_samples(
            writer,
            train_concepts,
            seed=seed,
            per_method=train_per_method,
            n_distractors=n_distractors,
            image_size=image_size,
        )
        if train_per_method > 0
        else []
    )

    # JSON files last: a complete JSON file implies that every image it names is already on disk.
    writer.remove_stale([DATABASE_DIR, QUERY_DIR, TRAIN_IMAGE_DIR])
    database_path = root / DATABASE_DIR / "database_mod.json"
    write_json(database_path, {"concept_dict": concept_dict, "path_to_concept": path_to_concept})
    query_paths = {}
    for kind, name in QUERY_FILES.items():
        query_paths[kind] = root / QUERY_TEMPLATES_DIR / name
        write_json(query_paths[kind], templates[kind])
    boxes_path = root / QUERY_TEMPLATES_DIR / BOXES_FILE
    write_json(boxes_path, boxes)
    train_path = root / TRAIN_DIR / "train.json"
    write_json(train_path, train)

    return {
        "seed": seed,
        "image_size": image_size,
        "database": _rel(root, database_path),
        "queries": {kind: _rel(root, p) for kind, p in query_paths.items()},
        "boxes": _rel(root, boxes_path),
        "train": _rel(root, train_path),
        "concepts": [c.key for c in concepts],
        "train_concepts": [c.key for c in train_concepts],
        "n_queries": {kind: len(t) for kind, t in templates.items()},
        "n_train": {m: sum(s["accu_reward_method"] == m for s in train) for m in METHODS},
        "n_images": len(writer.written),
    }
