"""RePIC: personalized image captioning by reinforced post-training (GRPO + LoRA on Qwen2.5-VL)."""

__version__ = "0.1.0"
