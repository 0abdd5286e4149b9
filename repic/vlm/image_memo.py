"""Each image's patches computed once: a transformers image processor (Qwen2-VL's, whose `_preprocess` handles the
images of a call independently) memoized per distinct image, by content or by object.

Training (repic.train.speed's `preprocess_once`) keys by content: TRL preprocesses a batch's images twice a step and
each of a prompt's G copies again, and a dataset re-reads its files. Captioning (`images_processed_once`, by object)
shows a database's reference images in many conversations, and its loader (`repic.vlm.preprocess.load_for_processor`)
gives one PIL object per file; the embedded warm-up's batches (repic.synthetic.warmup) call the processor on the
batch and again on each prompt alone, with the same image objects. The patches are the arrays the processor itself
computes (tests/test_train_speed.py checks them, and the processor's saved config, byte for byte).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any


class _PatchMemo:
    """Patches and grid of recently processed images, by content and options (least recently used dropped)."""

    def __init__(self, capacity: int, workers: int, by: str = "content") -> None:
        from collections import OrderedDict

        self.capacity, self.workers, self.by = capacity, workers, by
        self.entries: OrderedDict = OrderedDict()
        self.processed = 0  # images actually processed (for tests and benchmarks)
        self.requested = 0

    def get(self, key: tuple) -> Any:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: tuple, value: Any) -> None:
        self.entries[key] = value
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


# memo of each memoized image processor; kept off the instance, whose __dict__ is its saved config (`to_dict`)
_MEMOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _content_key(array: Any) -> tuple[tuple[int, ...], bytes]:
    """(axis order, XXH3-128 of the bytes) of a numpy array, read in its memory order: the processor's images are
    channel-first views of channel-last buffers, hashed as they lie (no transposing copy). Arrays with equal keys,
    shapes and dtypes are equal; an equal array laid out otherwise only gets another key."""
    import numpy as np
    import xxhash

    order = tuple(int(i) for i in np.argsort(array.strides, kind="stable")[::-1])
    laid = array.transpose(order)
    if not laid.flags.c_contiguous:
        order, laid = tuple(range(array.ndim)), np.ascontiguousarray(array)
    return order, xxhash.xxh3_128_digest(laid.data)


def _memo_preprocess(self: Any, images: list, *args: Any, **kwargs: Any) -> Any:
    """The image processor's `_preprocess` (a loop of independent per-image steps), each distinct image once."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from transformers.image_processing_utils import BatchFeature

    memo: _PatchMemo = _MEMOS[self]
    original = super(type(self), self)._preprocess
    if memo.by == "object":  # `_memo_image_like_inputs` keeps the patches
        return original(images, *args, **kwargs)
    if args or any(not isinstance(im, np.ndarray) for im in images):
        return original(images, *args, **kwargs)
    options = repr(sorted((k, v) for k, v in kwargs.items() if k != "return_tensors"))
    keys = [(im.shape, str(im.dtype), *_content_key(im), options) for im in images]
    # room for every image of the largest call: TRL processes a step's images twice, and a step with more images than
    # the memo holds would reprocess the overflow at every call (RePIC's grouping: 16 prompts of 1-3 images a step)
    memo.capacity = max(memo.capacity, len(set(keys)))
    memo.requested += len(images)
    found = {key: memo.get(key) for key in keys}
    todo = {}  # key -> the first image with it, among those not processed before
    for key, im in zip(keys, images):
        if found[key] is None and key not in todo:
            todo[key] = im

    def one(im: np.ndarray) -> tuple[np.ndarray, list[int]]:
        out = original([im], **{**kwargs, "return_tensors": None})
        return np.asarray(out["pixel_values"]), [int(x) for x in np.asarray(out["image_grid_thw"])[0]]

    if todo:
        workers = min(memo.workers, len(todo))
        if workers > 1:  # PIL's resize and numpy's arithmetic release the GIL
            with ThreadPoolExecutor(workers) as pool:
                done = list(pool.map(one, todo.values()))
        else:
            done = [one(im) for im in todo.values()]
        memo.processed += len(todo)
        for key, value in zip(todo, done):
            found[key] = value
            memo.put(key, value)
    parts = [found[key] for key in keys]
    return BatchFeature(data={"pixel_values": np.concatenate([p for p, _ in parts], axis=0),
                              "image_grid_thw": np.array([g for _, g in parts], dtype=np.int64)},
                        tensor_type=kwargs.get("return_tensors"))


