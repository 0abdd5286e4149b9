"""workflow/: dvc.yaml as Snakemake rules. The same DAG as DVC's (stages, inputs, outputs, params),
resources from dvc.yaml `meta`, profile caps, and the round trip with DVC: a Snakemake run leaves
`dvc status` clean, `dvc repro` results are adopted by `snakemake --touch`, `dvc push`/`pull` restore them.

The round trips run on a toy dvc.yaml (`toy_repo`, also used by test_slurm.py) with `foreach`, `vars`,
a directory out, a `persist` out, metrics and params, in a throwaway git+DVC repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
import dvc_dag  # noqa: E402

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
DVC = [sys.executable, "-m", "dvc"]

# Prints the rules Snakemake builds from workflow/Snakefile as JSON (Snakemake 9's API; the rule objects
# and the local-rule set are its internals, pinned with snakemake==9.27.1).
DUMP_RULES = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.io import is_flagged
from snakemake.settings.types import ConfigSettings, ResourceSettings
out = []
for config in json.loads(sys.argv[1]):  # one process parses the Snakefile under each config: one import of it all
    with SnakemakeApi() as api:
        wf = api.workflow(resource_settings=ResourceSettings(), config_settings=ConfigSettings(config=config),
                          snakefile=Path("workflow/Snakefile"), workdir=Path("."))._workflow
        out.append({r.name: {
            "input": list(r.input),
            "output": [str(o) for o in r.output],
            "directory": [str(o) for o in r.output if is_flagged(o, "directory")],
            "update": [str(o) for o in r.output if is_flagged(o, "update")],
            "params": dict(r.params.items()) if r.params else {},
            "threads": r.resources["_cores"].value,
            "resources": {k: v.value for k, v in r.resources.items() if not k.startswith("_") and k != "tmpdir"},
            "local": r.name in wf._localrules,
        } for r in wf.rules})
print("RULES=" + json.dumps(out, default=str))
"""


