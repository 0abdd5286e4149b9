"""DVC and our dvc.yaml: every param a stage declares really reruns it, and a failed stage loses nothing.

DVC 3.67 keys its run cache on the stage's lock entry (cmd, deps' hashes, params' values, outs' paths) hashed by
`dvc.stage.cache._get_cache_hash`, which calls `dict_sha256(..., exclude=[Meta.PARAM_SIZE, Meta.PARAM_NFILES])`.
That `exclude` is applied by `dvc.utils.dict_filter` recursively, to every dict at any depth, params included:
a param named `size` (or `nfiles`) anywhere under a declared section is left out of the key. `dvc status` still
flags the stage (it compares the lock's values), but `dvc repro` then finds a run-cache entry for the old value
and restores the stale outputs ("Stage ... is cached - skipping run"), while dvc.lock records the new value.

So this test does not list the names DVC treats specially: it drives DVC itself, on every leaf under every key
a stage of the real dvc.yaml declares (read by DVC's own loader), for params.yaml and params.yaml with each
overlay in configs/ applied. A stage's lock entry holds each declared key's value apart (`{key: value}`), so
stages declaring the same key get the same entry for it: each distinct declared key gets a scratch DVC repo
whose one stage declares exactly it, with a run-cacheable command that copies the params file into its out.
After a `repro` that fills the run cache, leaves are changed one at a time, cumulatively: each change must make
`status` flag the stage, and after `repro` the stage's out must hold the current params. If DVC left the leaf
out of the key, the key would equal the previous state's, whose run-cache entry `repro` would restore.

Not every leaf needs a rerun (each is a DVC status + repro, ~0.1 s of CPU): the lock entry is hashed by the key
*names* along a leaf's path and by its value, so leaves the schema (repic.core.params.SCHEMA) makes alike are
one class, checked once through DVC: (1) the items of a list (the schema's `items`: `base.data.datasets[]`,
`train_grpo_lora.rewards[]`, a source's `allow_patterns[]`); (2) the entries of a map of user-named entries (the
schema's `additionalProperties`: `models.<row>`, `fetch_data.sources.<name>`), sub-path by sub-path; (3) the same
path in params.yaml and in an overlay of configs/. A class is its schema path and the value's type. Besides one
leaf a class, a leaf is checked whenever it carries a key name no checked leaf has yet, so every name in every
configuration (a model row, a source, a GRPOConfig field) goes through DVC once: a name DVC drops is caught
wherever it is, as DVC drops it at any depth.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from repic.core.params import deep_merge

REPO = Path(__file__).resolve().parents[1]
# The scratch repo holds the params as JSON: the same values under the same declared keys (so the same lock
# entries and run-cache keys), read by DVC ~30x faster than through ruamel.yaml, which dominated the run time.
PARAMS = "params.json"
OVERLAYS = sorted((REPO / "configs").glob("*.yaml"))

Leaf = tuple  # a path of dict keys and list indices


def declared_params(repo: Path = REPO) -> dict[str, list[tuple[str, ...]]]:
    """Stage name -> the params.yaml keys it declares, as DVC's loader resolves dvc.yaml."""
    from dvc.repo import Repo

    out: dict[str, list[tuple[str, ...]]] = {}
    for stage in Repo(str(repo)).index.stages:
        for dep in stage.params:
            assert Path(dep.def_path).name == "params.yaml", f"{stage.name}: params from {dep.def_path}"
            out.setdefault(stage.name, []).extend(tuple(key.split(".")) for key in dep.params)
    return out


def leaves(value: Any, path: Leaf = ()) -> list[Leaf]:
    """Every leaf under `value`: scalars, list items, and empty dicts/lists (a value a user could fill in)."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in leaves(v, (*path, k))]
    if isinstance(value, list) and value:
        return [leaf for i, v in enumerate(value) for leaf in leaves(v, (*path, i))]
    return [path]


def leaf_class(leaf: Leaf, value: Any) -> tuple:
    """The leaf's path through the schema (a list index as `[]`, an entry of an `additionalProperties` map as
    `*`) and its value's type: leaves of one class are hashed alike by DVC, up to their key names."""
    from repic.core.params import SCHEMA

    node, path = SCHEMA, []
    for part in leaf:
        if isinstance(part, int):
            path.append("[]")
            node = node.get("items", {})
        elif part in node.get("properties", {}):
            path.append(part)
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            path.append("*")
            node = node["additionalProperties"]
        else:  # a dict the schema leaves open (GRPOConfig's fields, checked against the dataclass): by name
            path.append(part)
            node = {}
    return (*path, type(value).__name__)


