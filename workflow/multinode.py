"""Runs a stage's `accelerate launch` command on every node of its SLURM allocation, one process a GPU.

The Snakefile runs the stages whose dvc.yaml `meta.resources` name `nodes` through this script:

    python workflow/multinode.py '<the stage cmd, as dvc.yaml resolves it>'

- Outside a SLURM job (`snakemake --profile local`): the command runs unchanged, as under `dvc repro`.
- In a SLURM job the allocation comes from SLURM's record of the job (`scontrol show job`: Snakemake's
  job-step plugin drops the SLURM_* variables before it runs a rule).
- One node: `accelerate launch` gets `--num_processes` = the node's GPUs and a free main port (accelerate
  picks it: several jobs may share a node). A one-process command (`python -m ...`) runs unchanged.
- N nodes (the rule runs in the batch step, on the first node): picks a free port there, takes the main
  address from the job's first host (`scontrol show hostnames`, then that node's NodeAddr), and starts one
  launcher a node with `srun --ntasks-per-node=1`. Each (`--main ADDR:PORT`) runs `accelerate launch` with
  `--num_machines N --machine_rank $SLURM_NODEID --num_processes N x GPUs --main_process_ip/port` and
  DeepSpeed's `standard` (torchrun) multi-node launcher; torch.distributed's static rendezvous does the
  rest. A job without GPUs runs one process a node (gloo on CPU).

The launch words that set the machine go after the command's own launcher options, so they win (argparse
keeps the last); the command's config file, DeepSpeed settings and script stay as they are.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

# How a stage's cmd may start `accelerate launch`: the console script or the module.
ACCELERATE = (["accelerate", "launch"], ["-m", "accelerate.commands.launch"])


def split_launch(cmd: str) -> tuple[list[str], list[str]] | None:
    """`(launcher, rest)` for a command that starts accelerate's launcher (`rest`: its options, the script and
    the script's arguments); None for any other single command. Shell syntax is refused: the command is
    rebuilt as words, and more than one command cannot run once per node."""
    lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    if "\n" in cmd.strip() or any(set(word) <= set(lexer.punctuation_chars) for word in lexer):
        raise ValueError(f"a multi-node stage must be one command, without shell syntax; got {cmd!r}")
    words = shlex.split(cmd)
    for start, prefix in ((0, ACCELERATE[0]), (1, ACCELERATE[1])):
        if words[start:start + len(prefix)] == prefix:
            return words[:start + len(prefix)], words[start + len(prefix):]
    return None


def machine_flags(nodes: int, rank: int, gpus_per_node: int, main: tuple[str, int] | None) -> list[str]:
    """accelerate launch options for machine `rank` of `nodes`, one process a GPU (one a node without GPUs).

    >>> machine_flags(2, 1, 8, ("10.0.0.1", 29500))  # doctest: +NORMALIZE_WHITESPACE
    ['--num_machines', '2', '--machine_rank', '1', '--num_processes', '16', '--main_process_ip', '10.0.0.1',
     '--main_process_port', '29500', '--same_network', '--rdzv_backend', 'static',
     '--deepspeed_multinode_launcher', 'standard']
    """
    flags = ["--num_machines", str(nodes), "--machine_rank", str(rank),
             "--num_processes", str(nodes * max(gpus_per_node, 1))]
    if nodes == 1:
        return [*flags, "--main_process_port", "0"]  # 0: accelerate takes a free port of this node
    if main is None:
        raise ValueError("a multi-node launch needs the main process's address and port")
    # DeepSpeed's default multi-node launcher is pdsh over ssh; `standard` is torchrun, one per node, as here.
    return [*flags, "--main_process_ip", main[0], "--main_process_port", str(main[1]), "--same_network",
            "--rdzv_backend", "static", "--deepspeed_multinode_launcher", "standard"]


def node_command(cmd: str, nodes: int, rank: int, gpus_per_node: int, main: tuple[str, int] | None,
                 python: str = sys.executable) -> list[str]:
    """The argv one node runs: the stage's accelerate launch with this machine's flags before its script."""
    from accelerate.commands.launch import launch_command_parser

    split = split_launch(cmd)
    if split is None:
        words = shlex.split(cmd)
        if nodes == 1:  # as before nodes existed: a one-process launch (`python`) uses one GPU of the node
            if gpus_per_node > 1:
                print(f"multinode: `{' '.join(words[:3])} ...` is one process; {gpus_per_node - 1} of this "
                      "node's GPUs stay idle (an `accelerate launch` launch uses them all)", file=sys.stderr)
            return words
        raise ValueError(
            f"`{' '.join(words[:3])} ...` starts one process, but the job has {nodes} nodes: set the stage's "
            "launch to `accelerate launch ...` (train_grpo_lora.launch: configs/paper.yaml has one)")
    _, rest = split
    parsed = launch_command_parser().parse_args(rest)
    script_at = len(rest) - len(parsed.training_script_args) - 1  # argparse REMAINDER: the script's own arguments
    assert rest[script_at] == parsed.training_script, (rest, parsed.training_script)
    while script_at and rest[script_at - 1] in ("-m", "--module", "--no_python"):  # flags that belong to it
        script_at -= 1
    options = rest[:script_at]
    if nodes * max(gpus_per_node, 1) == 1:  # accelerate refuses --multi_gpu for one process (a capped request)
        options = [word for word in options if word != "--multi_gpu"]
    flags = machine_flags(nodes, rank, gpus_per_node, main)
    return [python, *ACCELERATE[1], *options, *flags, *rest[script_at:]]


def scontrol(*args: str) -> dict[str, str]:
    """`scontrol -o show ...` as key=value pairs."""
    out = subprocess.run(["scontrol", "-o", "show", *args], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def gpus_of(record: Mapping[str, str]) -> int:
    """GPUs a node of a job record has: `TresPerNode=gres:gpu:8` (sbatch --gres=gpu:8), or for a one-node job
    `TresPerJob=gres:gpu:8` (--gpus=8); a GPU type (`gres:gpu:h100:8`) and SLURM's `/` spelling are read too."""
    for key, per in (("TresPerNode", 1), ("TresPerJob", int(record.get("NumNodes", "1")))):
        for tres in record.get(key, "").split(","):
            parts = tres.replace("/", ":").split(":")
            if parts[:2] == ["gres", "gpu"] and parts[-1].isdigit():
                return int(parts[-1]) // per
    return 0