def run(cmd: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs a command, stdout and stderr together; on an unexpected exit status shows the output."""
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env={**os.environ, **env},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


def snakemake_rules_each(repo: Path, configs: list[dict]) -> list[dict[str, dict]]:
    """The rules Snakemake builds from `repo`'s Snakefile under each of `configs`, all from one process."""
    out = run([sys.executable, "-c", DUMP_RULES, json.dumps(configs)], repo).stdout
    return json.loads(out.rsplit("RULES=", 1)[1])


def snakemake_rules(repo: Path) -> dict[str, dict]:
    return snakemake_rules_each(repo, [{}])[0]


def dvc_stages(repo: Path) -> list:
    from dvc.repo import Repo

    return [s for s in Repo(str(repo)).index.stages if getattr(s, "cmd", None)]


def rel(repo: Path, path: str) -> str:
    return os.path.relpath(path, repo)


# --------------------------------------------------------------------------- the toy project

TOY_STEP = '''
"""Toy stage: `python step.py KIND OUT INPUT...` writes OUT from its inputs, params and the SLURM job id."""
import json, os, sys
from pathlib import Path
import yaml

kind, out, *inputs = sys.argv[1:]
params = yaml.safe_load(open("params.yaml"))["toy"]
# Like the real stages, reads data files by name, never Snakemake's hidden .snakemake_timestamp.
files = sorted(f for i in map(Path, inputs) for f in ([i] if i.is_file() else i.rglob("*.txt")))
text = f"{kind} n={params['n']} other={params['other']} " + " ".join(f.read_text() for f in files)
Path("jobs").mkdir(exist_ok=True)  # not an out: where each stage says which SLURM job ran it
Path("jobs", kind + "-" + Path(out).stem).write_text(os.environ.get("SLURM_JOB_ID", "none"))
out = Path(out)
if kind == "make":
    out.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        (out / f"part{k}.txt").write_text(f"{text} {k}")
else:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
if kind == "report":
    Path("metrics.json").write_text(json.dumps({"chars": len(text)}))
    with open("cache.jsonl", "a") as cache:  # persist: true, grows across runs like the judge's cache
        cache.write(json.dumps({"chars": len(text)}) + "\\n")
'''

TOY_DVC_YAML = """
vars:
  - splits: [a, b]
stages:
  make:
    cmd: python step.py make data/raw
    deps: [step.py]
    params: [toy.n]
    outs: [data/raw]
    meta: {resources: {gpu: 0, mem_mb: 100, runtime: 5, threads: 1}}
  train:
    cmd: python step.py train model/weights.txt data/raw
    deps: [step.py, data/raw]
    outs: [model/weights.txt]
    meta: {resources: {gpu: 8, mem_mb: 256000, runtime: 1440, threads: 32}}
  evaluate:
    foreach: ${splits}
    do:
      cmd: python step.py eval results/${item}.txt model/weights.txt
      deps: [step.py, model/weights.txt]
      outs:
        - results/${item}.txt
      meta: {resources: {gpu: 1, mem_mb: 200, runtime: 5, threads: 1}}
  report:
    cmd: python step.py report report.md results/a.txt results/b.txt
    deps: [step.py, results/a.txt, results/b.txt]
    params: [toy]
    outs: [report.md, cache.jsonl: {persist: true, cache: false}]
    metrics: [metrics.json: {cache: false}]
    meta: {resources: {gpu: 0, mem_mb: 100, runtime: 5, threads: 1}}
"""
TOY_CACHED = ["data/raw", "model/weights.txt", "results/a.txt", "results/b.txt", "report.md"]


def toy_repo(path: Path) -> Path:
    """A throwaway git+DVC repository with the toy dvc.yaml and this checkout's workflow/."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "step.py").write_text(TOY_STEP)
    (path / "dvc.yaml").write_text(TOY_DVC_YAML)
    (path / "params.yaml").write_text("toy: {n: 1, other: 2}\n")
    (path / ".gitignore").write_text(
        "/data/\n/model/\n/results/\n/jobs/\n/report.md\n/metrics.json\n/cache.jsonl\n/.snakemake/\n"
    )
    shutil.copytree(ROOT / "workflow", path / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    run(["git", "init", "-q"], path)
    run([*DVC, "init", "-q"], path)
    run([*DVC, "config", "core.analytics", "false"], path)
    with open(path / ".dvcignore", "a") as f:
        f.write(".snakemake_timestamp\n")
    return path


def digests(repo: Path, paths: list[str]) -> dict[str, str]:
    """Content digest of each path (a directory: of its files, Snakemake's timestamp left out)."""
    out = {}
    for p in paths:
        target = repo / p
        files = sorted(target.rglob("*")) if target.is_dir() else [target]
        h = hashlib.sha256()
        for f in files:
            if f.is_file() and f.name != dvc_dag.TIMESTAMP:
                h.update(str(f.relative_to(repo)).encode() + f.read_bytes())
        out[p] = h.hexdigest()
    return out


def lock_hashes(repo: Path) -> dict[str, str]:
    """Out path -> md5 recorded in dvc.lock."""
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}


def profiles_env(tmp: Path) -> dict[str, str]:
    """Installs the profiles by name into a private config dir; the env that makes Snakemake find them."""
    env = {"XDG_CONFIG_HOME": str(tmp / "xdg")}
    run(["sh", str(ROOT / "workflow/profiles/install.sh")], ROOT, **env)
    return env


def dvc_clean(repo: Path) -> None:
    out = run([*DVC, "status"], repo).stdout
    assert "Data and pipelines are up to date." in out, out


# --------------------------------------------------------------------------- the real dvc.yaml


def assert_same_dag(repo: Path, exact_inputs: bool = True, rules: dict[str, dict] | None = None) -> None:
    """Snakemake's rules for `repo` (`rules`, else parsed here) have DVC's stages, commands, outputs, params and
    edges, and (unless a dep only overlaps an out, which DVC links and Snakemake must name exactly) DVC's deps as
    inputs."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    rules = rules or snakemake_rules(repo)
    names = {dvc_dag.rule_name(dvc_dag.stage_address(s, repo)): s for s in dvc_stages(repo)}
    assert set(rules) - {"all"} == set(names)
    every_out = [rel(repo, o.fs_path) for s in names.values() for o in s.outs]

    def as_inputs(dep: str) -> list[str]:
        # a dep folder holding other stages' outs (score's results/captions/single, which holds one caption
        # folder per model row) is, to Snakemake, those outs
        return [o for o in every_out if o.startswith(dep + "/")] or [dep]

    for name, stage in names.items():
        rule = rules[name]
        assert rule["params"]["cmd"] == stage.cmd
        if exact_inputs:
            files = [p for d in stage.deps if not isinstance(d, ParamsDependency)
                     for p in as_inputs(rel(repo, d.fs_path))]
            # once each: the base model row's weights are the base model, which every caption stage lists too
            assert rule["input"] == list(dict.fromkeys(files)), name
        assert rule["output"] == [rel(repo, o.fs_path) for o in stage.outs], name
        tracked = {
            f"{rel(repo, d.fs_path)}:{key}" for d in stage.deps if isinstance(d, ParamsDependency) for key in d.params
        }
        assert set(rule["params"]["dvc_params"]) == tracked, name
        assert rule["update"] == [rel(repo, o.fs_path) for o in stage.outs if o.persist], name
    assert sorted(rules["all"]["input"]) == sorted(o for r in names for o in rules[r]["output"])

    # Snakemake links a job to the one whose output path equals one of its inputs.
    snakemake_edges = {
        (consumer, producer)
        for consumer in names
        for producer in names
        if set(rules[consumer]["input"]) & set(rules[producer]["output"])
    }
    graph = Repo(str(repo)).index.graph
    rule = {s: dvc_dag.rule_name(dvc_dag.stage_address(s, repo)) for s in graph.nodes}
    assert snakemake_edges == {(rule[a], rule[b]) for a, b in graph.edges}


CAPS = {"max_gpu": 1, "max_mem_mb": 3000, "max_threads": 2, "max_runtime": 20, "local_cpu_stages": True}


@pytest.fixture(scope="module")
def root_rules() -> tuple[dict[str, dict], dict[str, dict]]:
    """The real Snakefile's rules, as built and under `CAPS` (a profile's caps): one Snakemake process."""
    return tuple(snakemake_rules_each(ROOT, [{}, CAPS]))


def test_rules_are_the_dvc_stages(root_rules) -> None:
    """The real dvc.yaml: same stages, commands, inputs, outputs, params and edges as DVC's own DAG."""
    assert_same_dag(ROOT, rules=root_rules[0])


