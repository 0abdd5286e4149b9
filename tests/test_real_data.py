"""The real-data path on RePIC's real evaluation files (../shared/repic_eval): local source -> validation ->
retrieval database -> 4-concept captioning, skip and retrieval, with the tiny model standing in for Qwen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

pytestmark = pytest.mark.slow


def _stage(name: str, *args: str, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_real_4_concept_evaluation_end_to_end(shared_dir, tmp_path):
    from repic.params import apply_overlay

    real = tmp_path / "real_eval"
    real.mkdir()
    params_path = real / "params.yaml"
    params_path.write_text((REPO / "params.yaml").read_text())
    apply_overlay(params_path, REPO / "configs" / "real_eval_local.yaml")
    params = yaml.safe_load(params_path.read_text())
    params["fetch_data"]["sources"]["repic_eval"]["path"] = str(shared_dir / "repic_eval" / "data")
    params["caption"].update(max_new_tokens=4, batch_size=16)  # the captions of a tiny stand-in are noise anyway
    params_path.write_text(yaml.safe_dump(params))
    database = real / "data/data/database_tot/database_4_concepts/database_mod.json"
    p = ["--params", str(params_path)]
    _stage("fetch_data", *p, "--out-data", str(real / "data"), "--out-model", str(real / "model"), cwd=REPO)
    report = json.loads((real / "data/validation.json").read_text())
    unlisted = report["databases"]["data/database_tot/database_4_concepts/database_mod.json"]["unlisted_images"]
    assert sorted(Path(u).stem for u in unlisted) == ["sim", "sky", "sunghoon"]
    assert report["queries"]["multi4"]["errors"] == 0
    _stage("build_db", *p, "--database", str(database), "--root", str(real / "data"), "--out", str(real / "db"),
           cwd=REPO)
    assert json.loads((real / "db/meta.json").read_text())["ntotal"] >= 24
    _stage("caption", *p, "--setting", "multi4", "--root", str(real / "data"), "--index", str(real / "db"),
           "--queries", str(real / "data/data/query_tot/4_concept_query_templates.json"),
           "--model", str(real / "model"), "--database", str(database), "--out", str(real / "captions"), cwd=REPO)
    for mode in ("skip", "retrieval"):
        rows = json.loads((real / f"captions/base_{mode}.json").read_text())
        assert len(rows) == 105 and all(len(r[1]) == 4 for r in rows)  # RePIC's 105 subsets over 4 photos
    retrieval = json.loads((real / "captions/retrieval.json").read_text())
    assert retrieval["k"] == 4 and 0.0 < retrieval["recall_at_k"] <= 1.0
    assert all(len(q["retrieved"]) <= 4 for q in retrieval["per_query"])
