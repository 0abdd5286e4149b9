"""dvc.yaml as Snakemake rules: reads the one DAG through DVC's Python API, lists no stage or path itself.

DVC resolves `foreach`/`vars`/`${...}` and `wdir`; this module turns each pipeline stage into what a
Snakemake rule needs (shell command, input paths, output paths with their kind, params, resources from
`meta: {resources: ...}`) and, after a run, commits the stages Snakemake ran to dvc.lock.

    >>> stages = load_stages(".")          # doctest: +SKIP
    >>> stages[0].name, stages[0].resources  # doctest: +SKIP
    ('fetch_data', {'gpu': 0, 'mem_mb': 4000, 'runtime': 30})
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# Where a rule records that it ran, so that the run's end can commit exactly those stages to dvc.lock.
# Inside .snakemake/ (Snakemake's own state, git-ignored); survives a failed run, so that the next
# successful one commits the stages that did finish.
RAN_DIR = Path(".snakemake") / "dvc-ran"
LOG_DIR = Path(".snakemake") / "stage_logs"  # each stage's stdout+stderr, also shown on the terminal

# Every rule's shell (a Snakemake format string): the stage's command as DVC runs it (`command()`), teed to
# the log, then the mark that it succeeded (`set -o pipefail` from the Snakefile's prefix keeps its exit status).
SHELL = f"( {{params.run}}\n) 2>&1 | tee {{log:q}}\nmkdir -p {RAN_DIR} && touch {{params.ran:q}}"

# Snakemake leaves this file in every directory output (its mtime stamp); DVC must not hash it, or a
# directory built by Snakemake differs from the same directory built by `dvc repro`.
TIMESTAMP = ".snakemake_timestamp"

# `meta: {resources: {...}}` keys checked here; `threads` becomes the rule's threads, the others its
# resources. Any other key (`gpu_model`, `constraint`, `slurm_partition`, ...) is passed on unchanged.
# `nodes` x `gpus_per_node` (instead of `gpu`) asks for several nodes: mem_mb and threads are then per node.
COUNTED = ("gpu", "mem_mb", "runtime", "threads", "nodes", "gpus_per_node")

# The launcher of stages that ask for `nodes`: runs their `accelerate launch` on every node (multinode.py).
MULTINODE = Path(__file__).resolve().with_name("multinode.py")


@dataclass(frozen=True)
class Output:
    """One DVC out, as Snakemake must declare it."""

    path: str  # relative to the repository root
    is_dir: bool  # Snakemake needs directory() for directories
    persist: bool  # DVC `persist: true`: kept across runs -> Snakemake update(), never removed first


@dataclass(frozen=True)
class Stage:
    """One dvc.yaml pipeline stage, with everything a Snakemake rule needs."""

    name: str  # the Snakemake rule name (a Python identifier)
    address: str  # what `dvc commit`/`dvc repro` take: `score`, `sub/dvc.yaml:train@1`
    cmd: str  # shell, run from the repository root
    deps: tuple[str, ...]  # file/directory inputs, relative to the root
    params: Mapping[str, Any]  # `params.yaml:key` -> value, the exact keys DVC tracks
    outs: tuple[Output, ...]
    threads: int
    resources: Mapping[str, Any]  # Snakemake resources: gpu, mem_mb, runtime, ...


def stage_address(stage: Any, root: str | os.PathLike[str]) -> str:
    """What `dvc repro`/`dvc commit` take from `root`: `score`, `sub/dvc.yaml:train@1` (DVC's own
    `stage.addressing` is relative to the current directory)."""
    dvcfile = os.path.relpath(stage.path, root)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def rule_name(address: str) -> str:
    """A Snakemake rule name for a DVC stage address (`sub/dvc.yaml:train@a-1` -> `sub_train_a_1`)."""
    file, _, stage = address.rpartition(":")
    prefix = os.path.dirname(file)
    name = re.sub(r"\W", "_", f"{prefix}/{stage}" if prefix else stage)
    return name if name[0].isalpha() or name[0] == "_" else f"_{name}"


def _is_dir(out: Any, path: Path) -> bool:
    # The out on disk is the truth; else dvc.lock's record; else (never built, not locked) the name:
    # DVC outs without a suffix are directories in practice (data/world, results/train/adapter).
    if path.exists():
        return path.is_dir()
    if out.hash_info and out.hash_info.value:
        return out.hash_info.isdir
    return not path.suffix


def _resources(meta: Mapping[str, Any] | None, address: str) -> tuple[int, dict[str, Any]]:
    requested = dict((meta or {}).get("resources") or {})
    for key in COUNTED:
        value = requested.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{address}: meta.resources.{key} must be a non-negative integer, got {value!r}")
    if "gpus_per_node" in requested and ("gpu" in requested or "nodes" not in requested):
        raise ValueError(f"{address}: meta.resources asks for GPUs as `gpu` (one node) or as `nodes` x "
                         f"`gpus_per_node`, not both; got {sorted(requested)}")
    if requested.get("nodes", 1) < 1:
        raise ValueError(f"{address}: meta.resources.nodes must be at least 1, got {requested['nodes']}")
    return max(1, requested.pop("threads", 1)), requested


def load_stages(root: str | os.PathLike[str] = ".") -> list[Stage]:
    """Every pipeline stage of the DVC repository at `root`, in dvc.yaml order, resolved by DVC."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = Path(root).resolve()

    def rel(path: str) -> str:
        return os.path.relpath(path, root)

    stages = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            if not getattr(stage, "cmd", None):  # a .dvc file: data, not a step
                continue
            wdir = rel(stage.wdir)
            cmds = stage.cmd if isinstance(stage.cmd, list) else [stage.cmd]
            # DVC runs a command list in `wdir`, stopping at the first failure: so does bash -e (SHELL
            # runs this in a subshell, so the cd stays there).
            cmd = "\n".join(([f"cd {shlex.quote(wdir)}"] if wdir != "." else []) + cmds)
            params: dict[str, Any] = {}
            deps = []
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    values = dep.read_params()
                    params.update({f"{rel(dep.fs_path)}:{key}": values.get(key) for key in dep.params})
                else:
                    deps.append(rel(dep.fs_path))
            outs = tuple(
                Output(rel(out.fs_path), _is_dir(out, Path(out.fs_path)), bool(out.persist)) for out in stage.outs
            )
            address = stage_address(stage, root)
            threads, resources = _resources(stage.meta, address)
            stages.append(
                Stage(
                    rule_name(address),
                    address,
                    cmd,
                    tuple(deps),
                    params,
                    outs,
                    threads,
                    resources,
                )
            )
        dir_outs = [out.path for stage in stages for out in stage.outs if out.is_dir]
        if dir_outs and not repo.dvcignore.is_ignored_file(str(root / dir_outs[0] / TIMESTAMP)):
            raise ValueError(
                f"add `{TIMESTAMP}` to {root / '.dvcignore'}: Snakemake writes it into "
                f"directory outputs ({dir_outs[0]}) and DVC would hash it"
            )
    return _inputs_from_producers(stages)