def test_deps_that_overlap_outs_link_the_same_stages(tmp_path: Path) -> None:
    """DVC links a dep inside an out directory, or a directory holding outs; so do the rules."""
    repo = toy_repo(tmp_path / "toy")
    (repo / "dvc.yaml").write_text(
        textwrap.dedent("""
        stages:
          make: {cmd: python step.py make data/raw, outs: [data/raw]}
          peek: {cmd: cp data/raw/part0.txt peek.txt, deps: [data/raw/part0.txt], outs: [peek.txt]}
          split:
            foreach: [a, b]
            do:
              cmd: cp peek.txt results/${item}.txt
              deps: [peek.txt]
              outs:
                - results/${item}.txt
          collect: {cmd: cat results/a.txt results/b.txt > all.txt, deps: [results], outs: [all.txt]}
        """)
    )
    assert_same_dag(repo, exact_inputs=False)
    rules = snakemake_rules(repo)
    assert rules["peek"]["input"] == ["data/raw"]
    assert rules["collect"]["input"] == ["results/a.txt", "results/b.txt"]


def test_resources_come_from_dvc_meta_and_profiles_cap_them(root_rules) -> None:
    stages = {dvc_dag.rule_name(dvc_dag.stage_address(s, ROOT)): s.meta["resources"] for s in dvc_stages(ROOT)}
    # training asks for nodes x GPUs a node (one node of 8 by default): on one node that is `gpu`
    assert stages["train_grpo_lora"]["nodes"] == 1 and "gpu" not in stages["train_grpo_lora"]
    gpus = {name: meta.get("gpu", meta.get("gpus_per_node")) for name, meta in stages.items()}
    rules, capped = root_rules
    for name, meta in stages.items():
        assert rules[name]["threads"] == meta["threads"]
        assert {k: rules[name]["resources"][k] for k in ("gpu", "mem_mb", "runtime")} == {
            "gpu": gpus[name], **{k: meta[k] for k in ("mem_mb", "runtime")}
        }
        assert not rules[name]["local"]
        # the training job runs through multinode.py (unchanged outside SLURM); the others as DVC runs them
        multinode = f"python workflow/multinode.py {shlex.quote(rules[name]['params']['cmd'])}"
        assert rules[name]["params"]["run"] == (multinode if "nodes" in meta else rules[name]["params"]["cmd"])

    for name, meta in stages.items():
        assert capped[name]["threads"] == min(meta["threads"], 2)
        assert capped[name]["resources"]["gpu"] == min(gpus[name], 1)
        assert capped[name]["resources"]["mem_mb"] == min(meta["mem_mb"], 3000)
        assert capped[name]["resources"]["runtime"] == min(meta["runtime"], 20)
        assert capped[name]["local"] == (gpus[name] == 0)


