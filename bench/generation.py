"""Generation benchmark on one card: HF `generate` vs the static backend (repic/vlm/generation.py).

Measures, in one run: the card's device-to-device copy bandwidth; for batch 1, 8 and 32 (one 448-px image per
prompt, greedy, 128 new tokens, no EOS so every row runs the full length) tokens/s end to end and in the decode
phase, peak memory, the fraction of the weight-streaming roofline, and token agreement with HF `generate`; then
a GRPO step (TRL's GRPOTrainer, G=8, 256 new tokens, LoRA r=64 on the language model, gradient checkpointing,
beta 0.04) with TRL's default rollouts vs rollouts from the static backend. The model has Qwen2.5-VL-7B's shape
with random bf16 weights (no hub access needed); its tokenizer is trained offline on a few sentences, so prompt
text is short and generated ids beyond the tokenizer decode to nothing, which no measurement here depends on.

    python bench/generation.py --out bench-generation.json                 # the GPU run (BENCHMARKS.md)
    python bench/generation.py --model tiny --batches 1 2 --new-tokens 8 --grpo-steps 2 --grpo-new-tokens 8 \\
        --grpo-generations 2 --out /tmp/bench.json                          # a CPU rehearsal of every path
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repic.vlm.generation import generate_ids, rollout_trainer  # noqa: E402

TEXTS = ["This is the query image. Describe the toy, the dog and the red ball in the picture."] * 20

# Qwen2.5-VL-7B-Instruct's config.json, less its weights.
SHAPES = {
    "7b": dict(text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rms_norm_eps=1e-6),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31]),
               mrope=[16, 24, 24], tie=False),
    "tiny": dict(text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                           rms_norm_eps=1e-6),
                 vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                             fullatt_block_indexes=[1]),
                 mrope=[2, 3, 3], tie=True),
}


def build(shape: str, device: str, dtype: torch.dtype, image_px: int) -> tuple[Any, Any]:
    """A Qwen2.5-VL of the given shape with random weights, and a processor built as repic.vlm.models builds one."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from repic.synthetic.tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer
    from repic.vlm.models import ImageQwenVLProcessor

    spec = SHAPES[shape]
    tokenizer = train_tokenizer(TEXTS, 400)
    processor = ImageQwenVLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=image_px * image_px),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(**spec["text"], rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                                          "mrope_section": spec["mrope"]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(**spec["vision"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, tokens_per_second=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec["tie"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    # No EOS: every row generates the full length in both backends, so tokens/s compare like with like.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model, processor


def prompts(processor: Any, n: int, image_px: int) -> tuple[list[str], list[list[Image.Image]]]:
    texts, images = [], []
    for i in range(n):
        question = "Describe the image" + " in more detail" * (i % 5) + "."
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        pixels = np.random.RandomState(i).randint(0, 256, (image_px, image_px, 3), dtype=np.uint8)
        images.append([Image.fromarray(pixels)])
    return texts, images


# ---------------------------------------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Any) -> tuple[Any, float]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def copy_bandwidth(gib: float = 4.0) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / statistics.median(times)


def weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of language-model weights: all of them (the issue's 15.2 GB), and those a decode step reads."""
    lm = model.model.language_model
    size = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    lm_all = {id(p) for p in lm.parameters()} | {id(p) for p in model.lm_head.parameters()}
    embed = {id(p) for p in lm.embed_tokens.parameters()}
    tied = model.lm_head.weight is lm.embed_tokens.weight
    read = lm_all - (set() if tied else embed)  # the input embedding is a row lookup, not a matrix read
    return {"lm_all": sum(size[i] for i in lm_all), "read_per_step": sum(size[i] for i in read)}


def agreement(ref: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """Rows identical; mean fraction of each row before the first differing token; positions equal."""
    prefix, equal, total = [], 0, 0
    for a, b in zip(ref, other):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
        equal += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
    return {"rows_identical": sum(a == b for a, b in zip(ref, other)) / len(ref),
            "mean_prefix_fraction": sum(prefix) / len(prefix), "positions_equal": equal / max(total, 1)}


def batch_inputs(model: Any, processor: Any, texts: list, images: list, batch: int) -> Any:
    device = next(model.parameters()).device
    return processor(text=texts[:batch], images=images[:batch], return_tensors="pt", padding=True,
                     padding_side="left").to(device)


def bench_batch(model: Any, processor: Any, texts: list, images: list, batch: int, new: int, repeats: int
                ) -> dict[str, Any]:
    inputs = batch_inputs(model, processor, texts, images, batch)
    kw = dict(do_sample=False)
    row: dict[str, Any] = {"batch": batch, "prompt_len": int(inputs["input_ids"].shape[1]), "new_tokens": new}
    # --- HF generate, default dynamic cache
    generate_ids(model, inputs, backend="hf", max_new_tokens=4, **kw)  # warm-up
    _, t_one = timed(lambda: generate_ids(model, inputs, backend="hf", max_new_tokens=1, **kw))
    peak_reset()
    hf, t_hf = timed(lambda: generate_ids(model, inputs, backend="hf", max_new_tokens=new, **kw))
    row["hf"] = {"s": t_hf, "tok_s": batch * new / t_hf, "prefill_s": t_one,
                 "decode_tok_s": batch * (new - 1) / max(t_hf - t_one, 1e-9), "peak_gib": peak_gib()}
    # --- static backend: first call captures the graph; then steady state
    decoders: dict = {}
    stats: dict[str, float] = {}
    peak_reset()
    first, t_first = timed(lambda: generate_ids(model, inputs, backend="static", max_new_tokens=new, stats=stats,
                                                _decoders=decoders, **kw))
    capture = stats.get("capture_s")
    runs = []
    for _ in range(repeats):
        stats = {}
        static, t = timed(lambda s=stats: generate_ids(model, inputs, backend="static", max_new_tokens=new,
                                                         stats=s, _decoders=decoders, **kw))
        runs.append((t, stats))
    t_med, st = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    row["static"] = {"s": t_med, "tok_s": batch * new / t_med, "first_call_s": t_first, "capture_s": capture,
                     "prefill_s": st["prefill_s"], "decode_steps": st["decode_steps"],
                     "decode_tok_s": batch * st["decode_steps"] / st["decode_s"],
                     "step_ms": 1e3 * st["decode_s"] / st["decode_steps"], "peak_gib": peak_gib(),
                     "all_runs_s": [r[0] for r in runs], "cuda_graph": st.get("graph"),
                     "capture_error": st.get("capture_error")}
    row["agreement_static_vs_hf"] = agreement(hf, static)
    row["static_repeatable"] = static == first
    row["distinct_tokens_hf"] = len({t for r in hf for t in r})
    row["_hf_ids"], row["_static_ids"] = hf, static
    decoders.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def bench_hf_static(model: Any, processor: Any, texts: list, images: list, batch: int, new: int) -> dict[str, Any]:
    """transformers' own fast path: `generate(cache_implementation="static")`, which compiles the decode step."""
    inputs = batch_inputs(model, processor, texts, images, batch)
    kw = dict(do_sample=False, cache_implementation="static")
    _, t_first = timed(lambda: generate_ids(model, inputs, backend="hf", max_new_tokens=new, **kw))
    peak_reset()
    _, t = timed(lambda: generate_ids(model, inputs, backend="hf", max_new_tokens=new, **kw))
    return {"batch": batch, "first_call_s": t_first, "s": t, "tok_s": batch * new / t, "peak_gib": peak_gib()}


class StepTimer:
    """Wall time of each optimizer step (generation, rewards, loss, backward, update), for TRL's Trainer."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                sync()
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync()
                timer.times.append(time.perf_counter() - timer.t0)

        self.times: list[float] = []
        self.t0 = 0.0
        self.callback = _Callback()


def bench_grpo(model: Any, processor: Any, image_px: int, steps: int, new: int, generations: int,
               backends: list[str]) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import GRPOConfig, GRPOTrainer

    from repic.core.params import LANGUAGE_MODEL_LINEAR

    cuda = torch.cuda.is_available()
    texts, images = prompts(processor, steps, image_px)
    examples = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                            "text": f"Describe image {i}."}]}],
                 "images": images[i]} for i in range(steps)]
    dataset = Dataset.from_list(examples)
    lora = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, target_modules=LANGUAGE_MODEL_LINEAR,
                      task_type="CAUSAL_LM")

    def reward(completions, **kwargs):
        return [float(len(c[0]["content"]) % 13) for c in completions]

    out: dict[str, Any] = {"generations": generations, "new_tokens": new, "steps": steps, "lora_r": 64}
    for backend in backends:
        timer = StepTimer()
        args = GRPOConfig(
            output_dir=tempfile.mkdtemp(), num_generations=generations, per_device_train_batch_size=generations,
            gradient_accumulation_steps=1, max_completion_length=new, temperature=1.0, beta=0.04, loss_type="grpo",
            scale_rewards="group", learning_rate=1e-5, bf16=cuda, gradient_checkpointing=True, max_steps=steps,
            logging_steps=1, report_to="none", save_strategy="no", use_cpu=not cuda, seed=0,
            shuffle_dataset=False)
        rollout_s: list[float] = []

        class Timed(rollout_trainer(GRPOTrainer, backend)):
            def _generate_single_turn(self, *a, _times=rollout_s, **k):
                sync()
                t = time.perf_counter()
                result = super()._generate_single_turn(*a, **k)
                sync()
                _times.append(time.perf_counter() - t)
                return result

        cls = Timed
        torch.manual_seed(0)
        peft_model = get_peft_model(model.train(), lora)  # fresh adapter per backend (TRL adds a "ref" copy)
        try:
            trainer = cls(model=peft_model, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=processor, callbacks=[timer.callback])
            peak_reset()
            trainer.train()
            lengths = [r.get("completions/mean_length") for r in trainer.state.log_history
                       if "completions/mean_length" in r]
            warm = timer.times[1:] or timer.times
            out[backend] = {"step_s": timer.times, "median_step_s": statistics.median(warm), "rollout_s": rollout_s,
                            "median_rollout_s": statistics.median(rollout_s[1:] or rollout_s),
                            "mean_completion_len": lengths, "peak_gib": peak_gib()}
        except Exception as exc:  # noqa: BLE001 - reported, the other backend still runs
            out[backend] = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-2000:]}
        trainer = None
        model = peft_model.unload()
        if cuda:
            torch.cuda.empty_cache()
    if all("median_step_s" in out.get(b, {}) for b in ("hf", "static")):
        out["speedup_static_vs_hf"] = out["hf"]["median_step_s"] / out["static"]["median_step_s"]
    return out


def environment() -> dict[str, Any]:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name()
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = repr(exc)
    try:
        import trl

        env["trl"] = trl.__version__
    except ImportError:
        pass
    return env


def summary(res: dict[str, Any]) -> str:
    lines = [f"card: {res['env'].get('card', 'cpu')}  copy bandwidth: {res.get('copy_bandwidth_tb_s', 0):.2f} TB/s"
             f"  weights read/step: {res['weights']['read_per_step'] / 1e9:.2f} GB"
             f" (all LM weights {res['weights']['lm_all'] / 1e9:.2f} GB)",
             "batch | hf tok/s | static tok/s | x | static decode tok/s | roofline (issue) | bw used | "
             "rows same | prefix | peak GiB hf/static"]
    for r in res["batches"]:
        if "error" in r:
            lines.append(f"{r['batch']} | error {r['error']}")
            continue
        a = r["agreement_static_vs_hf"]
        lines.append(
            f"{r['batch']} | {r['hf']['tok_s']:.0f} | {r['static']['tok_s']:.0f} | "
            f"{r['static']['tok_s'] / r['hf']['tok_s']:.1f} | {r['static']['decode_tok_s']:.0f} | "
            f"{r.get('roofline_fraction_issue', float('nan')):.2f} | {r.get('bandwidth_fraction', float('nan')):.2f} | "
            f"{a['rows_identical']:.2f} | {a['mean_prefix_fraction']:.2f} | "
            f"{r['hf']['peak_gib'] or 0:.1f}/{r['static']['peak_gib'] or 0:.1f}")
    if "grpo" in res:
        g = res["grpo"]
        lines.append("grpo: " + json.dumps({k: (v.get("median_step_s") if isinstance(v, dict) else v)
                                             for k, v in g.items()}))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--image-px", type=int, default=448)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-static", type=int, nargs="*", default=[],
                    help="batch sizes at which to also time generate(cache_implementation='static') (compiles)")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip later sections past this many seconds")
    ap.add_argument("--grpo-steps", type=int, default=3, help="0 skips the GRPO step")
    ap.add_argument("--grpo-new-tokens", type=int, default=256)
    ap.add_argument("--grpo-generations", type=int, default=8)
    ap.add_argument("--grpo-backends", nargs="+", default=["hf", "static"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    res: dict[str, Any] = {"date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
                           "env": environment(), "batches": []}
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps({k: v for k, v in res.items()}, indent=1, default=str))

    if cuda:
        res["copy_bandwidth_tb_s"] = copy_bandwidth() / 1e12
    save()
    model, processor = build(args.model, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32,
                             args.image_px)
    res["build_s"] = time.perf_counter() - t0
    print(f"built in {res['build_s']:.0f} s", flush=True)
    res["weights"] = weight_bytes(model)
    texts, images = prompts(processor, max(args.batches), args.image_px)
    bw = res.get("copy_bandwidth_tb_s", 0) * 1e12
    text_cfg = model.config.text_config
    head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
    ids_by_batch = {}
    for batch in args.batches:
        try:
            row = bench_batch(model, processor, texts, images, batch, args.new_tokens, args.repeats)
        except Exception as exc:  # noqa: BLE001 - reported, the other sizes still run
            row = {"batch": batch, "error": repr(exc)[:300], "trace": traceback.format_exc()[-2000:]}
        if bw and "static" in row:
            # decode-step roofline: all weights streamed once per step, as the issue counts them
            row["roofline_tok_s_issue"] = batch * bw / res["weights"]["lm_all"]
            row["roofline_fraction_issue"] = row["static"]["decode_tok_s"] / row["roofline_tok_s_issue"]
            row["roofline_fraction_issue_hf"] = row["hf"]["decode_tok_s"] / row["roofline_tok_s_issue"]
            cache_len = -(-(row["prompt_len"] + args.new_tokens) // 64) * 64
            kv = batch * cache_len * text_cfg.num_hidden_layers * 2 * text_cfg.num_key_value_heads * head_dim * 2
            row["kv_bytes_per_step"] = kv
            step_s = row["static"]["step_ms"] / 1e3
            row["bandwidth_fraction"] = (res["weights"]["read_per_step"] + kv) / step_s / bw
        ids_by_batch[batch] = (row.pop("_hf_ids", None), row.pop("_static_ids", None))
        res["batches"].append(row)
        save()
        print(f"batch {batch} done at {time.perf_counter() - t0:.0f} s", flush=True)
    # bf16 noise floor: the same backend, the same prompts, another batch size
    sizes = sorted(b for b, (h, _) in ids_by_batch.items() if h)
    if len(sizes) >= 2:
        small, large = sizes[-2], sizes[-1]
        res["noise_floor"] = {
            "batches": [small, large],
            "hf_vs_hf": agreement(ids_by_batch[small][0], ids_by_batch[large][0][:small]),
            "static_vs_static": agreement(ids_by_batch[small][1], ids_by_batch[large][1][:small]),
        }
    save()
    print(summary(res), flush=True)
    if args.grpo_steps and time.perf_counter() - t0 < args.deadline_s:
        try:
            res["grpo"] = bench_grpo(model, processor, args.image_px, args.grpo_steps, args.grpo_new_tokens,
                                     args.grpo_generations, args.grpo_backends)
        except Exception as exc:  # noqa: BLE001
            res["grpo"] = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-3000:]}
        save()
    print(summary(res), flush=True)
    model.eval()
    res["hf_static_compile"] = []
    for batch in args.hf_static:
        if time.perf_counter() - t0 > args.deadline_s:
            break
        try:
            res["hf_static_compile"].append(bench_hf_static(model, processor, texts, images, batch,
                                                            args.new_tokens))
        except Exception as exc:  # noqa: BLE001
            res["hf_static_compile"].append({"batch": batch, "error": repr(exc)[:500]})
        save()
        print(res["hf_static_compile"][-1], flush=True)
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
