"""Training phase: GRPO + LoRA (`grpo`), RePIC's verifiable rewards (`rewards`), the verified LoRA merge
(`merge`). Stages train_grpo_lora, merge_lora."""