def _memo_image_like_inputs(self: Any, images: Any, *args: Any, **kwargs: Any) -> Any:
    """With `by="object"`: the patches of each PIL image object seen before (the memo holds it, so its id is not
    reused), without converting it again; the new ones processed together by the processor's own path."""
    import numpy as np
    from PIL import Image
    from transformers.image_processing_utils import BatchFeature

    memo: _PatchMemo = _MEMOS[self]
    original = super(type(self), self)._preprocess_image_like_inputs
    flat = [images] if isinstance(images, Image.Image) else [
        im for x in images for im in (x if isinstance(x, (list, tuple)) else [x])] \
        if isinstance(images, (list, tuple)) else None
    if memo.by != "object" or args or not flat or any(not isinstance(im, Image.Image) for im in flat):
        return original(images, *args, **kwargs)
    options = repr(sorted((k, v) for k, v in kwargs.items() if k != "return_tensors"))
    keys = [("object", id(im), options) for im in flat]
    memo.requested += len(flat)
    found = {}
    for key, im in zip(keys, flat):
        value = memo.get(key)
        if value is not None and value[0] is im:
            found[key] = value
    todo = {key: im for key, im in zip(keys, flat) if key not in found}
    if todo:
        out = original(list(todo.values()), **{**kwargs, "return_tensors": None})
        pixels, grids = np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])
        start = 0
        for (key, im), grid in zip(todo.items(), grids):
            n = int(np.prod(grid))
            found[key] = (im, pixels[start:start + n], [int(x) for x in grid])
            memo.put(key, found[key])
            start += n
        memo.processed += len(todo)
    parts = [found[key] for key in keys]
    return BatchFeature(data={"pixel_values": np.concatenate([p for _, p, _ in parts], axis=0),
                              "image_grid_thw": np.array([g for _, _, g in parts], dtype=np.int64)},
                        tensor_type=kwargs.get("return_tensors"))


_MEMO_CLASSES: dict[type, type] = {}


def preprocess_counts(image_processor: Any) -> tuple[int, int] | None:
    """(images processed, images asked for) since `memoize_image_processor`; None if it is not memoized."""
    memo = _MEMOS.get(image_processor)
    return None if memo is None else (memo.processed, memo.requested)


def memoize_image_processor(image_processor: Any, capacity: int = 32, workers: int | None = None,
                            by: str = "content") -> _PatchMemo:
    """`image_processor` (this instance; a transformers image processor whose `_preprocess` loops over images
    independently, as Qwen2-VL's does) processing each distinct image once and the new ones of a call in
    `workers` threads; keeps the patches of the last `capacity` images (by content: at least the largest call's
    distinct images). Its saved config (`to_dict`) is unchanged.
    `by`: `content` (an image's pixels and the options: training, where a dataset re-reads its files) or `object`
    (the same PIL image object and options, not even converted again: captioning, whose loader gives one object per
    file; the caller must not modify an image it passed). Returns the memo (its counters)."""
    import os

    if by not in ("content", "object"):
        raise ValueError(f"memoize_image_processor: by must be content|object, got {by!r}")
    if image_processor in _MEMOS:
        return _MEMOS[image_processor]
    cls = type(image_processor)
    if cls not in _MEMO_CLASSES:
        # the class's own name: `to_dict` saves it as the processor's type
        _MEMO_CLASSES[cls] = type(cls.__name__, (cls,), {"_preprocess": _memo_preprocess,
                                                         "_preprocess_image_like_inputs": _memo_image_like_inputs,
                                                         "__qualname__": f"Memo{cls.__qualname__}"})
    image_processor.__class__ = _MEMO_CLASSES[cls]
    _MEMOS[image_processor] = _PatchMemo(capacity, workers or min(8, os.cpu_count() or 1), by)
    return _MEMOS[image_processor]


@contextlib.contextmanager
def images_processed_once(processor: Any, capacity: int = 64) -> Iterator[_PatchMemo | None]:
    """Within the block, `processor`'s image processor memoized `by="object"` (`memoize_image_processor`), then
    restored; None (nothing done) when it has no image processor or is memoized already. `capacity` 64: the
    largest set of images a caption stage reuses is a database's references (the paper's: 16 to 40) and, in the
    4-concept setting, its 4 query photos; 64 entries of patches at RePIC's max_pixels (1024*28*28: 4,096 patches of
    1,176 float32, 19 MB) are at most 1.2 GB."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or image_processor in _MEMOS:
        yield None
        return
    memo = memoize_image_processor(image_processor, capacity, workers=1, by="object")
    try:
        yield memo
    finally:
        unmemoize_image_processor(image_processor)


def unmemoize_image_processor(image_processor: Any) -> None:
    """Undo `memoize_image_processor`."""
    if _MEMOS.pop(image_processor, None) is not None:
        image_processor.__class__ = type(image_processor).__mro__[1]
