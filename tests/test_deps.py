"""dvc.yaml's deps are complete: a code or param change reruns every stage whose result it can change.

For every stage, the closure of `repic.*` modules imported (at any depth, function-level imports included)
from its `stages/<x>.py`, and the params keys that file reads, must be declared in dvc.yaml; so must every input
path its command passes. The library's packages import one way: a module imports only its own package and the
packages before it in `ORDER`.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, dvc_stages, resolve_dvc

# core < vlm < synthetic < data < train < eval: stages -> phases -> shared core
ORDER = ("core", "vlm", "synthetic", "data", "train", "eval")


def _imported_modules(path: Path) -> set[str]:
    """`repic.*` modules a file imports anywhere in it (`from repic.x import y` may name module y)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "repic":
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "repic")
    return names


def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None  # a package (its __init__ is checked to hold no code) or a name inside a module


def module_closure(entry: Path) -> set[str]:
    """Repository-relative paths of the repic modules `entry` needs, transitively."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        for name in _imported_modules(todo.pop()):
            path = _module_file(name)
            if path is not None and path not in seen:
                seen.add(path)
                todo.append(path)
    return {str(p.relative_to(REPO)) for p in seen}


def params_read(path: Path) -> set[str]:
    """Dotted params keys a stage file reads: subscript chains on `params` (`params["base"]["seed"]`), through
    names bound to a part of it (`cfg, base = params["x"], params["base"]` then `base["seed"]`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    alias: dict[str, str] = {}

    def chain(node: ast.AST) -> str | None:
        keys = []
        while isinstance(node, ast.Subscript):
            if not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
                return None
            keys.append(node.slice.value)
            node = node.value
        if isinstance(node, ast.Name) and (node.id == "params" or node.id in alias):
            head = [] if node.id == "params" else [alias[node.id]]
            return ".".join(head + keys[::-1]) or None
        return None

    for node in ast.walk(tree):  # aliases first: `x = params[...]`, `a, b = params[...], params[...]`
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            pairs = (zip(target.elts, value.elts) if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                     else [(target, value)])
            for t, v in pairs:
                if isinstance(t, ast.Name) and (key := chain(v)):
                    alias[t.id] = key
    read = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript | ast.Name):
            key = chain(node)
            if key:
                read.add(key)
    # a chain's prefixes are not reads of their own (params["base"]["seed"] reads base.seed, not all of base)
    return {k for k in read if not any(o.startswith(k + ".") for o in read)}


def _covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def _dvc_stages() -> dict[str, dict]:
    return dvc_stages()


STAGES = _dvc_stages()


def _entry(stage: dict) -> Path:
    """stages/<x>.py of a dvc.yaml stage (its command runs `python -m stages.<x>`)."""
    return REPO / "stages" / (re.search(r"-m stages\.(\w+)", stage["cmd"]).group(1) + ".py")


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_hold_every_module_it_imports(name):
    stage = STAGES[name]
    entry = _entry(stage)
    needed = {str(entry.relative_to(REPO))} | module_closure(entry)
    missing = sorted(needed - set(stage["deps"]))
    assert not missing, f"dvc.yaml: stage {name}: deps miss {missing}"
    extra = sorted(d for d in stage["deps"] if d.startswith(("repic/", "stages/")) and d not in needed)
    assert not extra, f"dvc.yaml: stage {name}: deps list modules it does not import: {extra}"


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_params_hold_every_key_its_module_reads(name):
    stage = STAGES[name]
    entry = _entry(stage)
    read = params_read(entry)
    assert read, f"{entry}: no params read found (the analysis is broken)"
    missing = sorted(k for k in read if not _covered(k, stage.get("params", [])))
    assert not missing, f"dvc.yaml: stage {name}: params miss {missing}"


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_hold_every_input_path_of_its_command(name):
    """Each path argument of the command is a dep (or inside one, or holding deps) unless it is an out."""
    stage = STAGES[name]
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    cmd = shlex.split(resolve_dvc(stage["cmd"], params))
    outs = [resolve_dvc(next(iter(o)) if isinstance(o, dict) else o, params)
            for o in stage.get("outs", []) + stage.get("metrics", [])]
    deps = [resolve_dvc(d, params) for d in stage["deps"]]

    def inside(a: str, b: str) -> bool:
        return a == b or a.startswith(b.rstrip("/") + "/")

    for option, value in zip(cmd, cmd[1:]):
        if not option.startswith("--") or "/" not in value or value.startswith("-"):
            continue
        if any(inside(o, value) for o in outs):  # an output folder (or the one holding them)
            continue
        ok = any(inside(value, d) or inside(d, value) for d in deps)
        assert ok, f"dvc.yaml: stage {name}: {option} {value} is read but is not a dep"


def test_deps_closure_analysis_finds_lazy_imports_and_aliased_params(tmp_path):
    """The analysis itself: a function-level import and a key read through an alias are found."""
    stage = tmp_path / "s.py"
    stage.write_text("from repic.core.cli import run\n"
                     "def main():\n    from repic.eval.scoring import score_runs\n"
                     "    cfg, base = params['score'], params['base']\n    return base['seed'], cfg\n")
    assert {"repic/eval/scoring.py", "repic/eval/metrics.py", "repic/core/cli.py"} <= module_closure(stage)
    assert params_read(stage) == {"score", "base.seed"}


def test_packages_import_one_way():
    """core < vlm < synthetic < data < train < eval: no module imports a package after its own."""
    for path in sorted((REPO / "repic").glob("*/*.py")):
        package = path.parent.name
        if package not in ORDER:
            continue
        for name in _imported_modules(path):
            other = name.split(".")[1] if name.count(".") else None
            if other in ORDER:
                assert ORDER.index(other) <= ORDER.index(package), f"{path.relative_to(REPO)} imports {name}"


def test_package_inits_hold_no_code():
    """Deps list modules, not package __init__ files: those hold a docstring and constants only."""
    for init in sorted((REPO / "repic").rglob("__init__.py")):
        body = ast.parse(init.read_text(encoding="utf-8")).body
        assert all(isinstance(n, ast.Expr | ast.Assign) and isinstance(n.value, ast.Constant) for n in body), init
