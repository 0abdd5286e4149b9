"""Shared plumbing for the `stages/` entry points: argument parsing, one-line errors and exit statuses.

Not a dependency of any DVC stage (repic.core.layout.NOT_STAGE_DEPS): nothing here can change what a stage
writes, so an edit (a help string) reruns nothing. tests/test_deps.py holds it to that: it imports only the
standard-library modules listed there and `RepicError`, and `--params` defaults to DVC's params file. The params a
stage computes with come from `repic.core.params.params_of`."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from os import strerror
from typing import Any

from repic.core.io import RepicError

# A full disk or a spent quota: the user's to fix, a one-line error rather than a traceback.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A stage's parser: `--help` shows the module docstring whole, with its examples as written, and the usage
    line names the command as it is run (`python -m stages.caption`, not `caption.py`)."""
    caller = sys._getframe(1).f_globals
    spec = caller.get("__spec__")
    module = spec.name if spec is not None else caller.get("__name__", "")
    prog = f"python -m {module}" if module and module != "__main__" else None
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (validated before any work)")
    return p


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds the stage like Ctrl-C, so atomic writers remove their temporary files."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise(received: list[int]):
    """SIGINT/SIGTERM raise Interrupted (SIGTERM's default would end the process with no cleanup) and are
    recorded: an exception raised inside a `__del__` or a callback is printed and dropped by Python, so the
    stage could finish and exit 0 after a Ctrl-C; the record makes it exit non-zero anyway."""
    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a stage's main; a RepicError becomes one line on stderr and exit status 2, SIGINT/SIGTERM exit status
    130/143 (128 + the signal), even when Python dropped the interrupt (raised inside a `__del__`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    received: list[int] = []
    try:
        with _signals_raise(received):
            main(argv)
    except RepicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        # The stage's outputs are written all or nothing (repic.core.io): what was there before is intact.
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"error: {strerror(exc.errno)} ({errno.errorcode[exc.errno]}){where}: free space (df -h) and run "
              "again; no output was half-written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # raised by the handler, or a SIGINT before it was installed
        received.append(signal.SIGINT)
    if received:
        print(f"error: interrupted by {signal.Signals(received[0]).name}", file=sys.stderr)
        return 128 + received[0]
    return 0

