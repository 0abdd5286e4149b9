"""dvc.yaml's deps are complete: a code or param change reruns every stage whose result it can change.

For every stage, the closure of `repic.*` modules imported (at any depth, function-level imports included)
from its `stages/<x>.py`, and the params keys that file reads, must be declared in dvc.yaml; so must every input
path its command passes. The one exception is `repic.core.layout.NOT_STAGE_DEPS`, modules that cannot change an
output (argument parsing, progress display): they are not deps (what they import still is), and they are held to
it here: each imports only what `NO_OUTPUT_IMPORTS` allows. The library's packages import one way: a module
imports only its own package and the packages before it in `ORDER`.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from repic.core.layout import NOT_STAGE_DEPS

from .conftest import REPO, dvc_stages, resolve_dvc

# core < vlm < synthetic < data < train < eval: stages -> phases -> shared core
ORDER = ("core", "vlm", "synthetic", "data", "train", "eval")

# What a module of NOT_STAGE_DEPS may import (module -> names imported from it; None: the module itself or any
# name in it): argument parsing, errno codes and os.strerror (a full disk's one-line message), signals, threads (to
# find the main thread), logging, clocks, typing, the tqdm bar, the Trainer callback base class (progress.py's
# callback: see its test), and RepicError (raised, it makes the stage fail: no output). Nothing that computes, reads
# or writes a stage's data.
NO_OUTPUT_IMPORTS: dict[str, frozenset[str] | None] = {
    "__future__": None, "argparse": None, "contextlib": None, "errno": None, "os": frozenset({"strerror"}),
    "logging": None, "signal": None, "sys": None, "threading": None, "time": None, "typing": None,
    "collections.abc": None, "tqdm": frozenset({"tqdm"}), "transformers": frozenset({"TrainerCallback"}),
    "repic.core.io": frozenset({"RepicError"}),
}


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


def _all_imports(path: Path) -> set[tuple[str, str | None]]:
    """(module, name) of every import in a file, anywhere in it (name None: `import module`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            found.update(("." * node.level + (node.module or ""), a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update((a.name, None) for a in node.names)
    return found


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
    needed = ({str(entry.relative_to(REPO))} | module_closure(entry)) - set(NOT_STAGE_DEPS)
    missing = sorted(needed - set(stage["deps"]))
    assert not missing, f"dvc.yaml: stage {name}: deps miss {missing}"
    excluded = sorted(set(stage["deps"]) & set(NOT_STAGE_DEPS))
    assert not excluded, (f"dvc.yaml: stage {name}: deps list {excluded}, which cannot change an output "
                          "(repic/core/layout.py NOT_STAGE_DEPS): an edit to it would rerun the stage for nothing")
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


@pytest.mark.parametrize("module", sorted(NOT_STAGE_DEPS))
def test_modules_left_out_of_deps_import_nothing_that_can_change_an_output(module):
    path = REPO / module
    assert path.is_file() and len(NOT_STAGE_DEPS[module]) > 40, f"{module}: no such module, or no reason given"
    for imported, name in sorted(_all_imports(path), key=str):
        allowed = NO_OUTPUT_IMPORTS.get(imported, frozenset())
        assert allowed is None or name in allowed, (
            f"{module} is left out of stage deps (repic/core/layout.py NOT_STAGE_DEPS) but imports "
            f"{imported}{'.' + name if name else ''}: it could change an output; make it a dep or move the code")


def test_the_import_check_catches_an_output_relevant_import(tmp_path, monkeypatch):
    """The check above fails on a left-out module that imports, say, a reward or a file writer."""
    import tests.test_deps as this

    (tmp_path / "repic/core").mkdir(parents=True)
    (tmp_path / "repic/core/progress.py").write_text(
        "import sys\nfrom repic.core.io import RepicError, write_json\ndef f():\n    from repic.train import rewards\n")
    monkeypatch.setattr(this, "REPO", tmp_path)
    with pytest.raises(AssertionError, match=r"imports repic.core.io.write_json"):
        test_modules_left_out_of_deps_import_nothing_that_can_change_an_output("repic/core/progress.py")
    (tmp_path / "repic/core/progress.py").write_text("def f():\n    from repic.train import rewards\n")
    with pytest.raises(AssertionError, match=r"imports repic.train.rewards"):
        test_modules_left_out_of_deps_import_nothing_that_can_change_an_output("repic/core/progress.py")


def test_cli_reads_dvcs_params_file_and_passes_argv_unchanged():
    """cli.py's two ways into a stage's output, pinned: `--params` defaults to params.yaml (the file DVC's `params:`
    entries track) and `run` hands the stage's main exactly the argv it was given."""
    from repic.core.cli import parser, run

    assert parser("doc").parse_args([]).params == "params.yaml"
    seen = []
    assert run(seen.append, ["--x", "1"]) == 0 and seen == [["--x", "1"]]


def test_progress_callback_leaves_training_alone():
    """progress.py's Trainer callback returns nothing and never changes the Trainer's control flags."""
    import io

    from transformers import TrainerControl, TrainerState

    from repic.core.progress import training_callback

    callback = training_callback(io.StringIO())
    state, control = TrainerState(max_steps=4, global_step=0), TrainerControl()
    before = dict(vars(control))
    assert callback.on_train_begin(None, state, control) is None
    for step in range(1, 5):
        state.global_step = step
        assert callback.on_step_end(None, state, control) is None
    assert vars(control) == before
