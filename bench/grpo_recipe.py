"""Time and memory of the paper's GRPO + LoRA recipe at Qwen2.5-VL-7B shape (random weights), one process a GPU.

One process:   python bench/grpo_recipe.py --shape 7b --steps 3 --out bench_7b.json
N GPUs, ZeRO-2: accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 2 \
                    bench/grpo_recipe.py --shape small --steps 4 --out bench_zero2.json
Scaling (bench/device_scaling.sh): --prompts-per-device P --grad-accum A sets the per-GPU batch (P x G completions)
and the accumulation; global batch = GPUs x P x A prompts per optimizer step. Tokens/s per GPU counts prompt
(image tokens included) + completion tokens of every sequence of a step, over the step's wall time, as EasyR1/verl.
The recipe (LoRA r64/a128 on the language model, G=8, 256 new tokens, beta 0.04, loss grpo, gradient
checkpointing, bf16) comes from configs/paper.yaml through the same builders the pipeline uses. Completions of
a random model rarely stop early, so every step generates the full 256 tokens: a worst case for time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # Qwen2.5-VL-7B-Instruct's config.json
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           fullatt_block_indexes=[7, 15, 23, 31])),
    "tiny": dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1024),
                 vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1])),
    "small": dict(text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                            num_key_value_heads=4, vocab_size=32000),
                  vision=dict(depth=4, hidden_size=512, intermediate_size=1024, num_heads=8,
                              fullatt_block_indexes=[3])),
}


def build(shape: str, workdir: Path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from repic.synthetic.tiny_model import CHAT_TEMPLATE, train_tokenizer
    from repic.vlm.models import ImageQwenVLProcessor

    tok = train_tokenizer(["The first image shows <zorp>. Is <zorp> in the second image? yes no"] * 50, 600)
    proc = ImageQwenVLProcessor(image_processor=Qwen2VLImageProcessorPil(max_pixels=448 * 448),
                                tokenizer=tok, chat_template=CHAT_TEMPLATE)
    s = SHAPES[shape]
    head_dim = s["text"]["hidden_size"] // s["text"]["num_attention_heads"]
    half = head_dim // 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    config = Qwen2_5_VLConfig(
        text_config=dict(**s["text"], max_position_embeddings=32768, rope_parameters={
            "rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"]),
        vision_config=dict(**s["vision"], out_hidden_size=s["text"]["hidden_size"], patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.set_default_dtype(torch.bfloat16)
    # random weights, bf16, drawn on the GPU when there is one (8 B random draws on the CPU take minutes)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model, proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, help="override the recipe's 256 (CPU smoke runs only)")
    ap.add_argument("--rollout-backend", choices=["hf", "static"],
                    help="GRPO rollouts (default: configs/paper.yaml's train_grpo_lora.rollout_backend)")
    ap.add_argument("--prompts-per-device", type=int, help="prompts per GPU per micro-step (default: the recipe's)")
    ap.add_argument("--grad-accum", type=int, help="gradient_accumulation_steps (default: the recipe's)")
    args = ap.parse_args()

    from datasets import Dataset
    from peft import get_peft_model
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from repic.train.grpo import batch_plan, build_examples, grpo_config, lora_config, reward_functions
    from repic.vlm.generation import rollout_trainer

    paper = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/paper.yaml").read_text())
    recipe = paper["train_grpo_lora"]
    work = Path(tempfile.mkdtemp())
    (work / "data").mkdir()
    for i in range(2):
        Image.new("RGB", (448, 448), (40 + 100 * i, 120, 200)).save(work / f"data/{i}.png")
    problem = "The first image shows <z{i}>. Describe the second image in detail, referring to <z{i}> by name."
    samples = [{"image": ["./data/0.png", "./data/1.png"], "problem": problem.format(i=i), "solution": f"<z{i}>",
                "accu_reward_method": "yes_no_name"} for i in range(64)]
    model, processor = build(args.shape, work)
    torch.manual_seed(0)
    model = get_peft_model(model, lora_config(recipe["lora"]))
    grpo = {**recipe["grpo"], "max_steps": args.steps, "report_to": "none", "save_strategy": "no",
            "logging_steps": 1, "num_train_epochs": 1}
    # the recipe's batch for this run's processes (completions_per_step sets per-device batch and accumulation)
    grpo = batch_plan(grpo, recipe["completions_per_step"], int(os.environ.get("WORLD_SIZE", "1")))
    if args.max_new_tokens:
        grpo["max_completion_length"] = args.max_new_tokens
    if args.prompts_per_device:
        grpo["per_device_train_batch_size"] = args.prompts_per_device * grpo["num_generations"]
    if args.grad_accum:
        grpo["gradient_accumulation_steps"] = args.grad_accum
    backend = args.rollout_backend or recipe.get("rollout_backend", "hf")
    if not torch.cuda.is_available():
        grpo.update(bf16=False, gradient_checkpointing=False)
    targs = grpo_config(grpo, work / "out", use_cpu=not torch.cuda.is_available())
    class StepClock(TrainerCallback):
        """Wall time of each optimizer step (generation, forward, backward, optimizer), GPU work included."""

        def __init__(self) -> None:
            self.ends = [time.perf_counter()]

        def on_step_end(self, *_, **__) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    clock = StepClock()
    trainer_cls = rollout_trainer(GRPOTrainer, backend) if backend != "hf" else GRPOTrainer
    trainer = trainer_cls(model=model, reward_funcs=reward_functions(["identity_consistency"], "repic"),
                          args=targs, train_dataset=Dataset.from_list(build_examples(samples, work, seed=0)),
                          processing_class=processor, callbacks=[clock])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    clock.ends = [time.perf_counter()]
    trainer.train()
    wall = time.time() - start
    # every GPU's peak (ZeRO-2 shards optimizer state, so they differ), gathered on the main process
    peaks = trainer.accelerator.gather_for_metrics(
        [torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0], use_gather_object=True)
    if trainer.is_world_process_zero():
        steps = [r for r in trainer.state.log_history if "step_time" in r]
        n_gpus = trainer.accelerator.num_processes
        wall_steps = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
        seen = [0] + [r["num_tokens"] for r in steps]  # cumulative prompt + completion tokens, all processes
        tokens = [b - a for a, b in zip(seen, seen[1:])]
        result = {
            "shape": args.shape, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "n_gpus": n_gpus,
            "distributed": str(trainer.accelerator.distributed_type), "steps": args.steps,
            "rollout_backend": backend,
            "step_time_s": [r["step_time"] for r in steps],  # TRL's: the training_step calls of one step
            "step_wall_s": wall_steps,  # optimizer step to optimizer step, synchronised
            "tokens_per_step": tokens,
            "tokens_per_s_per_gpu": [t / w / n_gpus for t, w in zip(tokens, wall_steps)],
            "completion_mean_length": [r.get("completions/mean_length") for r in steps],
            "prompts_per_step_per_gpu": grpo["per_device_train_batch_size"] // grpo["num_generations"],
            "gradient_accumulation_steps": grpo["gradient_accumulation_steps"],
            "global_batch_prompts": n_gpus * grpo["gradient_accumulation_steps"]
            * grpo["per_device_train_batch_size"] // grpo["num_generations"],
            "num_generations": grpo["num_generations"], "max_completion_length": grpo["max_completion_length"],
            "peak_memory_gib_per_gpu": peaks,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
            "wall_s": wall,
            "params_total": sum(p.numel() for p in model.parameters()),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
