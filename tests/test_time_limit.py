"""The suite's time budget (tests/conftest.py): a test not marked `slow` or `slurm` that takes longer than
REPIC_TEST_LIMIT_S seconds fails, naming itself and its time; marked ones pass; --durations prints the total."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

TESTS = """
import time
import pytest

@pytest.fixture
def slow_fixture():
    time.sleep(0.8)

def test_fast():
    pass

def test_over(slow_fixture):  # setup counts: 0.8 s + 0.8 s > 1 s
    time.sleep(0.8)

@pytest.mark.slow
def test_marked_slow():
    time.sleep(1.2)

@pytest.mark.slurm
def test_marked_slurm():
    time.sleep(1.2)
"""


def test_an_unmarked_test_over_the_limit_fails(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text((REPO / "tests/conftest.py").read_text())
    (tmp_path / "test_budget.py").write_text(TESTS)
    env = {**os.environ, "REPIC_TEST_LIMIT_S": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=3",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "1 failed, 3 passed" in out, out
    assert "FAILED test_budget.py::test_over" in out, out
    assert "over the 1 s limit for a test not marked `slow`" in out, out
    assert "test_budget.py::test_over took 1." in out, out
    assert "total test time" in out and "slow 1 s, slurm 1 s" in out, out


def test_the_suite_runs_one_thread_a_process() -> None:
    """conftest.py pins OpenMP/MKL to REPIC_TEST_THREADS (1) for this process and every process it spawns (the
    background lanes' stages, the rehearsal, SLURM jobs): two lanes on two cores, no oversubscription."""
    import torch

    threads = int(os.environ.get("REPIC_TEST_THREADS", "1"))
    assert torch.get_num_threads() == threads
    assert (os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"]) == (str(threads), str(threads))
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, timeout=120, check=True)
    assert child.stdout.strip() == str(threads)


def test_slurm_controller_down_reads_the_controller_from_slurm_conf(tmp_path: Path, monkeypatch) -> None:
    """conftest's check for SLURM's client without a controller (then the suite puts an `scontrol` that fails at once
    first on PATH): down when nothing listens on slurm.conf's SlurmctldHost address and SlurmctldPort or the file is
    missing, up when something listens, never where there is no scontrol to shim."""
    import socket

    from .conftest import slurm_controller_down

    client = tmp_path / "bin"
    client.mkdir()
    (client / "scontrol").write_text("#!/bin/sh\nexit 0\n")
    (client / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", str(client))
    server = socket.create_server(("127.0.0.1", 0))
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"ClusterName=ci\nSlurmctldHost=vm-0(127.0.0.1)  # the controller\n"
                    f"SlurmctldPort={server.getsockname()[1]}\n")
    assert not slurm_controller_down(conf)
    server.close()
    assert slurm_controller_down(conf)
    assert slurm_controller_down(tmp_path / "missing.conf")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert not slurm_controller_down(conf)
