"""The pipeline on a real SLURM: every stage runs as a SLURM job through the users' profile
(`snakemake --profile slurm`, CI's cluster layered on with `--profile .ci/slurm/profile`), `dvc status` is
clean afterwards, and a job asking for more GPUs than the cluster has fails at submission with SLURM's
message while every existing output stays.

Needs running SLURM daemons: CI starts a one-node cluster with a fake GPU (.ci/slurm/install.sh, up.sh;
down.sh stops it). Without them these tests skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
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


@pytest.mark.slow
def test_the_embedded_pipeline_runs_on_slurm(tmp_path: Path) -> None:
    """The real dvc.yaml, in a scratch copy of the working tree, stage by stage as SLURM jobs."""
    from dvc.repo import Repo

    work = tmp_path / "repo"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        # pipeline outputs of this checkout (metrics, the judge's cache) stay behind: the copy starts clean
        if (ROOT / rel).is_file() and not rel.startswith(("results/", "data/")):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, work / rel)
    run(["git", "init", "-q"], work)
    env = profiles_env(tmp_path)

    log = on_slurm(work, env).stdout
    (tmp_path / "snakemake.log").write_text(log)
    pipeline = [s for s in Repo(str(work)).index.stages if getattr(s, "cmd", None)]
    stages = {dvc_dag.rule_name(dvc_dag.stage_address(s, work)) for s in pipeline}
    jobs = slurm_jobs(log)
    assert set(jobs) == stages, log[-4000:]
    assert all(job_log.is_file() for _, job_log in jobs.values())
    dvc_clean(work)
    assert "Running stage" not in run([*DVC, "repro"], work).stdout
