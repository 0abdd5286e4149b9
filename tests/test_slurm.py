"""The pipeline on a real SLURM: every stage runs as a SLURM job through the users' profile
(`snakemake --profile slurm`, CI's cluster layered on with `--profile .ci/slurm/profile`), `dvc status` is
clean afterwards, a job asking for more GPUs than the cluster has fails at submission with SLURM's
message while every existing output stays, and a stage that asks for 2 nodes trains across both
(workflow/multinode.py) to the adapter a 1-process run with the same global batch gets.

Needs running SLURM daemons: CI starts a two-node cluster on its one machine, a fake GPU a node
(.ci/slurm/install.sh, up.sh; down.sh stops it). Without them these tests skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .test_workflow import (
    DVC,
    ROOT,
    SNAKEMAKE,
    TOY_CACHED,
    digests,
    dvc_clean,
    dvc_dag,
    profiles_env,
    run,
    toy_repo,
)

CI_PROFILE = str(ROOT / ".ci/slurm/profile")
# "Job 3 has been submitted with SLURM jobid 17 (log: /.../.snakemake/slurm_logs/rule_train/17.log)."
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: (\S*/rule_(\w+)/\d+\.log)\)")


def slurm_unreachable() -> str | None:
    """Why SLURM can't take jobs here, or None when a node is up."""
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        return "no SLURM client (sbatch, sinfo) on PATH: start one with .ci/slurm/install.sh and up.sh"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld not reachable (.ci/slurm/up.sh starts it)"
    states = proc.stdout.split()
    if proc.returncode != 0 or not {"idle", "mixed", "allocated"} & set(states):
        return f"SLURM daemons not reachable ({proc.stderr.strip() or states}); start them with .ci/slurm/up.sh"
    return None


pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def slurm_up() -> None:
    """Skips this module's tests, with the reason, when no SLURM node answers (asked only when they run)."""
    if reason := slurm_unreachable():
        pytest.skip(reason)


def on_slurm(repo: Path, env: dict[str, str], *args: str, check: bool = True):
    """`snakemake --profile slurm` as users type it, on CI's cluster."""
    return run([*SNAKEMAKE, "--profile", "slurm", "--profile", CI_PROFILE, *args], repo, check=check, **env)


def slurm_jobs(log: str) -> dict[str, tuple[str, Path]]:
    """Rule -> (SLURM job id, job log) for each job the run submitted."""
    return {rule: (job, Path(path)) for job, path, rule in SUBMITTED.findall(log)}


