"""Shared fixtures. Fast by default; slow end-to-end tests are marked `slow` and run in `make test` too."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# --------------------------------------------------------------------------- one thread a process
# `make test` runs its long runs in the background beside the foreground's tests (below) on the 2-core machine.
# Torch's default (a thread a core) oversubscribes the cores: OpenMP's spin-waiting then made small ops ~50x slower
# (the e2e run's training steps took 15-30 s instead of 0.2-0.5 s, make test 2026-12-06). So every process of the
# suite, this one and all it spawns (the background runs' stages, SLURM jobs, which inherit the environment), runs
# one intra-op thread. REPIC_TEST_THREADS overrides it (a bigger machine).
THREADS = os.environ.get("REPIC_TEST_THREADS", "1")
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = THREADS
if "torch" in sys.modules:  # imported before this file (a plugin): the env var came too late for it
    sys.modules["torch"].set_num_threads(int(THREADS))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# --------------------------------------------------------------------------- SLURM's client with its daemons down
# Snakemake loads every installed executor plugin when it starts, and the SLURM plugin's (snakemake-executor-plugin-
# slurm) runs `scontrol show config` while it is imported (for its help text). Where SLURM's client is installed but
# its controller is down (as `.ci/run` leaves this machine), scontrol retries ~9 s before failing: every local
# Snakemake start of the suite waited that long (the fast part 260 s instead of 170 s, 2026-12-06). Then, and only
# then, an `scontrol` that fails at once comes first on PATH for this process and all it spawns; the plugin reads the
# failure as "no MinJobAge" and goes on. The SLURM tests skip in that case anyway (test_slurm.slurm_up).


def slurm_controller_down(conf: Path | None = None, timeout: float = 1.0) -> bool:
    """Whether `scontrol` is on PATH but no SLURM controller answers on the port slurm.conf names (SLURM_CONF, else
    /etc/slurm/slurm.conf; a missing file counts as down: scontrol then retries for a minute)."""
    import socket

    if not shutil.which("scontrol"):
        return False
    conf = conf or Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    try:
        text = conf.read_text()
    except OSError:
        return True
    host = re.search(r"^\s*(?:SlurmctldHost|ControlMachine)\s*=\s*([^\s(#]+)(?:\(([^)\s]+)\))?", text, re.M | re.I)
    port = re.search(r"^\s*SlurmctldPort\s*=\s*(\d+)", text, re.M | re.I)
    address = (host[2] or host[1]) if host else "localhost"
    try:
        socket.create_connection((address, int(port[1]) if port else 6817), timeout=timeout).close()
    except OSError:
        return True
    return False


_SHIM: Path | None = None
if slurm_controller_down():
    import tempfile

    _SHIM = Path(tempfile.mkdtemp(prefix="repic-no-slurm-"))
    (_SHIM / "scontrol").write_text("#!/bin/sh\necho 'scontrol: no SLURM controller answers here "
                                    "(tests/conftest.py)' >&2\nexit 1\n")
    (_SHIM / "scontrol").chmod(0o755)
    os.environ["PATH"] = f"{_SHIM}{os.pathsep}{os.environ['PATH']}"

# --------------------------------------------------------------------------- the time budget
# A test not marked `slow` (or `slurm`) that takes longer than this (setup, with the fixtures it is first to
# need, plus call) fails: the fast part (`pytest -m "not slow and not slurm"`) stays fast, and a slow test says
# so by its marker. REPIC_TEST_LIMIT_S overrides it (a loaded machine; 0 turns the check off).
LIMIT_S = float(os.environ.get("REPIC_TEST_LIMIT_S", "30"))
_PHASE = pytest.StashKey[dict]()
_SESSION: dict[str, float] = {}


def _exempt(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(m) for m in ("slow", "slurm"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    phases = item.stash.setdefault(_PHASE, {})
    phases[call.when] = report.duration
    if call.when != "call" or not LIMIT_S or _exempt(item) or not report.passed:
        return
    took = phases.get("setup", 0.0) + report.duration
    if took > LIMIT_S:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} took {took:.1f} s (setup {phases.get('setup', 0.0):.1f} s + call "
                           f"{report.duration:.1f} s), over the {LIMIT_S:g} s limit for a test not marked `slow`: "
                           "make it faster or mark it slow (REPIC_TEST_LIMIT_S overrides the limit)")


def pytest_sessionstart(session: pytest.Session) -> None:
    _SESSION["start"] = time.monotonic()


# --------------------------------------------------------------------------- the background runs
# The long runs go in the background so that both cores stay busy: the embedded DAG under `dvc repro`
# (test_pipeline_e2e's fixture, minutes of one-core work) from the session's start (once the tests are collected,
# if an e2e test is selected), beside the fast part; with the first slow test, the SLURM run of the embedded DAG
# (test_slurm.py: mostly waiting for SLURM's queue and Snakemake's status checks) and the paper rehearsal
# (test_rehearsal.py), each started by its test module's `start_in_background(tmp)` at a lower priority (NICE,
# below). The foreground runs the other tests meanwhile, the slow ones that mostly wait (WAITING: SLURM's queue)
# first, while the background runs have work for both cores; the tests reading a background run come last and wait
# for it (the SLURM run's and the rehearsal's, then test_pipeline_e2e's), or come next, at the next module boundary,
# once their run has finished (`pytest_runtest_protocol`): the e2e lane ends minutes before the rehearsal, and its
# tests then run beside the rehearsal instead of after it. One thread a process (above) keeps the shared cores from
# spinning.
E2E = "tests/test_pipeline_e2e.py"
BACKGROUND = ("tests/test_slurm.py::test_the_embedded_pipeline_runs_on_slurm",
              "tests/test_rehearsal.py::test_paper_rehearsal_runs_every_stage")
WAITING = "tests/test_slurm.py"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    def group(item: pytest.Item) -> int:
        if item.nodeid.startswith(E2E):
            return 4
        if item.nodeid in BACKGROUND:
            return 3
        return (1 if item.nodeid.startswith(WAITING) else 2) if _exempt(item) else 0
    items.sort(key=group)  # stable: each group keeps pytest's order


def _ready(item: pytest.Item) -> bool:
    """Whether `item` reads a background run that has finished (its test no longer waits)."""
    if item.nodeid.startswith(E2E):
        run = _SESSION.get("dag")
    elif item.nodeid in BACKGROUND and "runs" in _SESSION:
        run = _SESSION["runs"].get(item.nodeid)
    else:
        return False
    return run is None or run.finished()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """After `item` (torn down for `nextitem`): where the next test is in another module, the tests whose background
    run has finished move up to run next. Only there: pytest has torn down `item`'s module, and nothing of
    `nextitem`'s is set up yet, so any module may come next (pytest's loop reads session.items as it goes)."""
    yield
    if nextitem is None or item.path == nextitem.path:
        return
    items = item.session.items
    at = next(i for i, it in enumerate(items) if it is item) + 1
    ready: list[pytest.Item] = []
    rest: list[pytest.Item] = []
    for it in items[at:]:  # one pass: a run may finish while it goes
        (ready if _ready(it) else rest).append(it)
    if ready and ready[0] is not items[at]:
        items[at:] = ready + rest


class BackgroundRun:
    """`command` in `cwd`, started now in its own process group (and session), stdout and stderr to `log`, its
    priority lowered by `nice` (default NICE: off the critical path; the e2e lane passes 0). wait() reaps it
    and writes its wall seconds and CPU seconds (the process tree's, from wait4) beside the log: <stem>.seconds,
    <stem>.cpu_seconds. `interrupt`: stop() sends SIGINT first (a Snakemake run cancels its SLURM jobs on it)."""

    def __init__(self, command: tuple[str, ...], cwd: Path, log: Path, env: dict[str, str] | None = None,
                 interrupt: bool = False, nice: int | None = None):
        self.command, self.log_path, self.interrupt = command, log, interrupt
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
               **(env or {})}
        self.log = open(log, "w")  # noqa: SIM115 - closed in wait() or stop()
        self.start = time.monotonic()
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its own process group: stopped whole if unused
        step_back(self.proc.pid, NICE if nice is None else nice)  # its session (autogroup) whole
        self.returncode: int | None = None

    def stop(self) -> None:
        """The session ended before a test waited for the run (-x, a deselection): stop it and its stages."""
        if self.returncode is None:
            if self.interrupt:
                os.killpg(self.proc.pid, signal.SIGINT)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.returncode = self.proc.returncode
            self.log.close()

    def wait(self, timeout: float = 1800) -> int:
        """Its exit status, once it ends; fails the test if it runs over `timeout` seconds from its start."""
        if self.returncode is None:
            while (done := os.wait4(self.proc.pid, os.WNOHANG))[0] == 0:
                if time.monotonic() > self.start + timeout:
                    self.stop()
                    pytest.fail(f"{' '.join(self.command)} ran over {timeout:.0f} s")
                time.sleep(0.5)
            _, status, usage = done
            self.proc.returncode = self.returncode = os.waitstatus_to_exitcode(status)
            self.log.close()
            stem = self.log_path.with_suffix("")
            stem.with_suffix(".seconds").write_text(f"{time.monotonic() - self.start:.1f}")
            stem.with_suffix(".cpu_seconds").write_text(f"{usage.ru_utime + usage.ru_stime:.1f}")
        return self.returncode

    def finished(self) -> bool:
        """Whether the run has ended, without reaping it (wait() reaps it, with its CPU time)."""
        if self.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
        except (OSError, AttributeError):  # no waitid here (or a sandbox refusing WNOWAIT): its tests stay last
            return False

    def tail(self, n: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


class EmbeddedDag(BackgroundRun):
    """`command` (`dvc repro` of the embedded DAG by default) in a scratch git checkout of the working tree (its
    tracked and untracked, not ignored files; this checkout's pipeline outputs stay behind; `prepare(work)` edits it
    before `git init`), as a user runs it; its log <name>.log and times land beside it."""

    def __init__(self, work: Path, command: tuple[str, ...] = ("dvc", "repro"), name: str = "repro",
                 prepare: Callable[[Path], None] | None = None, env: dict[str, str] | None = None,
                 interrupt: bool = False, nice: int | None = None):
        self.work = work
        files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split("\0")
        for rel in filter(None, files):
            if (REPO / rel).is_file() and not rel.startswith(("results/", "data/")):
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, work / rel)
        if prepare:
            prepare(work)
        subprocess.run(["git", "init", "-q"], cwd=work, check=True)
        super().__init__(command, work, work / f"{name}.log", env, interrupt, nice)

    def wait(self, timeout: float = 1800) -> Path:  # type: ignore[override]
        if super().wait(timeout) != 0:
            pytest.fail(f"{' '.join(self.command)} failed ({self.returncode}):\n{self.tail()}")
        return self.work


def _embedded_dag(config: pytest.Config) -> EmbeddedDag:
    if "dag" not in _SESSION:
        _SESSION["dag"] = EmbeddedDag(config._tmp_path_factory.mktemp("e2e") / "repo", nice=0)  # the critical path
    return _SESSION["dag"]


# Priorities. The e2e lane is the session's longest chain (the warm-up): it keeps a core of its own, and everything
# else steps back from it by NICE (REPIC_TEST_NICE; 0: off): this process (the foreground) once the lane has started,
# and the other background runs; they share the other core, then both once the lane ends. Linux shares the CPU
# between sessions' autogroups (/proc/sys/kernel/sched_autogroup_enabled) before it looks at a process's own nice
# value, and each background run is a session of its own, so `step_back` sets both: the autogroup's nice
# (/proc/<pid>/autogroup, where the kernel has them) and the process's. Without it the lane shared both cores evenly
# with 3-4 other sessions: its warm-up took 10-14 min in make test against 6 alone (2026-12-06). SLURM's jobs run
# under slurmd, at its priority.
NICE = int(os.environ.get("REPIC_TEST_NICE", "10"))
_AUTOGROUP: dict[str, str] = {}


def _autogroup_nice(pid: int | str) -> int | None:
    """The nice value of process `pid`'s autogroup ("/autogroup-1312 nice 0"), or None where there is none to read:
    another OS, kernel.sched_autogroup_enabled=0, or a sandbox whose /proc has the file but leaves it empty (CI's)."""
    try:
        match = re.fullmatch(r"\S+ nice (-?\d+)", Path(f"/proc/{pid}/autogroup").read_text().strip())
    except OSError:
        return None
    return int(match[1]) if match else None


def step_back(pid: int, nice: int) -> None:
    """Lower process `pid`'s priority by `nice` (0: nothing): its autogroup's nice value and its own. Best effort:
    where the system allows neither, the tests run as they are, only slower."""
    if not nice:
        return
    now = _autogroup_nice(pid)
    if now is not None:
        try:
            Path(f"/proc/{pid}/autogroup").write_text(str(min(19, now + nice)))
        except OSError:
            pass
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, pid) + nice))
    except OSError:
        pass