def _inputs_from_producers(stages: list[Stage]) -> list[Stage]:
    """Deps as Snakemake must name them. DVC links a dep to an out when either contains the other;
    Snakemake only matches whole paths. A dep inside another stage's out directory becomes that
    directory; a dep directory holding other stages' outs becomes those outs."""
    outs = [out for stage in stages for out in stage.outs]

    def as_inputs(dep: str) -> list[str]:
        inside = [o.path for o in outs if o.path.startswith(dep + os.sep)]
        holder = [o.path for o in outs if o.is_dir and dep.startswith(o.path + os.sep)]
        return holder or inside or [dep]

    return [replace(s, deps=tuple(dict.fromkeys(p for d in s.deps for p in as_inputs(d)))) for s in stages]


def capped(requested: Mapping[str, Any], caps: Mapping[str, Any]) -> dict[str, Any]:
    """Resources with each `max_<name>` of `caps` applied: the request of dvc.yaml, at most what the
    cluster offers (`capped({'gpu': 8}, {'max_gpu': 1}) == {'gpu': 1}`). `max_gpu` also caps `gpus_per_node`
    (a node's GPUs), `max_nodes` the nodes; `max_mem_mb` and `max_threads` are per node too."""
    out = dict(requested)
    for key, value in caps.items():
        name = key.removeprefix("max_")
        for target in (name, "gpus_per_node") if name == "gpu" else (name,):
            if key.startswith("max_") and target in out:
                out[target] = min(out[target], value)
    return out


