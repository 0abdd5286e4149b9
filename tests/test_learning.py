"""Proof of learning: GRPO + LoRA through `repic.train.grpo.train` raises RePIC's object-consistency reward.

Design. A tiny Qwen2.5-VL (`build_tiny_model`, one vision block, 56 px solid-colour images = 4 image tokens) gets
a short supervised warm-up (`repic.synthetic.warmup.warmup`), then GRPO + LoRA through our own `train()` (TRL
`GRPOTrainer`, PEFT LoRA on the language model, `object_consistency` from `REWARD_REGISTRY`, `protocol: repic`)
on the yes/no question "Is this image a single colour?", whose answer is "yes" for every image: a bias the base
does not have (it answers that question at chance) and RL must discover. Two checks:

* the training log: mean per-step reward of the last quarter of steps vs the first quarter (`summarize_log`);
* held-out images (shades never seen in training): the registry reward of sampled answers (8 per image,
  temperature 1, as in the rollouts) of the base vs base + adapter, and of greedy answers.

Why a warm-up, and why this one. A random tiny model has flat logits: it never says "yes" or "no", every rollout
scores 0, every advantage is 0, and GRPO has nothing to reinforce. The warm-up must give the format without the
skill. Answering only the RL question, with "yes" or "no" at random, is not enough: "yes" and "no" then occur
only as interchangeable answers, their tied embeddings get the same gradient and drift together, the policy can
hardly move p(yes) - p(no), and in our runs the reward stayed flat while mass leaked to junk tokens. So three
quarters of the warm-up ask two other questions whose answers are fixed and different ("Is this an image?" yes,
"Is this image empty?" no): "yes" and "no" mean different things, as in a real base. The RL question is answered
"no" 70 % of the time in the warm-up: the format, not the skill, and a base that prefers the wrong answer. (With
answers at 50/50 the base's greedy answer was a coin flip decided by a tiny logit gap, which moved between torch
builds; at 30 % "yes" the base is wrong under greedy decoding on every build.)
On this base (G=8, 4 prompts a step, lr 5e-3, the PARAMS below) the reward rises within about 10 steps: on this
machine (2026-11-30), seed 0, the per-step reward goes from 0.21 (first quarter) to 0.98 (last quarter), the
held-out reward of sampled answers from 0.09 (base) to 0.98, of greedy answers from 0 to 1. What RL learns is the
bias itself, not the question: the trained model also says "yes" to "Is this image empty?" (one LoRA, 24 steps,
one rewarded question; nothing in the reward asks it to keep the other answers), so the test checks the facts on
the base only.

Cost and determinism. One torch thread (the matrices are tiny; on a shared 2-core machine two threads contend and
run several times slower). Everything is seeded (model init, warm-up, LoRA init in `repic.train.grpo`, TRL's
sampling, the evaluation's sampling), so a machine gives the same numbers on every run.

An answer that depends on the image (red -> "yes", blue -> "no") is learnable too, but not reliably at this size
and cost: within 48 steps it depended on the seed (some runs started from a base anti-correlated with the
answer, some collapsed into one constant answer, where every group has zero reward variance and GRPO stops).
"""

from __future__ import annotations

import itertools
import random

from PIL import Image

QUESTION = "Is this image a single colour?"  # the RL question: always "yes"
# Warm-up only: two questions with a fixed true answer, so that "yes" and "no" mean different things.
FACTS = [("Is this an image?", "yes"), ("Is this image empty?", "no")]
# Smaller than conftest.TINY_MODEL: one vision block, 56 px images only.
CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vision_hidden_size=32, vision_depth=1, vision_heads=2,
              min_pixels=3136, max_pixels=3136)
SEED = 0
STEPS = 24
WARMUP_STEPS = 200
YES_RATE = 0.3  # the warm-up's answers to QUESTION: mostly "no", so the base prefers the wrong answer
PARAMS = {
    "protocol": "repic",
    "rewards": ["object_consistency"],
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "grpo": {"num_generations": 8, "per_device_train_batch_size": 32, "max_completion_length": 4,
             "temperature": 1.0, "learning_rate": 5e-3, "beta": 0.04, "loss_type": "grpo", "scale_rewards": "group",
             "max_steps": STEPS, "logging_steps": 1, "bf16": False, "gradient_checkpointing": False,
             "save_strategy": "no"},
}
REWARD = "rewards/object_consistency/mean"


def _image(rng: random.Random, blue: bool) -> Image.Image:
    strong, weak = rng.randrange(180, 256), (rng.randrange(0, 60), rng.randrange(0, 60))
    return Image.new("RGB", (56, 56), (*weak, strong) if blue else (strong, *weak))