def pytest_collection_finish(session: pytest.Session) -> None:
    """The e2e lane starts now (session.items: after -m, -k and deselection) if an e2e test is to run; this process
    then steps back (NICE)."""
    if session.config.option.collectonly:
        return
    if any(i.nodeid.startswith(E2E) for i in session.items):
        _embedded_dag(session.config)
        own = _autogroup_nice("self")  # the caller's session's (make test's shell), given back at the end
        if own is not None:
            _AUTOGROUP["self"] = str(own)
        step_back(os.getpid(), NICE)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The first slow test starts the selected BACKGROUND tests' runs (their module's `start_in_background(tmp)`;
    None where the run cannot start here, e.g. SLURM is down, and that test skips)."""
    if _exempt(item) and "runs" not in _SESSION:
        _SESSION["runs"] = {}
        for test in item.session.items:
            if test.nodeid in BACKGROUND:
                tmp = item.config._tmp_path_factory.mktemp(test.name[:30])
                _SESSION["runs"][test.nodeid] = test.module.start_in_background(tmp)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for run in [_SESSION.get("dag"), *_SESSION.get("runs", {}).values()]:
        if run:
            run.stop()
    if "self" in _AUTOGROUP:
        try:
            Path("/proc/self/autogroup").write_text(_AUTOGROUP.pop("self"))
        except OSError:
            pass
    if _SHIM is not None:
        shutil.rmtree(_SHIM, ignore_errors=True)


@pytest.fixture
def background(request: pytest.FixtureRequest) -> BackgroundRun | None:
    """The background run of this test (one of BACKGROUND), started with the first slow test (None: it could not
    start here)."""
    return _SESSION.get("runs", {}).get(request.node.nodeid)


@pytest.fixture(scope="session")
def embedded_dag(request: pytest.FixtureRequest) -> Path:
    """The scratch checkout with the embedded DAG reproduced once (the background lane's run)."""
    return _embedded_dag(request.config).wait()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The total time of the tests, split into the fast part and the `slow`/`slurm` tests (with --durations)."""
    if not config.getoption("durations", None):
        return
    parts = {"fast": 0.0, "slow": 0.0, "slurm": 0.0}
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if not isinstance(rep, pytest.TestReport):
                continue
            kind = "slurm" if "slurm" in rep.keywords else "slow" if "slow" in rep.keywords else "fast"
            parts[kind] += rep.duration
    wall = time.monotonic() - _SESSION.get("start", time.monotonic())
    terminalreporter.write_sep("=", "total test time")
    terminalreporter.write_line(f"tests {sum(parts.values()):.0f} s (fast part {parts['fast']:.0f} s, slow "
                                f"{parts['slow']:.0f} s, slurm {parts['slurm']:.0f} s); session wall {wall:.0f} s")

def resolve_dvc(text: str, params: dict) -> str:
    """A dvc.yaml string with its `${a.b}` params interpolated as DVC does."""
    def value(m: re.Match) -> str:
        node = params
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages as DVC itself resolves them (`foreach` groups expanded and named `caption_single@base`,
    `${...}` interpolated): `{name: {cmd, deps, params, outs}}`, deps and outs as written paths, params as keys."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return {s.name: {"cmd": s.cmd,
                         "deps": [d.def_path for d in s.deps if not isinstance(d, ParamsDependency)],
                         "params": [k for d in s.deps if isinstance(d, ParamsDependency) for k in d.params],
                         "outs": [o.def_path for o in s.outs]}
                for s in repo.index.stages if getattr(s, "cmd", None)}


TINY_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vision_hidden_size=32, vision_depth=2,
                  vision_heads=2, min_pixels=3136, max_pixels=12544)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from repic.synthetic.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    texts = ["This is the query image. Name: <zorp>, Info: a red toy. yes no caption"] * 20
    return build_tiny_model(out, texts, TINY_MODEL, seed=0)


def need_shared(path: Path, what: str = "real RePIC data") -> Path:
    """`path` under ../shared, or the test skips: a user's clone has no ../shared. CI has it (.ci/run sets `CI`),
    so there a missing path fails the test instead of skipping it silently."""
    if not path.exists():
        reason = f"{what} not available ({path} is absent beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI (env CI is set) must have ../shared", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    need_shared(SHARED / "repic_eval")
    return SHARED
