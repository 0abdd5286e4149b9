"""Evaluation phase: captioning (`captioning`), name P/R/F1 (`metrics`, `scoring`), the paper's tables
(`tables`), the pairwise LLM judge (`judge`) and the HTML report (`report`). Stages caption_*, score, judge_llm,
report."""