@dataclass(frozen=True)
class Allocation:
    """What this job has, from SLURM's record (the Snakemake job step drops the SLURM_* variables)."""

    nodes: int
    hosts: list[str]
    gpus_per_node: int
    cpus_per_task: int

    @classmethod
    def of_job(cls, job_id: str) -> Allocation:
        record = scontrol("job", job_id)
        hosts = subprocess.run(["scontrol", "show", "hostnames", record["NodeList"]], capture_output=True,
                               text=True, check=True).stdout.split()
        cpus = record.get("CPUs/Task", "1")
        return cls(int(record["NumNodes"]), hosts, gpus_of(record), int(cpus) if cpus.isdigit() else 1)

    def main_address(self) -> str:
        """The first host, as the other nodes reach it: its NodeAddr (the host name unless slurm.conf says)."""
        return scontrol("node", self.hosts[0]).get("NodeAddr") or self.hosts[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run(argv: Sequence[str]) -> NoReturn:
    print("+", shlex.join(argv), flush=True)
    os.execvp(argv[0], list(argv))


def main(args: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--main", help="ADDR:PORT of machine 0 (set by the batch step for the launcher on each node)")
    ap.add_argument("--nodes", type=int, help="the job's nodes (set by the batch step with --main)")
    ap.add_argument("--gpus-per-node", type=int, default=0, help="the job's GPUs a node (idem)")
    ap.add_argument("cmd", help="the stage's command, one shell string")
    opts = ap.parse_args(args)
    env = os.environ
    if opts.main:  # one node's launcher, started by srun below: SLURM_NODEID is this node's index
        addr, port = opts.main.rsplit(":", 1)
        gpus = int(env.get("SLURM_GPUS_ON_NODE") or opts.gpus_per_node)
        run(node_command(opts.cmd, opts.nodes, int(env["SLURM_NODEID"]), gpus, (addr, int(port))))
    if not env.get("SLURM_JOB_ID"):  # not a SLURM job: exactly what dvc repro runs
        run(["bash", "-c", opts.cmd])
    job = Allocation.of_job(env["SLURM_JOB_ID"])
    if job.nodes == 1:  # inside the one-task step of Snakemake's job-step plugin, which has the node's GPUs
        run(node_command(opts.cmd, 1, 0, int(env.get("SLURM_GPUS_ON_NODE") or job.gpus_per_node), None))
    node_command(opts.cmd, job.nodes, 0, job.gpus_per_node, ("check", 0))  # refuse here what cannot run
    main_at = f"{job.main_address()}:{free_port()}"  # the batch step runs on the first host
    print(f"multinode: {job.nodes} nodes ({','.join(job.hosts)}), {max(job.gpus_per_node, 1)} process(es) a "
          f"node, main process at {main_at}", flush=True)
    step = [f"--nodes={job.nodes}", f"--ntasks={job.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            f"--cpus-per-task={job.cpus_per_task}"]
    if job.gpus_per_node:
        step.append(f"--gres=gpu:{job.gpus_per_node}")
    run(["srun", *step, sys.executable, os.path.abspath(__file__), "--main", main_at, "--nodes", str(job.nodes),
         "--gpus-per-node", str(job.gpus_per_node), opts.cmd])


if __name__ == "__main__":
    try:
        main()
    except (ValueError, subprocess.CalledProcessError) as error:
        sys.exit(f"multinode: {error}")
