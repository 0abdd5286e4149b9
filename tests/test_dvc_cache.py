"""`.dvc/config` cache.type: a cached output and its cache entry are one copy on disk, not two (issue 25: the paper
run's model folders are ~16 GB each). A tiny DVC project in tmp with the repository's cache.type; offline, ~1 s.
Every persist out is cache: false: an out edited in place (cache.jsonl, checkpoints) never shares a cache entry."""

from __future__ import annotations

import os
import sys

from .conftest import REPO


def test_a_stage_output_and_its_cache_entry_share_storage(tmp_path, monkeypatch):
    from dvc.config import Config
    from dvc.repo import Repo

    repo_types = Config(dvc_dir=str(REPO / ".dvc"), validate=True)["cache"].get("type")
    assert repo_types == ["hardlink", "copy"]  # a link first, a copy only where none can be made
    project = tmp_path / "p"
    project.mkdir()
    monkeypatch.chdir(project)
    repo = Repo.init(str(project), no_scm=True)
    with repo.config.edit() as conf:
        conf["cache"]["type"] = repo_types
    (project / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: " + sys.executable + " -c \"import os; os.makedirs('out'); "
        "open('out/weights.bin', 'wb').write(b'w' * 4096)\"\n    outs: [out]\n")
    repo = Repo(str(project))
    repo.reproduce()
    out = project / "out" / "weights.bin"
    entries = [p for p in (project / ".dvc" / "cache" / "files").rglob("*") if p.is_file() and p.stat().st_size == 4096]
    assert len(entries) == 1
    assert os.path.samefile(out, entries[0]) and out.stat().st_nlink == 2  # one file, two names


def test_no_cached_out_is_edited_in_place():
    """Linked files are read-only and share the cache's inode: an out a stage appends to or edits (a persist out)
    must not be cached."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        for out in [*body.get("outs", []), *body.get("metrics", [])]:
            if isinstance(out, dict):
                for path, flags in out.items():
                    assert not flags.get("persist") or flags.get("cache") is False, f"{name}: {path}"
