"""Progress of long loops: a tqdm bar (count, rate, ETA) on a terminal; one log line every N items otherwise.

A SLURM log or a `dvc repro` redirected to a file is not a terminal: a redrawn bar would be thousands of
carriage returns there, so it gets plain lines (`caption single/myvlm: 400/3400 (11.8%) 2.1/s, ETA 23m49s`),
every `every` items (default: about every 5 %, at least 1) and at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

log = logging.getLogger("repic.core.progress")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """`with Progress(total, "what") as bar: ... bar.update(n)`; `stream` decides terminal vs log lines."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", every: int | None = None,
                 stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.every = every or max(1, self.total // 20)
        self.done = 0
        self._next = self.every
        self._start = time.monotonic()
        self._bar: Any = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        tail = "done in " + _duration(elapsed) if self.done >= self.total else f"ETA {_duration(eta)}"
        return f"{self.desc}: {self.done}/{self.total} ({pct:.1f}%) {rate:.2f} {self.unit}/s, {tail}"

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.done >= self._next or self.done >= self.total:
            print(self.line(), file=self.stream, flush=True)
            while self._next <= self.done:
                self._next += self.every

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def training_callback(stream: TextIO | None = None) -> Any:
    """A transformers `TrainerCallback` writing `Progress` log lines of optimizer steps when the output is not a
    terminal (on a terminal the Trainer's own tqdm bar shows count and ETA); None on a terminal."""
    from transformers import TrainerCallback

    out = stream if stream is not None else sys.stderr
    if getattr(out, "isatty", lambda: False)():
        return None

    class StepProgress(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Progress | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                self.bar = Progress(state.max_steps, "train", unit="step", stream=out, tty=False)
                self.bar.done = state.global_step  # a resumed run counts from its checkpoint's step
                self.bar._next = state.global_step + self.bar.every

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.done)

    return StepProgress()