def slurm_job(job: str) -> dict[str, str]:
    """SLURM's record of a job (kept MinJobAge seconds after it ends), as key=value pairs."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


@pytest.fixture(scope="module")
def toy_on_slurm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str, dict]:
    """The toy pipeline run once on SLURM: repo, env, Snakemake's output, SLURM's record of `train`."""
    tmp = tmp_path_factory.mktemp("slurm")
    repo, env = toy_repo(tmp / "toy"), profiles_env(tmp)
    log = on_slurm(repo, env).stdout
    train = slurm_jobs(log).get("train")
    return repo, env, log, slurm_job(train[0]) if train else {}


def test_every_toy_stage_runs_as_a_slurm_job_and_dvc_is_clean(toy_on_slurm) -> None:
    repo, _, log, train = toy_on_slurm
    jobs = slurm_jobs(log)
    assert set(jobs) == {"make", "train", "evaluate_a", "evaluate_b", "report"}, log[-3000:]
    for rule, (_, job_log) in jobs.items():
        assert job_log.is_file(), job_log
        assert f"dvc stage {rule.replace('evaluate_', 'evaluate@')}" in job_log.read_text()
    # The stage itself ran inside that job: it recorded SLURM_JOB_ID.
    ran_in = {p.name: p.read_text() for p in (repo / "jobs").iterdir()}
    assert ran_in == {
        "make-raw": jobs["make"][0],
        "train-weights": jobs["train"][0],
        "eval-a": jobs["evaluate_a"][0],
        "eval-b": jobs["evaluate_b"][0],
        "report-report": jobs["report"][0],
    }
    # dvc.yaml asks 8 GPUs, 256 GB and 32 CPUs for `train`; CI's profile caps them to its one node.
    assert (train["NumCPUs"], train["MinMemoryNode"], train["TresPerJob"]) == ("2", "2000M", "gres:gpu:1")
    assert "dvc commit: make, train, evaluate@a, evaluate@b, report" in log
    dvc_clean(repo)


def test_an_oversized_gpu_request_fails_at_submission_and_keeps_outputs(toy_on_slurm) -> None:
    repo, env, _, _ = toy_on_slurm
    before = digests(repo, [*TOY_CACHED, "cache.jsonl", "metrics.json"])
    # CI's GPU cap lifted to 4: `train` asks for 4 of dvc.yaml's 8 GPUs on a one-GPU cluster.
    oversized = ["--config", "max_gpu=4", "max_mem_mb=2000", "max_threads=2"]
    proc = on_slurm(repo, env, "--forcerun", "train", *oversized, check=False)
    assert proc.returncode != 0
    assert "SLURM sbatch failed" in proc.stdout
    assert "Requested node configuration is not available" in proc.stdout  # SLURM's own words
    assert "--gpus=4" in proc.stdout
    assert "Removing output files" not in proc.stdout
    assert digests(repo, [*TOY_CACHED, "cache.jsonl", "metrics.json"]) == before
    dvc_clean(repo)


# What this run proves is orchestration (every stage of dvc.yaml a SLURM job through the users' profile, DVC clean
# after), not the model's quality, which test_pipeline_e2e asserts on the full run under `dvc repro`: size keys
# only are cut (as configs/rehearsal.yaml cuts them), every stage still runs its real command on real outputs.
# The base's warm-up (450 + 700 steps, ~5 of the DAG's ~6.5 min on 2 cores) to a few steps; then the base never
# stops early, so completions and captions are cut to a few tokens and training to one epoch (else training
# alone generated 144 steps x 16 completions x 48 tokens: ~10 min on the shared 2 cores).
SHORT = {"fetch_data": {"warmup": {"drill_steps": 6, "steps": 6, "warmup_steps": 2}},
         "train_grpo_lora": {"heldout_eval": 4, "grpo": {"max_completion_length": 8, "num_train_epochs": 1}},
         "caption": {"max_new_tokens": 4}, "merge_lora": {"max_new_tokens": 4}, "judge_llm": {"max_pairs": 2}}


def short_params(text: str) -> str:
    """params.yaml with SHORT applied (every key of it already in params.yaml), validated as the stages do."""
    import yaml

    from repic.core.params import deep_merge, validate
    from repic.rehearsal.__main__ import leaves

    params = yaml.safe_load(text)
    assert set(leaves(SHORT)) <= set(leaves(params)), set(leaves(SHORT)) - set(leaves(params))
    params = deep_merge(params, SHORT)
    validate(params)
    return yaml.safe_dump(params, sort_keys=False)


def start_in_background(tmp: Path):
    """`snakemake --profile slurm` on the real dvc.yaml in a scratch copy of the working tree (sizes cut: SHORT),
    started in the background by conftest.py with the first slow test (most of its time is SLURM's queue and
    Snakemake's status checks); None when SLURM is not up. Jobs get one CPU (CI's cap `max_threads=1`, so
    Snakemake sets OMP_NUM_THREADS=1 in them): the suite runs one thread a process (conftest.py)."""
    from .conftest import EmbeddedDag

    if slurm_unreachable():
        return None
    env = profiles_env(tmp)
    ci_caps = ["--config", "max_gpu=1", "max_mem_mb=2000", "max_threads=1"]  # the profile's, threads 2 -> 1

    def shorten(work: Path) -> None:
        (work / "params.yaml").write_text(short_params((work / "params.yaml").read_text()))

    return EmbeddedDag(tmp / "repo", (*SNAKEMAKE, "--profile", "slurm", "--profile", CI_PROFILE, *ci_caps),
                       name="snakemake", prepare=shorten, env=env, interrupt=True)


@pytest.mark.slow
def test_the_embedded_pipeline_runs_on_slurm(background) -> None:
    """The real dvc.yaml, in a scratch copy of the working tree, stage by stage as SLURM jobs (sizes cut: SHORT)."""
    from dvc.repo import Repo

    assert background is not None  # started by conftest.py whenever SLURM is up (else slurm_up skipped this test)
    work = background.wait()
    log = (work / "snakemake.log").read_text()
    pipeline = [s for s in Repo(str(work)).index.stages if getattr(s, "cmd", None)]
    stages = {dvc_dag.rule_name(dvc_dag.stage_address(s, work)) for s in pipeline}
    jobs = slurm_jobs(log)
    assert set(jobs) == stages, log[-4000:]
    assert all(job_log.is_file() for _, job_log in jobs.values())
    dvc_clean(work)
    assert "Running stage" not in run([*DVC, "repro"], work).stdout


# The real train_grpo_lora stage (`python -m stages.train_grpo_lora`, run through runpy) with its rollouts
# fixed: completion k of a prompt's group is a function of the prompt and k. Sampled rollouts differ with
# the number of processes (each draws its own random numbers), so only fixed ones can show that 2 processes
# train like 1 with the same global batch. What stays is the data-parallel part: sharding, rewards and
# advantages gathered across processes, gradients all-reduced (gloo), the optimizer step, and the stage's
# outputs written by one process. Each rank records where it ran.
TRAIN_STEP = '''
import json, os, runpy, sys
from pathlib import Path

import torch.distributed as dist
import trl

from repic.core.params import SCHEMA
from repic.train.rewards import REWARD_REGISTRY
from tests.test_train import text_variety

CHOICES = ["yes", "no, a red toy", "caption", "yes yes no"]  # distinct characters: the reward differs
OUT = Path(sys.argv[sys.argv.index("--out") + 1])


def fixed_rollouts(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
    where = OUT / f"rank{self.accelerator.process_index}.json"
    if not where.exists():
        where.write_text(json.dumps({
            "rank": self.accelerator.process_index, "world_size": self.accelerator.num_processes,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "node": os.environ.get("SLURMD_NODENAME"), "node_id": os.environ.get("SLURM_NODEID"),
            "job": os.environ.get("SLURM_JOB_ID")}))
    seen, completions = {}, []
    for ids in prompt_ids:
        k = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
        text = CHOICES[(sum(ids) + k) % len(CHOICES)]
        completions.append(self._tokenizer(text, add_special_tokens=False)["input_ids"])
    return completions, None


trl.GRPOTrainer._generate_single_turn = fixed_rollouts
REWARD_REGISTRY["text_variety"] = lambda protocol: text_variety
# the test double's reward joins the vocabulary params are validated against (repic.core.layout.REWARDS)
SCHEMA["properties"]["train_grpo_lora"]["properties"]["rewards"]["items"]["enum"].append("text_variety")
OUT.mkdir(parents=True, exist_ok=True)
sys.argv = ["stages.train_grpo_lora", *sys.argv[1:]]
runpy.run_module("stages.train_grpo_lora", run_name="__main__")
'''


def tiny_training_params(per_device: int) -> str:
    """The repository's params.yaml with a 3-step tiny GRPO run on the CPU, `per_device` completions a process.
    Plain SGD: the adapters then differ by lr x the gradients' difference, so comparing them within a tolerance
    compares the all-reduced gradients with one process's (and their scale, which Adam would hide). Adam moves a
    weight by about lr x sign(gradient): float noise between the two reductions flips it where a gradient is ~0."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(device="cpu", dtype="float32")
    params["train_grpo_lora"].update(
        rollout_backend="hf", rewards=["text_variety"], heldout_eval=0,
        lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        grpo={"num_generations": 2, "per_device_train_batch_size": per_device, "max_completion_length": 4,
              "learning_rate": 1e-2, "optim": "sgd", "beta": 0.04, "loss_type": "grpo", "logging_steps": 1,
              "bf16": False, "gradient_checkpointing": False, "max_steps": 3, "save_strategy": "no"})
    return yaml.safe_dump(params)