def get(tree: Any, path: Leaf) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def changed(value: Any) -> Any:
    """Another value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_changed"
    if isinstance(value, dict):
        return {"changed": 1}
    if isinstance(value, list):
        return ["changed"]
    return "changed"  # None


def with_leaf(params: dict[str, Any], path: Leaf, value: Any) -> dict[str, Any]:
    params = copy.deepcopy(params)
    get(params, path[:-1])[path[-1]] = value
    return params


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


class ScratchRepo:
    """A DVC repo (no git: the run cache and status do not involve it) with one stage, `check`: it declares `key`
    and copies the params file to its out. One repo per key keeps dvc.lock small: DVC re-reads the whole lock
    (ruamel.yaml) for every stage it runs."""

    def __init__(self, path: Path, key: tuple[str, ...], params: dict[str, Any]):
        from dvc.repo import Repo

        self.path, self.key, self.params = path, key, params
        path.mkdir(parents=True)
        Repo.init(str(path), no_scm=True).close()
        (path / "dep.txt").write_text("a dependency, so that DVC's run cache can key the stage\n")
        stage = {"cmd": f"cp {PARAMS} out.json", "deps": ["dep.txt"], "params": [{PARAMS: [".".join(key)]}],
                 "outs": ["out.json"]}
        (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"check": stage}}, sort_keys=False))
        self.repro()  # fills the run cache

    def repro(self) -> bool:
        """Write self.params, then `dvc status` (whether it flags the stage) and `dvc repro`."""
        from dvc.repo import Repo

        (self.path / PARAMS).write_text(json.dumps(self.params))
        cwd = os.getcwd()
        os.chdir(self.path)  # `repro` without targets reproduces the dvc.yaml of the working directory
        try:
            with Repo(str(self.path)) as dvc:
                flagged = "check" in {name.split(":")[-1] for name in dvc.status()}
                dvc.reproduce()
        finally:
            os.chdir(cwd)
        return flagged

    def change(self, leaf: Leaf) -> list[str]:
        """Change one leaf under the key (keeping the earlier changes); what went wrong."""
        self.params = with_leaf(self.params, leaf, changed(get(self.params, leaf)))
        bad = [] if self.repro() else ["not flagged by dvc status"]
        if json.loads((self.path / "out.json").read_text()) != self.params:
            bad.append("dvc repro restored a stale result from the run cache")
        return bad


def configurations() -> list[tuple[str, dict[str, Any]]]:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    return [("params.yaml", base)] + [(f"params.yaml + configs/{o.name}",
                                       deep_merge(base, yaml.safe_load(o.read_text()) or {})) for o in OVERLAYS]


@pytest.mark.slow  # a DVC rerun per leaf class and key name: 16 s alone, 33 s beside the background runs (make test)
def test_every_declared_param_reruns_its_stage(tmp_path):
    declared = declared_params()
    keys = sorted({key for keys in declared.values() for key in keys})
    failures: dict[str, list[str]] = {}
    classes: set[tuple] = set()
    names: set[str] = set()
    every_leaf, every_name, checked = set(), set(), 0
    for n, (name, params) in enumerate(configurations()):
        for key in keys:
            get(params, key)  # KeyError: a declared key is missing
            todo = []
            for leaf in leaves(get(params, key), key):
                every_leaf.add(leaf)
                every_name.update(p for p in leaf if isinstance(p, str))
                new_names = {p for p in leaf if isinstance(p, str)} - names
                if leaf_class(leaf, get(params, leaf)) not in classes or new_names:
                    classes.add(leaf_class(leaf, get(params, leaf)))
                    names |= new_names
                    todo.append(leaf)
            if not todo:
                continue
            repo = ScratchRepo(tmp_path / str(n) / ".".join(key), key, params)
            for leaf in todo:
                checked += 1
                if bad := repo.change(leaf):
                    owners = sorted(s for s, ks in declared.items() if key in ks)
                    failures[f"{name}: {'.'.join(map(str, leaf))} (under {'.'.join(key)}, stages {owners})"] = bad
    # the real params, whole: every class and every key name went through DVC
    assert len(every_leaf) > 150 and names == every_name and checked >= len(classes) > 100, (checked, len(classes))
    assert not failures, failures


def test_the_check_catches_a_key_the_run_cache_leaves_out(tmp_path):
    """The mechanism the test relies on, on DVC 3.67: a param named `size` is restored stale by `dvc repro`
    (status flags the stage, repro says 'cached - skipping run'); one named otherwise reruns its stage."""
    repo = ScratchRepo(tmp_path / "repo", ("subset_2k",), {"subset_2k": {"size": 24, "n_samples": 24}})
    assert repo.change(("subset_2k", "n_samples")) == []
    assert repo.change(("subset_2k", "size")) == ["dvc repro restored a stale result from the run cache"]


def test_params_not_declared_by_any_stage_reach_it_through_its_command():
    """A params.yaml key no stage declares must be interpolated into a cmd/deps/outs (`${key}`), so that a
    change still changes the stage; otherwise the test above would not see it at all."""
    declared = {key for keys in declared_params().values() for key in keys}
    dvc_yaml = (REPO / "dvc.yaml").read_text()
    for _, params in configurations():
        for leaf in leaves(params):
            if any(leaf[:len(k)] == k for k in declared):
                continue
            dotted = ".".join(map(str, leaf))
            assert "${" + dotted + "}" in dvc_yaml, f"params.yaml: {dotted}: read by no stage of dvc.yaml"


MAKE_OUTS = """
import json, sys
from pathlib import Path
run = json.load(open("params.json"))["run"]
if run == "fail":
    sys.exit("failed on purpose")
