"""Data phase: declared sources (`sources`, `fetch`), RePIC's file formats (`validate`), the training subset
(`subset`) and the retrieval databases (`retrieval`). Stages fetch_data, subset_2k, build_db."""