def job_resources(requested: Mapping[str, Any]) -> dict[str, Any]:
    """Snakemake resources (as the SLURM executor plugin reads them) for a capped request.

    A one-node request is unchanged, `nodes: 1, gpus_per_node: G` asks `gpu: G` (`--gpus=G`). An N-node one
    asks `--nodes=N --ntasks=N` and `--gres=gpu:G` (GRES count per node); `mpi` tells the job-step plugin
    that the rule starts its own tasks (multinode.py runs `srun`, one launcher a node), so it does not wrap
    the rule in a one-task step; `tasks_per_gpu: 0` keeps `tasks` from becoming `--ntasks-per-gpu`.
    >>> job_resources({"nodes": 2, "gpus_per_node": 8, "mem_mb": 9})
    {'nodes': 2, 'gpus_per_node': 8, 'mem_mb': 9, 'mpi': 'srun', 'tasks': 2, 'tasks_per_gpu': 0, 'gres': 'gpu:8'}
    """
    out = dict(requested)
    nodes, per_node = out.get("nodes", 1), out.get("gpus_per_node", 0)
    if nodes > 1:
        out.update(mpi="srun", tasks=nodes, tasks_per_gpu=0)
        if per_node:
            out["gres"] = f"gpu:{per_node}"
    elif per_node:
        out["gpu"] = per_node
    return out


def asks_gpu_or_nodes(requested: Mapping[str, Any]) -> bool:
    """Whether a job must go to the cluster even with `local_cpu_stages`: it asks for a GPU or several nodes."""
    return bool(requested.get("gpu") or requested.get("gpus_per_node") or requested.get("nodes", 1) > 1)


def command(stage: Stage, root: str | os.PathLike[str] = ".") -> str:
    """What the rule runs (SHELL's `params.run`): the stage's command; for a stage that asks for `nodes`,
    that command through multinode.py, which runs it unchanged outside SLURM and, in a SLURM job, once a
    node with one process a GPU."""
    if "nodes" not in stage.resources:
        return stage.cmd
    return f"python {shlex.quote(os.path.relpath(MULTINODE, root))} {shlex.quote(stage.cmd)}"


def commit_ran(root: str | os.PathLike[str] = ".") -> list[str]:
    """Commit to dvc.lock (and the DVC cache) the stages whose rules ran; returns their addresses.

    Only those: a stage Snakemake merely found up to date by its own rules is left to DVC's judgement.
    Links are not re-made, so outputs keep the mtimes Snakemake's own up-to-date check relies on.
    """
    from dvc.repo import Repo

    root = Path(root).resolve()
    ran_dir = root / RAN_DIR
    ran = {p.name: p for p in ran_dir.iterdir()} if ran_dir.is_dir() else {}
    if not ran:
        return []
    committed = []
    with contextlib.chdir(root), Repo(str(root)) as repo:  # stage addresses are relative to the root
        for stage in load_stages(root):
            if stage.name not in ran:
                continue
            try:
                repo.commit(stage.address, force=True, relink=False)
            except Exception as error:  # noqa: BLE001 - one stage's failure must not hide the others
                print(f"dvc commit {stage.address} failed, left for `dvc commit`/`dvc repro`: {error}")
                continue
            ran[stage.name].unlink()
            committed.append(stage.address)
    return committed


if __name__ == "__main__":  # `python workflow/dvc_dag.py`: the stages as Snakemake sees them
    for s in load_stages("."):
        print(s.name, s.threads, dict(s.resources), [o.path for o in s.outs])
