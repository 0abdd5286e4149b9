"""The training stage's own GRPO path (`repic.train.grpo.train`: its data fetching, RePIC's grouping, the recipe's
trainer class and the speed levers it turns on) run on a GPU in bf16, to show that the levers measured by
bench/perf.py are the ones the stage runs: LoRA inputs left in bf16 under autocast (`autocast_lora`), the vision
tower compiled (`compile_vision`, CUDA only), the log-prob forwards packed (`packed`, CUDA only) and the static
rollouts' decode step compiled and prefill packed (`decode_compile`, `prefill_packed`: CUDA only). A random-weight
Qwen2.5-VL (bench/generation.py's build, `--shape`) is saved, then trained for `--steps` steps with
configs/paper.yaml's `train_grpo_lora` section on bench/perf.py's RePIC-like samples; the JSON records the log, the
wall time, the GPU's peak allocated memory, the dtypes the adapters' inputs had, the language model's forwards by
whether they ran packed, and whether the tower ran compiled code, the image processor's class and backend, and how
many images the memo processed of those asked for (`preprocess_once`: PIL backend only).

    python bench/train_stage_cuda.py --out train_stage.json                   # a GPU (bf16)
    python bench/train_stage_cuda.py --device cpu --out /tmp/train_stage.json # a CPU (fp32: the CUDA levers idle)

`--workers 0 4` trains once per value of GRPOConfig's `dataloader_num_workers` (the stage's images read by the
DataLoader's workers ahead of the step: repic.train.grpo.preloading), from the same saved model, and records each
run's step wall times (`step_s`: from one step's end to the next's, so the batch's fetching counts; the first step
left out): at `--shape 7b --image-scale 1` the stage's own step time with and without the workers, in one process.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    ap.add_argument("--image-scale", type=float, default=0.25, help="RePIC-like image sizes times this")
    ap.add_argument("--workers", type=int, nargs="+", default=[None],
                    help="dataloader_num_workers of each run (default: the recipe's)")
    ap.add_argument("--max-pixels", type=int, default=12845056, help="the image processor's (Qwen2.5-VL's)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    cuda = args.device == "cuda"
    work = Path(tempfile.mkdtemp())
    model, processor = genbench.build(args.shape, args.device, torch.bfloat16 if cuda else torch.float32, 224)
    # the processor's pixel bounds as bench/perf.py's GRPO section sets them (Qwen2.5-VL's default, RePIC's
    # training script's max_pixels): the images keep RePIC's training sizes (1024 / 512 short side)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": args.max_pixels}
    model.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(work / "model")
    processor.save_pretrained(work / "model")
    del model
    samples = perf.grpo_samples(work, args.samples, scale=args.image_scale)
    runs = [run_stage(args, work, samples, workers, cuda) for workers in args.workers]
    out = runs[0] if len(runs) == 1 else {"shape": args.shape, "device": args.device, "runs": runs}
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0


def run_stage(args: Any, work: Path, samples: list, workers: int | None, cuda: bool) -> dict[str, Any]:
    """One run of the training stage (`repic.train.grpo.train`) on the saved model, with its probes."""
    from transformers import TrainerCallback

    from repic.train.grpo import train
    from repic.vlm import vision

    params = perf.load_recipe("configs/paper.yaml")
    params["grpo"] = {**params["grpo"], "max_steps": args.steps, "max_completion_length": args.max_new,
                      "logging_steps": 1, "save_strategy": "no", "report_to": "none"}
    params["completions_per_step"] = 16
    if workers is not None:
        params["grpo"]["dataloader_num_workers"] = workers
    seen: collections.Counter = collections.Counter()
    packed: collections.Counter = collections.Counter()
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
            lm = model.get_base_model().model.language_model
            state["language_model_attention"] = lm.config._attn_implementation  # repic_packed: `packed` is on
            # the language model's forwards by whether they ran packed (`packed`: the log-prob forwards on CUDA)
            lm.register_forward_pre_hook(lambda m, a, k: packed.update(
                [f"packed={getattr(m, 'packing', False)} cache={k.get('cache') is not None}"]), with_kwargs=True)

        def on_step_end(self, targs, tstate, control, **kwargs):  # step to step: batch fetching included
            if cuda:
                torch.cuda.synchronize()
            state.setdefault("_ends", []).append(time.perf_counter())

    from repic.train import speed

    trimmed = collections.Counter()
    trim = speed.trimmed_logps

    def counting(compute, model, input_ids, attention_mask, logits_to_keep, batch_size, kwargs):
        trimmed["forwards"] += 1
        trimmed["token_slots_padded"] += int(attention_mask.numel())
        trimmed["real_tokens"] += int(attention_mask.sum())

        def cut(model, ids, mask, *args, **kw):  # what the model is given: the chunks cut
            trimmed["token_slots_run"] += int(mask.numel())
            return compute(model, ids, mask, *args, **kw)

        return trim(cut, model, input_ids, attention_mask, logits_to_keep, batch_size, kwargs)

    speed.trimmed_logps = counting
    from repic.vlm import generation

    rollouts: list[dict[str, Any]] = []
    generate_ids = generation.generate_ids

    def recording(*a: Any, **kw: Any) -> Any:  # each rollout's stats (the trainer's `rollout_stats`): prefill, decode
        out = generate_ids(*a, **kw)
        rollouts.append({k: (kw.get("stats") or {}).get(k) for k in ("prefill", "compiled", "compile_error", "graph")})
        return out

    generation.generate_ids = recording
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    logs = train(work / "model", samples, work, work / f"adapter{workers}", params,
                 checkpoint_dir=work / f"ckpt{workers}", seed=0, device=args.device,
                 dtype="bfloat16" if cuda else "float32", callbacks=[Probe()])
    wall = time.perf_counter() - t0
    speed.trimmed_logps = trim
    generation.generate_ids = generate_ids
    state["rollouts"] = collections.Counter(json.dumps(r) for r in rollouts)
    state["trim_padding_forwards"] = dict(trimmed)  # empty where the stage runs TRL's padded forwards
    tower = vision._visual(state.pop("model"))
    from repic.vlm.image_memo import preprocess_counts

    state["images_preprocessed_of_requested"] = preprocess_counts(state.pop("processor"))
    fast = getattr(tower, vision._ATTR, None) or {}
    ends = state.pop("_ends", [])
    state["step_s"] = [b - a for a, b in zip(ends, ends[1:])]  # each step after the first, end to end
    later = sorted(state["step_s"])
    out = {"shape": args.shape, "device": args.device, "steps": args.steps, "wall_s": wall,
           "dataloader_num_workers": params["grpo"].get("dataloader_num_workers", 0), "image_scale": args.image_scale,
           "step_s_median": later[len(later) // 2] if later else None,
           "gpu": torch.cuda.get_device_name(0) if cuda else None,
           "gpu_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "log": logs, **state,
           "adapter_input_dtypes": dict(seen), "language_model_forwards": dict(packed),
           "vision_compile": fast.get("compile"),
           "vision_compiled_entries": len(fast.get("compiled", {})),
           "adapter_saved": sorted(p.name for p in (work / f"adapter{workers}").iterdir())}
    print(json.dumps({k: v for k, v in out.items() if k != "log"}, indent=1, default=str), flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
