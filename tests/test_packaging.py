"""The pins: one lock, its conda form consistent with it, and the dvc.yaml stages wired to their modules."""

import re

import pytest
import yaml

from .conftest import REPO, need_shared


def _pins(lines):
    return {ln.split("==")[0].lower(): ln.split("==")[1] for ln in lines if re.match(r"^[A-Za-z0-9_.\-]+==", ln)}


def test_environment_yml_matches_requirements_lock():
    lock = _pins((REPO / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert _pins(pip) == lock
    assert "python=3.11" in env["dependencies"]


def test_direct_requirements_are_pinned_in_the_lock():
    direct = _pins(ln.split("#")[0].strip() for ln in (REPO / "requirements.in").read_text().splitlines())
    lock = _pins((REPO / "requirements.txt").read_text().splitlines())
    assert direct and all(lock.get(name) == version for name, version in direct.items()), direct


def test_every_stage_lists_its_own_module_and_params_section():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in dvc["stages"].items():
        stage = stage.get("do", stage)  # a `foreach` group (one caption stage per model row): its template
        module = re.search(r"-m stages\.(\w+)", stage["cmd"]).group(1)
        assert f"stages/{module}.py" in stage["deps"], name
        # a params section named after its module (`caption` for the caption_<setting> stages), whole or by key;
        # the retrieve stages read caption's retrieval keys (tests/test_deps.py checks each key a stage reads)
        section = "caption" if module == "retrieve" else module
        assert section in params and any(k == section or k.startswith(f"{section}.") for k in stage["params"]), (
            name, module, stage.get("params"))
        for key in stage["params"]:  # and every key it declares is in params.yaml
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: params key {key} not in params.yaml"
                node = node[part]


def test_tests_needing_shared_skip_in_a_clone_but_fail_in_ci(tmp_path, monkeypatch):
    """../shared is absent from a user's clone (skip) but CI has it (.ci/run sets CI): a missing path fails there."""
    from _pytest.outcomes import Failed, Skipped


    assert "export CI=1" in (REPO / ".ci" / "run").read_text()
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(Skipped):
        need_shared(tmp_path / "absent")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(Failed, match="CI .* must have ../shared"):
        need_shared(tmp_path / "absent")
    assert need_shared(tmp_path) == tmp_path
