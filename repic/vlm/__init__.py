"""The Qwen2.5-VL runtime shared by training and evaluation: loading (`models`), generation backends
(`generation`) and the fast vision tower (`vision`)."""
