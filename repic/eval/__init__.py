"""Evaluation phase: the queries of a query map and their retrieved references (`queries`), retrieval once per
dataset and setting (`retrieve`), captioning (`captioning`), name P/R/F1 (`metrics`, `scoring`), the paper's tables
(`tables`), the pairwise LLM judge (`judge`) and the HTML report (`report`). Stages retrieve@*, caption_*, score,
judge_llm, report."""