def test_a_two_node_job_trains_like_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`nodes: 2` in dvc.yaml: one SLURM job on both nodes, srun starts one accelerate launcher a node,
    torch.distributed's static rendezvous joins them (gloo, CPU), the stage trains and its first process
    writes the outputs; the adapter equals a 1-process run's with the same global batch."""
    if len(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()) < 2:
        pytest.skip("CI's cluster has one node: .ci/slurm/up.sh starts two (SLURM_CI_NODES)")
    from repic.core.io import write_json

    from .test_train import _adapter_weights, _tiny_samples

    repo, env = toy_repo(tmp_path / "toy"), profiles_env(tmp_path)
    (repo / "trainstep.py").write_text(TRAIN_STEP)
    write_json(repo / "train.json", _tiny_samples(repo / "world"))
    (repo / "params.yaml").write_text(tiny_training_params(per_device=2))  # 2 processes x 1 prompt x G=2
    (repo / "params_one.yaml").write_text(tiny_training_params(per_device=4))  # 1 process x 2 prompts x G=2
    stage = f"trainstep.py --model {tiny_model_dir} --train train.json --root world"
    (repo / "dvc.yaml").write_text(f"""
stages:
  train:
    cmd: accelerate launch --multi_gpu {stage} --out out/two_nodes
    deps: [trainstep.py, train.json, world]
    outs: [out/two_nodes]
    meta: {{resources: {{nodes: 2, gpus_per_node: 1, mem_mb: 1500, runtime: 10, threads: 1}}}}
""")
    (repo / ".gitignore").write_text("/out/\n/.snakemake/\n")
    env["PYTHONPATH"] = str(ROOT)  # repic, stages and tests.test_train, for the job's processes on both nodes

    log = on_slurm(repo, env).stdout
    job, job_log = slurm_jobs(log)["train"]
    record = slurm_job(job)
    assert (record["NumNodes"], record["NumTasks"]) == ("2", "2"), record
    assert re.search(r"multinode: 2 nodes \(\S+\), 1 process\(es\) a node, main process at 127\.0\.0\.1:\d+",
                     job_log.read_text()), job_log.read_text()[-3000:]
    nodes = subprocess.run(["scontrol", "show", "hostnames", record["NodeList"]], capture_output=True,
                           text=True, check=True).stdout.split()
    ranks = [json.loads((repo / f"out/two_nodes/rank{r}.json").read_text()) for r in (0, 1)]
    assert [(w["rank"], w["world_size"], w["backend"], w["node"], w["node_id"], w["job"]) for w in ranks] == [
        (0, 2, "gloo", nodes[0], "0", job), (1, 2, "gloo", nodes[1], "1", job)]
    dvc_clean(repo)

    # One process, the same global batch (2 prompts x 2 completions a step), on this machine.
    run([sys.executable, *stage.split(), "--out", "out/one_process", "--params", "params_one.yaml"], repo,
        PYTHONPATH=str(ROOT))
    two, one = _adapter_weights(repo / "out/two_nodes/adapter"), _adapter_weights(repo / "out/one_process/adapter")
    assert two.keys() == one.keys()
    trained = [k for k in one if "lora_B" in k]
    assert trained and all(one[k].abs().max() > 0 for k in trained)  # 3 steps moved every B (it starts at 0)
    worst = max(float((two[k] - one[k]).abs().max() / one[k].abs().max()) for k in one)
    assert worst < 1e-4, worst
    rewards = [[r["reward"] for r in map(json.loads, (repo / f"out/{d}/log.jsonl").read_text().splitlines())]
               for d in ("two_nodes", "one_process")]
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6) and len(rewards[0]) == 3
