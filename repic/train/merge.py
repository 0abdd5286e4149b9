"""Merge the LoRA adapter into the base and verify the merged checkpoint against base+adapter.

RePIC's README blames the 6-8 recall points its released merged model lost against its LoRA checkpoint on the
merge; this stage answers that question for our adapter, and fails rather than ship a merge that changes the
model. Every comparison is against base+adapter *unmerged* (PEFT's `merge_and_unload` merges in place, so the
references, logits and greedy captions, are taken before the merge), and every merged model is the checkpoint
written with `save_pretrained` and loaded back with `from_pretrained`, the path any user takes:

- fp32: base (fp32) + adapter vs the merge done in fp32, reloaded in fp32: logits within `tolerance.float32`
  and identical greedy captions, or the stage fails.
- bf16, ours: base (bf16) + adapter vs the shipped checkpoint (the fp32 merge cast once to the base checkpoint's
  own dtype) loaded in bf16: logits within `tolerance.bfloat16`, or the stage fails; caption mismatches reported.
- bf16, RePIC's way (`../shared/repic_training/lora_merge.ipynb`: the base loaded in bf16, `merge_and_unload`):
  the same comparison, reported only, beside ours.

A tolerance bounds the largest |logit difference| relative to the largest |logit| of base+adapter (at least 1):
rounding differences grow with the logits' scale and the model's depth (an fp32 merge at Qwen2.5-VL-7B's shape,
random weights, differed by 1.3e-4 in absolute terms, the tiny model's by 4e-7: BENCHMARKS.md, issue 24), while a
wrong merge differs by the adapter's own effect.

One model (plus the adapter) is in memory at a time, on `device` (the GPU when there is one, as RePIC merged);
the report gives the measured peak. On a failure no merged checkpoint is left.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
from pathlib import Path
from typing import Any

import torch

from repic.core.io import RepicError, atomic_dir

DTYPES = ("float32", "bfloat16", "float16")


@torch.inference_mode()
def _logits(model: Any, processor: Any, conversations: list) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    out = []
    for messages, images in conversations:
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=images, return_tensors="pt").to(device)
        out.append(model(**inputs).logits.float().cpu())
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def checkpoint_dtype(path: str | os.PathLike) -> str:
    """The dtype a checkpoint's config declares (`dtype`, formerly `torch_dtype`); float32 when it declares none."""
    config = Path(path) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RepicError(f"{config}: cannot read the base model's config ({exc})") from None
    name = str(data.get("dtype") or data.get("torch_dtype") or "float32").removeprefix("torch.")
    if name not in DTYPES:
        raise RepicError(f"{config}: dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return name


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


class _Run:
    """Loads, measures and frees models one at a time on one device."""

    def __init__(self, processor: Any, conversations: list, device: str, max_new_tokens: int, batch_size: int):
        self.processor, self.conversations, self.device = processor, conversations, device
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def measure(self, model: Any) -> tuple[list[torch.Tensor], list[str]]:
        """Logits on the fixed inputs and greedy captions."""
        from repic.vlm.generation import generate_captions

        logits = _logits(model, self.processor, self.conversations)
        captions = generate_captions(model, self.processor, self.conversations, batch_size=self.batch_size,
                                     max_new_tokens=self.max_new_tokens)
        return logits, captions

    def merge(self, base: str | os.PathLike, adapter: str | os.PathLike, dtype: str,
              saves: dict[Path, str]) -> tuple[list[torch.Tensor], list[str]]:
        """base (in `dtype`) + adapter: its logits and captions, then the merge (in `dtype`), saved to each folder of
        `saves` in its dtype; one model in memory, freed on return."""
        from repic.vlm.models import load_model

        adapted = load_model(base, device=self.device, dtype=dtype, adapter=adapter)
        reference = self.measure(adapted)  # before the merge: merge_and_unload changes `adapted` in place
        merged = adapted.merge_and_unload()
        del adapted
        for folder, save_dtype in saves.items():  # the base's own dtype last: the cast happens once
            merged.to(getattr(torch, save_dtype)).save_pretrained(folder)
        del merged
        _free(self.device)
        return reference

    def compare(self, folder: Path, dtype: str, reference: tuple[list[torch.Tensor], list[str]]) -> dict[str, Any]:
        """The checkpoint in `folder`, loaded back in `dtype`, against `reference` (base+adapter's logits, captions)."""
        from repic.vlm.models import load_model

        model = load_model(folder, device=self.device, dtype=dtype)
        logits, captions = self.measure(model)
        del model
        _free(self.device)
        mismatches = sum(a != b for a, b in zip(reference[1], captions, strict=True))
        diff, scale = _max_diff(reference[0], logits), max(float(x.abs().max()) for x in reference[0])
        return {"max_abs_logit_diff": diff, "max_abs_logit": scale, "relative_logit_diff": diff / max(1.0, scale),
                "n_caption_mismatches": mismatches}


def _peak_memory(device: str) -> dict[str, Any]:
    peak = {"process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if device.startswith("cuda"):
        peak["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return peak


def merge_and_verify(base_path: str | os.PathLike, adapter: str | os.PathLike, out_dir: str | os.PathLike,
                     conversations: list, *, tolerance: dict[str, float], max_new_tokens: int,
                     device: str = "auto", batch_size: int = 4) -> dict[str, Any]:
    """Write the merged checkpoint (in the base checkpoint's dtype) to `out_dir` if it passes; return the
    verification report either way (`check` raises on a failed one)."""
    from repic.vlm.models import load_processor, pick_device

    device = pick_device(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    processor = load_processor(base_path)
    run = _Run(processor, conversations, device, max_new_tokens, batch_size)
    saved_dtype = checkpoint_dtype(base_path)
    report: dict[str, Any] = {"n_inputs": len(conversations), "device": device, "saved_dtype": saved_dtype}
    out_dir = Path(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.staging"  # removed whatever happens: only out_dir is kept
    try:
        _merge_and_verify(run, base_path, adapter, out_dir, staging, tolerance, report)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _merge_and_verify(run: _Run, base_path: str | os.PathLike, adapter: str | os.PathLike, out_dir: Path,
                      staging: Path, tolerance: dict[str, float], report: dict[str, Any]) -> None:
    saved_dtype = report["saved_dtype"]
    with atomic_dir(staging) as tmp:
        fp32, shipped, repic = tmp / "merged_fp32", tmp / "model", tmp / "repic_bf16"
        # ours: the merge in fp32; checked in fp32 as merged, shipped cast once to the base's dtype
        saves = {fp32: "float32"} if saved_dtype == "float32" else {fp32: "float32", shipped: saved_dtype}
        reference = run.merge(base_path, adapter, "float32", saves)
        if saved_dtype == "float32":
            shipped = fp32
        report["float32"] = {"merge": "float32", **run.compare(fp32, "float32", reference),
                             "tolerance": tolerance["float32"]}
        if shipped != fp32:
            shutil.rmtree(fp32)  # a 7B fp32 checkpoint: ~30 GB of disk
        # RePIC's way: base in bf16, merged in bf16; its reference (bf16 base + adapter) is ours too
        reference = run.merge(base_path, adapter, "bfloat16", {repic: "bfloat16"})
        report["bfloat16"] = {"merge": f"float32, saved as {saved_dtype}",
                              **run.compare(shipped, "bfloat16", reference), "tolerance": tolerance["bfloat16"]}
        report["bfloat16_repic"] = {"merge": "bfloat16 (RePIC's lora_merge.ipynb)",
                                    **run.compare(repic, "bfloat16", reference)}
        shutil.rmtree(repic)
        for key in ("float32", "bfloat16"):  # the tolerance is relative to the logits' scale (at least 1)
            report[key]["ok"] = report[key]["relative_logit_diff"] <= tolerance[key]
        report["captions_identical_fp32"] = report["float32"]["n_caption_mismatches"] == 0
        failed = [k for k in ("float32", "bfloat16") if not report[k]["ok"]]
        failed += [] if report["captions_identical_fp32"] else ["float32 captions"]
        report["ok"] = not failed
        report["peak_memory_mb"] = _peak_memory(run.device)
        if not report["ok"]:
            report["error"] = (f"merged checkpoint differs from base+adapter: {', '.join(failed)} "
                               "(merge_report.json); no merged checkpoint written")
            return
        run.processor.save_pretrained(shipped)
        with atomic_dir(out_dir) as final:
            for item in shipped.iterdir():
                os.replace(item, final / item.name)


def check(report: dict[str, Any]) -> None:
    if not report["ok"]:
        raise RepicError(report["error"])