def test_a_multi_node_request_becomes_one_task_a_node_with_gpus_per_node() -> None:
    """`nodes: 2` in dvc.yaml (the one change for two nodes): sbatch --nodes=2 --ntasks=2 --gres=gpu:8, and the
    rule starts its own tasks (`mpi`: the job-step plugin does not wrap it in a one-task srun)."""
    meta = {"nodes": 2, "gpus_per_node": 8, "mem_mb": 256000, "threads": 32}
    assert dvc_dag.job_resources(dvc_dag.capped(meta, {})) == {
        **meta, "mpi": "srun", "tasks": 2, "tasks_per_gpu": 0, "gres": "gpu:8"}
    assert dvc_dag.job_resources(dvc_dag.capped(meta, {"max_gpu": 4, "max_nodes": 1})) == {
        **meta, "nodes": 1, "gpus_per_node": 4, "gpu": 4}
    assert dvc_dag.asks_gpu_or_nodes({"nodes": 2}) and not dvc_dag.asks_gpu_or_nodes({"nodes": 1, "gpu": 0})
    with pytest.raises(ValueError, match="`gpu` .one node. or as `nodes` x `gpus_per_node`, not both"):
        dvc_dag._resources({"resources": {"gpu": 1, "nodes": 2, "gpus_per_node": 1}}, "train")
    with pytest.raises(ValueError, match="meta.resources.nodes must be at least 1"):
        dvc_dag._resources({"resources": {"nodes": 0}}, "train")


def test_multinode_launch_flags_come_from_the_allocation() -> None:
    """What each node runs (workflow/multinode.py): the stage's accelerate launch with its machine's flags
    placed just before the script, so they override the command's own `--num_processes`."""
    import multinode

    paper = "accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 8 -m stages.train --x 'a b'"
    argv = multinode.node_command(paper, 2, 1, 8, ("10.1.2.3", 29555), python="py")
    assert argv == ["py", "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/zero2.yaml",
                    "--num_processes", "8", "--num_machines", "2", "--machine_rank", "1", "--num_processes", "16",
                    "--main_process_ip", "10.1.2.3", "--main_process_port", "29555", "--same_network",
                    "--rdzv_backend", "static", "--deepspeed_multinode_launcher", "standard",
                    "-m", "stages.train", "--x", "a b"]
    from accelerate.commands.launch import launch_command_parser

    parsed = launch_command_parser().parse_args(argv[3:])  # accelerate itself reads the last value of each
    assert (parsed.num_processes, parsed.num_machines, parsed.machine_rank, parsed.module) == (16, 2, 1, True)
    assert (parsed.training_script, parsed.training_script_args) == ("stages.train", ["--x", "a b"])
    # one node: the node's GPUs, a free port that accelerate picks
    assert multinode.node_command(paper, 1, 0, 2, None, python="py")[7:15] == [
        "--num_machines", "1", "--machine_rank", "0", "--num_processes", "2", "--main_process_port", "0"]
    # one GPU (a capped request): one process, which accelerate refuses to start with --multi_gpu
    assert multinode.node_command("accelerate launch --multi_gpu s.py", 1, 0, 1, None, python="py") == [
        "py", "-m", "accelerate.commands.launch", "--num_machines", "1", "--machine_rank", "0",
        "--num_processes", "1", "--main_process_port", "0", "s.py"]
    # a job without GPUs: one process a node
    assert multinode.node_command("accelerate launch s.py", 3, 2, 0, ("h", 1), python="py")[3:9] == [
        "--num_machines", "3", "--machine_rank", "2", "--num_processes", "3"]
    # GPUs a node, from SLURM's record of the job (--gres=gpu:8 a node; --gpus=8 for a one-node job)
    assert multinode.gpus_of({"NumNodes": "2", "TresPerNode": "gres:gpu:8"}) == 8
    assert multinode.gpus_of({"NumNodes": "1", "TresPerJob": "gres/gpu:h100:4"}) == 4
    assert multinode.gpus_of({"NumNodes": "2", "TRES": "cpu=4,node=2"}) == 0
    # a one-process launch: unchanged on one node, refused on several; shell syntax refused
    assert multinode.node_command("python -m stages.x --a", 1, 0, 8, None) == ["python", "-m", "stages.x", "--a"]
    with pytest.raises(ValueError, match="starts one process, but the job has 2 nodes"):
        multinode.node_command("python -m stages.x", 2, 0, 8, ("h", 1))
    with pytest.raises(ValueError, match="one command, without shell syntax"):
        multinode.split_launch("accelerate launch s.py && echo done")


