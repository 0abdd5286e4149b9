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
    from repic.core.params import apply_overlay

    real = tmp_path / "real_eval"
    real.mkdir()
    params_path = real / "params.yaml"
    params_path.write_text((REPO / "params.yaml").read_text())
    apply_overlay(params_path, REPO / "configs" / "real_eval_local.yaml")
    params = yaml.safe_load(params_path.read_text())
    params["fetch_data"]["sources"]["repic_eval"]["path"] = str(shared_dir / "repic_eval" / "data")
    params["caption"].update(max_new_tokens=4, batch_size=16)  # the captions of a tiny stand-in are noise anyway
    # the overlay's data paths live under results/real_eval/; here they live under tmp_path
    params["base"]["data"] = json.loads(json.dumps(params["base"]["data"]).replace("results/real_eval", str(real)))
    params_path.write_text(yaml.safe_dump(params))
    p = ["--params", str(params_path)]
    _stage("fetch_data", *p, "--out-data", str(real / "data"), "--out-model", str(real / "model"), cwd=REPO)
    report = json.loads((real / "data/validation.json").read_text())
    unlisted = report["databases"]["data/database_tot/database_4_concepts/database_mod.json"]["unlisted_images"]
    assert sorted(Path(u).stem for u in unlisted) == ["sim", "sky", "sunghoon"]
    assert report["queries"]["4_concepts/multi4"]["errors"] == 0
    # the copy has no Yo'LLaVA images and no single/2-concept query images: named, not fatal
    yollava = report["databases"]["data/database_tot/database_yollava/database_mod.json"]
    assert yollava["missing_images"] and not report["ok"]
    assert report["queries"]["myvlm/single"]["missing_images"]
    # one index per dataset; Yo'LLaVA (no image at all) is skipped and said so
    _stage("build_db", *p, "--root", str(real / "data"), "--out", str(real / "db"), cwd=REPO)
    manifest = json.loads((real / "db/manifest.json").read_text())
    assert manifest["built"] == ["myvlm", "dreambooth", "2_concepts", "4_concepts"]
    assert list(manifest["skipped"]) == ["yollava"]
    ntotal = {name: json.loads((real / f"db/{name}/meta.json").read_text())["ntotal"] for name in manifest["built"]}
    assert ntotal["4_concepts"] >= 24 and ntotal["myvlm"] >= 20 and ntotal["2_concepts"] >= 8
    # retrieval in the 4-concept database finds only 4-concept concepts (no merged database)
    keys4 = set(json.loads((real / "data/data/database_tot/database_4_concepts/database_mod.json").read_text())
                ["concept_dict"])
    assert {e["key"] for e in json.loads((real / "db/4_concepts/id_map.json").read_text())} <= keys4
    _stage("retrieve", *p, "--setting", "multi4", "--root", str(real / "data"), "--index", str(real / "db"),
           "--out", str(real / "retrieval"), cwd=REPO)
    _stage("caption", *p, "--setting", "multi4", "--root", str(real / "data"), "--retrieval", str(real / "retrieval"),
           "--row", "base", "--model", str(real / "model"), "--out", str(real / "captions"), cwd=REPO)
    for mode in ("skip", "retrieval"):
        rows = json.loads((real / f"captions/4_concepts/base_{mode}.json").read_text())
        assert len(rows) == 105 and all(len(r[1]) == 4 for r in rows)  # RePIC's 105 subsets over 4 photos
    retrieval = json.loads((real / "retrieval/4_concepts/retrieval.json").read_text())
    assert retrieval["k"] == 4 and 0.0 < retrieval["recall_at_k"] <= 1.0
    assert all(len(q["retrieved"]) <= 4 for q in retrieval["per_query"])
