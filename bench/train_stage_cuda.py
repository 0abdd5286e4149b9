"""The training stage's own GRPO path (`repic.train.grpo.train`: its data fetching, RePIC's grouping, the recipe's
trainer class and the speed levers it turns on) run on a GPU in bf16, to show that the levers measured by
bench/perf.py are the ones the stage runs: LoRA inputs left in bf16 under autocast (`autocast_lora`) and the vision
tower compiled (`compile_vision`, CUDA only). A random-weight Qwen2.5-VL (bench/generation.py's build, `--shape`) is
saved, then trained for `--steps` steps with configs/paper.yaml's `train_grpo_lora` section on bench/perf.py's
RePIC-like samples; the JSON records the log, the wall time, the dtypes the adapters' inputs had, and whether the
tower ran compiled code, the image processor's class and backend, and how many images the memo processed of
those asked for (`preprocess_once`: PIL backend only).

    python bench/train_stage_cuda.py --out train_stage.json                   # a GPU (bf16)
    python bench/train_stage_cuda.py --device cpu --out /tmp/train_stage.json # a CPU (fp32: both levers idle)
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import generation as genbench  # noqa: E402
import perf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(genbench.SHAPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from transformers import TrainerCallback

    from repic.train.grpo import train
    from repic.vlm import vision

    cuda = args.device == "cuda"
    work = Path(tempfile.mkdtemp())
    model, processor = genbench.build(args.shape, args.device, torch.bfloat16 if cuda else torch.float32, 224)
    model.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(work / "model")
    processor.save_pretrained(work / "model")
    del model
    samples = perf.grpo_samples(work, args.samples, scale=0.25)
    params = perf.load_recipe("configs/paper.yaml")
    params["grpo"] = {**params["grpo"], "max_steps": args.steps, "max_completion_length": args.max_new,
                      "logging_steps": 1, "save_strategy": "no", "report_to": "none"}
    params["completions_per_step"] = 16
    seen: collections.Counter = collections.Counter()
    state: dict = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, targs, tstate, control, model=None, processing_class=None, **kwargs):
            from peft.tuners.lora import LoraLayer

            image_processor = getattr(processing_class, "image_processor", None)
            state["image_processor"] = [type(image_processor).__name__, getattr(image_processor, "backend", None)]
            state["processor"] = image_processor

            layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
            state["lora_layers"] = len(layers)
            state["lora_layers_autocast_lever"] = sum("_cast_input_dtype" in vars(m) for m in layers)
            layers[0].lora_A["default"].register_forward_pre_hook(
                lambda m, a: seen.update([f"{a[0].dtype} grad={torch.is_grad_enabled()}"]))
            state["model"] = model

    t0 = time.perf_counter()
    logs = train(work / "model", samples, work, work / "adapter", params, checkpoint_dir=work / "ckpt", seed=0,
                 device=args.device, dtype="bfloat16" if cuda else "float32", callbacks=[Probe()])
    wall = time.perf_counter() - t0
    tower = vision._visual(state.pop("model"))
    from repic.vlm.image_memo import preprocess_counts

    state["images_preprocessed_of_requested"] = preprocess_counts(state.pop("processor"))
    fast = getattr(tower, vision._ATTR, None) or {}
    out = {"shape": args.shape, "device": args.device, "steps": args.steps, "wall_s": wall,
           "gpu": torch.cuda.get_device_name(0) if cuda else None, "log": logs, **state,
           "adapter_input_dtypes": dict(seen), "vision_compile": fast.get("compile"),
           "vision_compiled_entries": len(fast.get("compiled", {})),
           "adapter_saved": sorted(p.name for p in (work / "adapter").iterdir())}
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({k: v for k, v in out.items() if k != "log"}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