def test_multinode_outside_slurm_runs_the_command_as_dvc_does(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, str(ROOT / "workflow/multinode.py"), "echo \"$((6 * 7))\" > out.txt"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.txt").read_text() == "42\n"


def test_a_config_typo_fails_when_the_workflow_loads() -> None:
    proc = run([*SNAKEMAKE, "-n", "--config", "max_gpus=1"], ROOT, check=False)
    assert proc.returncode != 0
    assert "max_gpus" in proc.stdout and "ValidationError" in proc.stdout


def test_a_params_typo_fails_when_the_workflow_loads(tmp_path: Path) -> None:
    """params.yaml is validated while Snakemake builds the DAG, GRPOConfig field names included."""
    import yaml

    for part in ("workflow", "repic"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train_grpo_lora"]["grpo"]["num_generation"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run([*SNAKEMAKE, "-n", "--snakefile", "workflow/Snakefile"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "train_grpo_lora.grpo.num_generation: unknown key (not a field of GRPOConfig)" in proc.stdout


def test_meta_resources_must_be_counts() -> None:
    with pytest.raises(ValueError, match="meta.resources.gpu"):
        dvc_dag._resources({"resources": {"gpu": "two"}}, "train")
    # threads leave the resources; other keys (a GPU model, a partition) pass through to Snakemake.
    assert dvc_dag._resources({"resources": {"threads": 4, "gpu_model": "a"}}, "x") == (4, {"gpu_model": "a"})
    caps = {"max_gpu": 1, "max_runtime": 5}  # a cap on a resource the stage does not ask for adds nothing
    assert dvc_dag.capped({"gpu": 8, "mem_mb": 10}, caps) == {"gpu": 1, "mem_mb": 10}
    assert dvc_dag.rule_name("sub/dvc.yaml:evaluate@a-1") == "sub_evaluate_a_1"


def test_profiles_keep_cluster_details_commented_and_resolve_by_name(tmp_path: Path) -> None:
    import yaml

    slurm_text = (ROOT / "workflow/profiles/slurm/config.yaml").read_text()
    slurm = yaml.safe_load(slurm_text)
    assert slurm["executor"] == "slurm" and slurm["keep-incomplete"] is True
    # Placeholders are documented, never active: a profile that works as is on a default partition.
    assert "slurm_partition" in slurm_text and "slurm_account" in slurm_text
    assert not {"slurm_partition", "slurm_account"} & set(slurm["default-resources"])
    local = yaml.safe_load((ROOT / "workflow/profiles/local/config.yaml").read_text())
    assert local["keep-incomplete"] is True and "executor" not in local

    env = profiles_env(tmp_path)
    for name in ("slurm", "local"):
        link = tmp_path / "xdg" / "snakemake" / name
        assert link.resolve() == ROOT / "workflow/profiles" / name
    proc = run([*SNAKEMAKE, "--profile", "local", "--dry-run", "--quiet"], toy_repo(tmp_path / "toy"), **env)
    assert "Using profile local" in proc.stdout
    # A second install is a no-op, and a user's own profile of that name is kept.
    (tmp_path / "xdg/snakemake/slurm").unlink()
    (tmp_path / "xdg/snakemake/slurm").mkdir()
    again = run(["sh", str(ROOT / "workflow/profiles/install.sh")], ROOT, **env)
    assert "kept it" in again.stdout and (tmp_path / "xdg/snakemake/slurm").is_dir()


def test_snakemake_lint_finds_nothing_but_the_venv() -> None:
    """Only the software-environment lint stays: jobs run in the pinned .venv (shared file system)."""
    # Snakemake 9.27.1 prints text even for `--lint json`: each lint is a line "    * <title>:".
    proc = run([*SNAKEMAKE, "--lint"], ROOT, check=False)
    found = {line.strip()[2:-1] for line in proc.stdout.splitlines() if line.startswith("    * ")}
    assert found <= {"Specify a conda environment or container for each rule."}, proc.stdout


# --------------------------------------------------------------------------- round trips with DVC


@pytest.mark.slow
def test_snakemake_run_leaves_dvc_clean_and_matches_dvc_repro(tmp_path: Path) -> None:
    repo = toy_repo(tmp_path / "toy")
    env = profiles_env(tmp_path)
    out = run([*SNAKEMAKE, "--profile", "local"], repo, **env).stdout
    assert "dvc commit: make, train, evaluate@a, evaluate@b, report" in out
    dvc_clean(repo)
    repro = run([*DVC, "repro"], repo).stdout
    assert "Running stage" not in repro, repro

    # DVC builds the same bytes: Snakemake's timestamp files stay out of directory hashes.
    by_snakemake = lock_hashes(repo)
    run([*DVC, "repro", "--force"], repo)
    by_dvc = lock_hashes(repo)
    del by_snakemake["cache.jsonl"], by_dvc["cache.jsonl"]  # persist: it grows by design
    assert by_snakemake == by_dvc

    # After `dvc repro`, Snakemake adopts DVC's results.
    run([*SNAKEMAKE, "--profile", "local", "--touch"], repo, **env)
    assert "Nothing to be done" in run([*SNAKEMAKE, "--profile", "local", "-n"], repo, **env).stdout


@pytest.mark.slow
def test_a_param_edit_reruns_the_same_stages_under_both(tmp_path: Path) -> None:
    repo = toy_repo(tmp_path / "toy")
    env = profiles_env(tmp_path)
    run([*SNAKEMAKE, "--profile", "local"], repo, **env)
    cache_lines = len((repo / "cache.jsonl").read_text().splitlines())
    (repo / "params.yaml").write_text("toy: {n: 1, other: 3}\n")  # only `report` tracks toy.other
    status = run([*DVC, "status"], repo).stdout
    assert status.startswith("report:") and "make:" not in status and "train:" not in status
    plan = run([*SNAKEMAKE, "--profile", "local", "-n"], repo, **env).stdout
    assert "Job stats" in plan
    planned = plan.split("Job stats:", 1)[1].split("total", 1)[0]
    assert "report" in planned and "make" not in planned and "train" not in planned
    assert "dvc commit: report" in run([*SNAKEMAKE, "--profile", "local"], repo, **env).stdout
    dvc_clean(repo)
    # persist: true -> update(): Snakemake appended to the cache instead of deleting it first.
    assert len((repo / "cache.jsonl").read_text().splitlines()) == cache_lines + 1


@pytest.mark.slow
def test_dvc_push_and_pull_through_a_remote(tmp_path: Path) -> None:
    """Artifacts made by Snakemake go to a DVC remote and come back: a local directory here; S3 or SSH
    the same way with dvc-s3 / dvc-ssh (`dvc remote add -d store s3://bucket/path`)."""
    repo = toy_repo(tmp_path / "toy")
    env = profiles_env(tmp_path)
    run([*SNAKEMAKE, "--profile", "local"], repo, **env)
    before = digests(repo, TOY_CACHED)
    run([*DVC, "remote", "add", "-d", "store", str(tmp_path / "remote")], repo)
    assert "pushed" in run([*DVC, "push"], repo).stdout

    # `cache: false` outs (metrics.json, cache.jsonl) belong in git, not in the remote.
    for p in TOY_CACHED:
        (shutil.rmtree if (repo / p).is_dir() else os.remove)(repo / p)
    shutil.rmtree(repo / ".dvc" / "cache")
    run([*DVC, "pull"], repo)
    assert digests(repo, TOY_CACHED) == before
    dvc_clean(repo)
    # Pulled files carry fresh mtimes in any order: --touch tells Snakemake they are current.
    run([*SNAKEMAKE, "--profile", "local", "--touch"], repo, **env)
    assert "Nothing to be done" in run([*SNAKEMAKE, "--profile", "local", "-n"], repo, **env).stdout


def test_toy_snakefile_reads_foreach_vars_dirs_and_persist(tmp_path: Path) -> None:
    rules = snakemake_rules(toy_repo(tmp_path / "toy"))
    assert set(rules) == {"all", "make", "train", "evaluate_a", "evaluate_b", "report"}
    assert rules["make"]["directory"] == ["data/raw"]
    assert rules["report"]["update"] == ["cache.jsonl"]
    assert rules["report"]["output"] == ["report.md", "cache.jsonl", "metrics.json"]
    assert rules["evaluate_b"]["input"] == ["step.py", "model/weights.txt"]
    assert rules["report"]["params"]["dvc_params"] == {"params.yaml:toy": {"n": 1, "other": 2}}
    assert rules["train"]["params"]["cmd"] == "python step.py train model/weights.txt data/raw"