def _messages(question: str) -> list[dict]:
    from repic.core.prompts import training_problem

    text = training_problem(question, "yes_no", random.Random(0))  # OCT's instruction suffix (not random)
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _warmed_base(out_dir):
    """Build the tiny base and warm it up: QUESTION (1 in 4 examples) answered "yes" at YES_RATE, FACTS truthfully."""
    from repic.core.prompts import training_problem
    from repic.synthetic.tiny_model import build_tiny_model
    from repic.synthetic.warmup import warmup

    questions = [QUESTION, *(q for q, _ in FACTS)]
    model_dir = build_tiny_model(out_dir, [training_problem(q, "yes_no", random.Random(0)) for q in questions] * 20,
                                 CONFIG, seed=SEED)
    rng = random.Random(f"{SEED}/warmup")
    facts = itertools.cycle(FACTS)
    examples = []
    for i in range(64):
        question, target = (QUESTION, "yes" if rng.random() < YES_RATE else "no") if i % 4 == 0 else next(facts)
        examples.append({"messages": _messages(question), "images": [_image(rng, rng.random() < 0.5)],
                         "target": target})
    warmup(model_dir, examples, steps=WARMUP_STEPS, batch_size=8, learning_rate=1e-2, seed=SEED)
    return model_dir


def _held_out_rewards(model_dir, adapter, images, question: str = QUESTION, solution: str = "yes",
                      samples: int = 8) -> tuple[float, float]:
    """Mean registry reward (object consistency, `repic`) on `images` for `question`: of sampled answers
    (`samples` per image, temperature 1, as in the rollouts) and of greedy answers."""
    import torch

    from repic.train.rewards import REWARD_REGISTRY
    from repic.vlm.models import load_model, load_processor

    processor = load_processor(model_dir)
    model = load_model(model_dir, device="cpu", adapter=adapter)
    reward = REWARD_REGISTRY["object_consistency"]("repic")
    prompt = processor.apply_chat_template(_messages(question), add_generation_prompt=True, tokenize=False)

    def score(n: int, **kwargs) -> float:
        batch = processor(text=[prompt] * (n * len(images)), images=[[im] for im in images for _ in range(n)],
                          return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4, suppress_tokens=[model.config.image_token_id],
                                 **kwargs)
        answers = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        scores = reward(answers, [solution] * len(answers), ["yes_no"] * len(answers))
        return sum(scores) / len(scores)

    torch.manual_seed(SEED)
    return score(samples, do_sample=True, temperature=1.0, top_k=0, top_p=1.0), score(1, do_sample=False)


def test_grpo_lora_learns_a_bias_the_base_lacks(tmp_path):
    import torch

    from repic.train.grpo import heldout_rewards, summarize_log, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model_dir = _warmed_base(tmp_path / "base")
        rng = random.Random(f"{SEED}/train")
        (tmp_path / "data").mkdir()
        samples = []
        for i in range(64):
            _image(rng, blue=i % 2 == 1).save(tmp_path / f"data/{i}.png")
            samples.append({"image": f"./data/{i}.png", "problem": QUESTION, "solution": "yes",
                            "accu_reward_method": "yes_no"})
        log = train(model_dir, samples, tmp_path, tmp_path / "adapter", PARAMS,
                    checkpoint_dir=tmp_path / "checkpoints", seed=SEED, device="cpu")

        held_out = random.Random(f"{SEED}/eval")
        images = [_image(held_out, blue=i % 2 == 1) for i in range(16)]
        base, base_greedy = _held_out_rewards(model_dir, None, images)
        trained, trained_greedy = _held_out_rewards(model_dir, tmp_path / "adapter", images)
        # The warm-up gave "yes" and "no" distinct meanings: the base answers the warm-up facts right.
        facts = {q: _held_out_rewards(model_dir, None, images, q, a)[1] for q, a in FACTS}
        # The pipeline's own check (train_grpo_lora's summary.json "heldout"): base vs trained, greedy.
        for i, im in enumerate(images):
            im.save(tmp_path / f"data/heldout{i}.png")
        heldout = heldout_rewards(model_dir, tmp_path / "adapter",
                                  [{"image": f"./data/heldout{i}.png", "problem": QUESTION, "solution": "yes",
                                    "accu_reward_method": "yes_no"} for i in range(len(images))],
                                  tmp_path, PARAMS, seed=SEED, device="cpu")
    finally:
        torch.set_num_threads(threads)

    summary = summarize_log(log)
    first, last = summary["first"][REWARD], summary["last"][REWARD]
    print(f"\nper-step reward: first quarter {first:.3f}, last quarter {last:.3f}; held-out reward, sampled: "
          f"base {base:.3f}, trained {trained:.3f}; greedy: base {base_greedy:.3f}, trained {trained_greedy:.3f}; "
          f"heldout_rewards: {heldout}")
    assert summary["steps"] == STEPS
    assert last >= 0.9 and last - first >= 0.2
    assert base <= 0.75, "the base must not have the skill already"
    assert trained >= 0.9 and trained - base >= 0.3
    assert trained_greedy == 1.0
    assert all(v == 1.0 for v in facts.values()), facts
    assert heldout["n"] == 16 and heldout["trained"] == {"object_consistency": 1.0}
    assert heldout["base"]["object_consistency"] <= 0.5
