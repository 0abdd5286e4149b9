"""Shared core: the vocabulary and artifact layout (`layout`), params, atomic I/O, stage CLI plumbing, progress,
prompts. Imports nothing from the phase packages."""
