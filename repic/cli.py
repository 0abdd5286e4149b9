"""Shared plumbing for the `stages/` entry points: argument parsing and one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from repic.io import RepicError
from repic.params import load_params


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A stage's parser: `--help` shows the module docstring whole, with its examples as written."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (validated before any work)")
    return p


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a stage's main; a RepicError becomes one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(argv)
    except RepicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def params_of(args: argparse.Namespace) -> dict[str, Any]:
    return load_params(args.params)
