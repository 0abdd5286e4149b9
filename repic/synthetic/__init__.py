"""Scaffolding of the embedded default, not part of the paper path: the seeded concept world (`world`), the tiny
Qwen2.5-VL builder (`tiny_model`) and its supervised warm-up (`warmup`)."""
