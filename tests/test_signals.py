"""Ctrl-C / SIGTERM stop a stage with a non-zero status (so `dvc repro` stops too) and leave no temporary files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from repic.core.cli import run

from .conftest import REPO
from .test_train import _tiny_samples


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt
def test_an_interrupt_python_drops_still_fails_the_stage():
    """Python prints and drops an exception raised inside `__del__` (how a Ctrl-C was once swallowed in a regex
    object's `__del__`: the stage finished and DVC went on with exit 0). The stage must still exit 130."""
    done = []

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here: its exception is dropped
            time.sleep(0.05)

    def main(argv):
        obj = Finalised()
        del obj
        done.append("finished")

    before = signal.getsignal(signal.SIGINT)
    assert run(main, []) == 130 and done == ["finished"]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_killed_training_stage_exits_non_zero_and_leaves_no_tmp(tiny_model_dir, tmp_path, sig, status):
    """A real stage subprocess (train_grpo_lora on the tiny model), signalled once its adapter's temporary
    folder exists (mid-run): exit status 128 + signal, no `.adapter.*.tmp` left, no adapter written."""
    samples = _tiny_samples(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps(samples))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    section = params["train_grpo_lora"]
    section["grpo"].update(num_generations=2, per_device_train_batch_size=2, max_completion_length=4,
                           save_strategy="no", max_steps=10_000)
    section["heldout_eval"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train_grpo_lora", "--params", str(tmp_path / "params.yaml"),
         "--model", str(tiny_model_dir), "--train", str(tmp_path / "train.json"), "--root", str(tmp_path),
         "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob(".adapter.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(2)  # into model loading / training
        proc.send_signal(sig)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, output[-3000:]
    assert f"error: interrupted by {signal.Signals(sig).name}" in output
    assert not list(out.glob(".adapter.*")) and not (out / "adapter").exists()