for path in map(Path, sys.argv[1:]):
    if path.suffix:  # a file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{path} from run {run}\\n")
    else:
        (path / "sub").mkdir(parents=True, exist_ok=True)
        (path / "sub" / "file.txt").write_text(f"{path} from run {run}\\n")
"""


def snapshot(root: Path, paths: list[str]) -> dict[str, str]:
    out = {}
    for rel in paths:
        p = root / rel
        for f in sorted([p] if p.is_file() else p.rglob("*") if p.is_dir() else []):
            if f.is_file():
                out[str(f.relative_to(root))] = f.read_text()
    return out


def test_a_failing_stage_loses_no_output(tmp_path):
    """`dvc repro` deletes a stage's outs before running its command. A stage that then fails must leave every
    `cache: false` out of the real dvc.yaml (metrics in git: nothing could restore them) in place, and every
    cached one restorable by `dvc checkout`. Driven through DVC on the real stages' outs and their flags."""
    from dvc.exceptions import ReproductionError
    from dvc.repo import Repo

    real = [s for s in Repo(str(REPO)).index.stages if s.cmd]
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    Repo.init(str(repo)).close()
    (repo / "make_outs.py").write_text(MAKE_OUTS)
    stages = {}
    for stage in real:
        paths = [o.def_path for o in stage.outs]
        outs = {"outs": [], "metrics": []}
        for o in stage.outs:
            flags = {k: v for k, v in (("cache", o.use_cache), ("persist", o.persist)) if v != (k == "cache")}
            outs["metrics" if o.metric else "outs"].append({o.def_path: flags} if flags else o.def_path)
        # a `foreach` stage (caption_single@base) gets a plain name: `@` is DVC's, not allowed in a stage name
        stages[stage.name.replace("@", "_at_")] = {"cmd": f"python make_outs.py {' '.join(paths)}",
                                                   "deps": ["make_outs.py"],
                              "params": [{PARAMS: ["run"]}], **{k: v for k, v in outs.items() if v}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    all_outs = [o.def_path for s in real for o in s.outs]
    uncached = [o.def_path for s in real for o in s.outs if not o.use_cache]
    assert {"results/score/metrics.json", "results/train/summary.json"} <= set(uncached)
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        (repo / PARAMS).write_text(json.dumps({"run": 1}))
        with Repo(str(repo)) as dvc:
            dvc.reproduce()
        before = snapshot(repo, all_outs)
        assert len(before) == len(all_outs)
        (repo / PARAMS).write_text(json.dumps({"run": "fail"}))
        for stage in real:
            with Repo(str(repo)) as dvc, pytest.raises(ReproductionError):
                dvc.reproduce(stage.name.replace("@", "_at_"), single_item=True)
            now = snapshot(repo, uncached)
            kept = {k: v for k, v in before.items() if any(k == u or k.startswith(u + "/") for u in uncached)}
            assert now == kept, f"{stage.name}: a failed run lost cache: false outs {sorted(kept.keys() - now)}"
        with Repo(str(repo)) as dvc:
            dvc.checkout(force=True)
        assert snapshot(repo, all_outs) == before
    finally:
        os.chdir(cwd)
