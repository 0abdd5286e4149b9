"""Merge the LoRA adapter into the base and verify the merged checkpoint against base+adapter.

RePIC's released merged model lost 6-8 recall points against its LoRA checkpoint. Here the merge is a stage
whose output is checked: the merged checkpoint is written with `save_pretrained`, loaded back with
`from_pretrained` (the path any user takes), and its logits on fixed inputs are compared with base+adapter in
fp32 and bf16; above the tolerance the stage fails and no merged checkpoint is left. Greedy captions of both
must be identical in fp32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from repic.core.io import RepicError, atomic_dir


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


def merge_and_verify(base_path: str | os.PathLike, adapter: str | os.PathLike, out_dir: str | os.PathLike,
                     conversations: list, *, tolerance: dict[str, float], max_new_tokens: int) -> dict[str, Any]:
    """Write the merged checkpoint to `out_dir` if it passes; return the verification report either way
    (raising RepicError after the report is complete when a check fails)."""
    from peft import PeftModel

    from repic.vlm.generation import generate_captions
    from repic.vlm.models import load_model, load_processor

    processor = load_processor(base_path)
    report: dict[str, Any] = {"n_inputs": len(conversations)}
    out_dir = Path(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.staging"
    with atomic_dir(staging) as tmp:
        for dtype in ("float32", "bfloat16"):
            adapted = PeftModel.from_pretrained(load_model(base_path, device="cpu", dtype=dtype), str(adapter))
            reference = _logits(adapted.eval(), processor, conversations)
            merged_dir = tmp / dtype
            adapted.merge_and_unload().save_pretrained(merged_dir)
            merged = load_model(merged_dir, device="cpu", dtype=dtype)
            diff = _max_diff(reference, _logits(merged, processor, conversations))
            report[dtype] = {"max_abs_logit_diff": diff, "tolerance": tolerance[dtype],
                             "ok": diff <= tolerance[dtype]}
            if dtype == "float32":
                caps_adapter = generate_captions(adapted, processor, conversations, batch_size=4,
                                                 max_new_tokens=max_new_tokens)
                caps_merged = generate_captions(merged, processor, conversations, batch_size=4,
                                                max_new_tokens=max_new_tokens)
                report["captions_identical_fp32"] = caps_adapter == caps_merged
                report["n_caption_mismatches_fp32"] = sum(a != b for a, b in zip(caps_adapter, caps_merged))
        failed = [k for k in ("float32", "bfloat16") if not report[k]["ok"]]
        if not failed and report["captions_identical_fp32"]:
            with atomic_dir(out_dir) as final:
                for item in (tmp / "float32").iterdir():
                    os.replace(item, final / item.name)
                processor.save_pretrained(final)
    report["ok"] = not failed and report["captions_identical_fp32"]
    if not report["ok"]:
        report["error"] = (f"merged checkpoint differs from base+adapter: {failed or 'captions'} above tolerance; "
                           "no merged checkpoint written")
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
    return report


def check(report: dict[str, Any]) -> None:
    if not report["ok"]:
        raise RepicError(report["error"])
