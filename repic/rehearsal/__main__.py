"""`make paper-rehearsal`: the paper run (`make paper`) end to end, offline, in a scratch copy of the checkout.

    python -m repic.rehearsal [--work DIR] [--report FILE] [--keep]

What differs from `make paper` on a machine with network and GPUs, and nothing else:
1. network: loopback servers (repic.rehearsal.servers) answer for the hub (``HF_ENDPOINT``), GitHub, GitHub's LFS
   media host, Google Drive and OpenAI's API (``REPIC_URL_MIRRORS``), serving same-class tiny stand-ins under the
   paper config's ids, revisions and file names (repic.rehearsal.standins);
2. sizes and hardware: `configs/rehearsal.yaml`, applied after `configs/paper.yaml` (`make paper PAPER_OVERLAYS=...`),
   whose keys must all be in `ALLOWED` (checked here and by a test);
3. checksums of stand-in content: the manifests of files the rehearsal cannot serve for real (generated images,
   files missing from ../shared/repic_eval) are rewritten in the scratch copy, and the lock file starts empty;
   the report counts the entries rewritten and the real files checked against their pinned blob ids.

Every stage then runs its real code path through `dvc repro`, in the order a researcher takes: `make
paper-released` (the released checkpoints' rows alone, no training), then `make paper` (training, and our row).
The report (JSON) gives the wall time of each stage and the stages each step ran, the requests the servers
answered, what fetch_data recorded, and a second fetch_data run against the new lock.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from repic.core.io import RepicError, write_json
from repic.core.params import deep_merge

REPO = Path(__file__).resolve().parents[2]
OVERLAY = "configs/rehearsal.yaml"
API_KEY = "sk-rehearsal-loopback"

# The rehearsal overlay may change these keys (a key or everything under it) and nothing else: model dims,
# subset and data sizes, steps and token budgets, device/dtype, launcher and its logging backend.
ALLOWED: tuple[str, ...] = (
    "base.device", "base.dtype",
    "fetch_data.tiny_model",                         # dims of the stand-in Qwen2.5-VL
    "fetch_data.world.train_per_method", "fetch_data.world.image_size",   # size of the stand-in training set
    "subset_2k.n_samples",
    "train_grpo_lora.launch", "train_grpo_lora.heldout_eval", "train_grpo_lora.completions_per_step",
    "train_grpo_lora.grpo.num_generations", "train_grpo_lora.grpo.per_device_train_batch_size",
    "train_grpo_lora.grpo.max_completion_length",
    "train_grpo_lora.grpo.num_train_epochs", "train_grpo_lora.grpo.max_steps", "train_grpo_lora.grpo.save_steps",
    "train_grpo_lora.grpo.bf16", "train_grpo_lora.grpo.report_to",
    "caption.batch_size", "caption.max_new_tokens", "caption.max_pixels",
    "merge_lora.n_inputs", "merge_lora.max_new_tokens",
    "judge_llm.max_pairs", "report.max_queries",
)


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys of a nested mapping: {"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def allowed(key: str) -> bool:
    return any(key == a or key.startswith(a + ".") for a in ALLOWED)


def check_overlay(overlay: dict[str, Any], source: str = OVERLAY) -> None:
    """Every key of the rehearsal overlay must be in `ALLOWED`."""
    bad = sorted(k for k in leaves(overlay) if not allowed(k))
    if bad:
        raise RepicError(f"{source}: {bad[0]}: not a size/hardware key the rehearsal may change "
                         f"(allowed: {', '.join(ALLOWED)})")


def scratch_checkout(dest: Path) -> Path:
    """A copy of the working tree's files (tracked + untracked, not ignored; no data/ or results/) as a git repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    if dest.exists():
        shutil.rmtree(dest)
    for rel in filter(None, files):
        if (REPO / rel).is_file() and not rel.startswith(("results/", "data/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def run(work: Path, report_path: Path | None, *, shared: Path) -> dict[str, Any]:
    from repic.rehearsal.servers import ChatServer, FileServer, HubServer, mirrors
    from repic.rehearsal.standins import build

    t0 = time.monotonic()
    checkout = scratch_checkout(work / "repo")
    paper = yaml.safe_load((checkout / "configs/paper.yaml").read_text(encoding="utf-8"))
    overlay = yaml.safe_load((checkout / OVERLAY).read_text(encoding="utf-8"))
    check_overlay(overlay)
    params = deep_merge(deep_merge(yaml.safe_load((checkout / "params.yaml").read_text()), paper), overlay)
    lock = params["fetch_data"].get("lock")
    if lock:  # values recorded from the real hosts cannot match stand-ins: the rehearsal records its own
        (checkout / lock).write_text('{"sources": {}}\n', encoding="utf-8")

    t_build = time.monotonic()
    served = build(checkout, shared, params, work / "standins")
    for rel, text in served.manifests.items():
        (checkout / rel).write_text(text, encoding="utf-8")
    build_s = time.monotonic() - t_build

    hub, files, chat = HubServer(served.hub), FileServer(served.files, served.drive), ChatServer(API_KEY)
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update({"HF_ENDPOINT": hub.url, "REPIC_URL_MIRRORS": mirrors(files, chat), "OPENAI_API_KEY": API_KEY,
                "HF_HOME": str(work / "hf-home"), "NO_PROXY": "127.0.0.1,localhost", "WANDB_MODE": "offline",
                "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "0"})  # as `make paper` (the second fetch runs fetch_data directly)
    # Stand-in models are tiny: a second BLAS thread only spins (20x slower on a shared 2-core machine).
    env.setdefault("OMP_NUM_THREADS", "1")
    venv = Path(sys.executable).parent.parent
    stages: dict[str, float] = {}
    steps: dict[str, list[str]] = {}
    log_lines: list[str] = []
    try:
        t_run = time.monotonic()
        # exactly `make paper-released` then `make paper`, plus the overlay; -o: the venv is in place, never rebuilt
        for target in ("paper-released", "paper"):
            cmd = ["make", "--no-print-directory", target, f"VENV={venv}", f"PAPER_OVERLAYS={OVERLAY}",
                   "-o", f"{venv}/.installed"]
            current, started = None, time.monotonic()
            steps[target] = []
            proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                log_lines.append(line)
                sys.stdout.write(line)
                m = re.match(r"Running stage '([^']+)'", line.strip())
                if m:
                    now = time.monotonic()
                    if current:
                        stages[current] = round(now - started, 1)
                    current, started = m.group(1), now
                    steps[target].append(current)
            rc = proc.wait()
            if current:
                stages[current] = round(time.monotonic() - started, 1)
            (work / "paper.log").write_text("".join(log_lines), encoding="utf-8")
            if rc != 0:
                raise RepicError(f"rehearsal: `make {target}` failed (exit {rc}); log: {work / 'paper.log'}; "
                                 f"last lines: {''.join(log_lines[-5:]).strip()[-600:]}")
        run_s = time.monotonic() - t_run
        # a later fetch must match what the first one recorded (and say nothing about recording)
        t_refetch = time.monotonic()
        refetch = subprocess.run([sys.executable, "-m", "stages.fetch_data", "--out-data", str(work / "refetch"),
                                  "--out-model", str(work / "refetch-model")], cwd=checkout, env=env,
                                 capture_output=True, text=True)
        if refetch.returncode != 0:
            raise RepicError(f"rehearsal: second fetch_data failed: {refetch.stderr.strip()[-600:]}")
        shutil.rmtree(work / "refetch", ignore_errors=True)
        shutil.rmtree(work / "refetch-model", ignore_errors=True)
        refetch_s = time.monotonic() - t_refetch
    finally:
        hub.close()
        files.close()
        chat.close()

    report = {
        "seconds": {"total": round(time.monotonic() - t0, 1), "standins": round(build_s, 1),
                    "make_paper": round(run_s, 1), "second_fetch": round(refetch_s, 1)},
        "stages": stages,
        "steps": steps,  # the stages `make paper-released`, then `make paper`, ran
        "recorded": json.loads((checkout / lock).read_text())["sources"] if lock else {},
        "second_fetch_recorded_nothing": "recorded" not in refetch.stdout,
        "requests": {"hub": len(hub.requests), "files": len(files.requests), "judge": chat.answers,
                     "drive_confirmations": sum("uuid=" in p for _, p in files.requests)},
        **served.report,
        "checkout": str(checkout),
    }
    if report_path is not None:
        write_json(report_path, report)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m repic.rehearsal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=".rehearsal", help="scratch folder (the copy, stand-ins, logs)")
    p.add_argument("--report", default="results/rehearsal.json", help="where the JSON report goes")
    p.add_argument("--shared", default=str(REPO.parent / "shared"),
                   help="folder with repic_eval/ (RePIC's real evaluation files)")
    args = p.parse_args(argv)
    if not (Path(args.shared) / "repic_eval").is_dir():
        print(f"error: {args.shared}/repic_eval not found (RePIC's evaluation files; --shared)", file=sys.stderr)
        return 2
    try:
        report = run(Path(args.work).resolve(), Path(args.report), shared=Path(args.shared))
    except RepicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"seconds": report["seconds"], "stages": report["stages"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
