"""`python -m stages.X --help` shows the stage's whole docstring (examples included) and a help line per option."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from .conftest import REPO

STAGES = sorted(p.stem for p in (REPO / "stages").glob("*.py") if p.stem != "__init__")


def test_every_stage_is_listed():
    assert len(STAGES) == 10 and "score" in STAGES and "train_grpo_lora" in STAGES and "retrieve" in STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_help_shows_the_whole_docstring_and_every_option_has_help(stage, monkeypatch, capsys):
    module = importlib.import_module(f"stages.{stage}")
    parsers: list[argparse.ArgumentParser] = []
    parse_args = argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        parsers.append(self)
        return parse_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    doc = module.__doc__.strip()
    assert doc in out, f"stages.{stage} --help does not show its docstring as written"
    assert "Example" in doc or "python -m stages." in doc  # every stage documents how it is run
    (p,) = parsers
    undocumented = [a.option_strings[0] for a in p._actions if not a.help or a.help == argparse.SUPPRESS]
    assert undocumented == [], f"stages.{stage}: options without a help line"
    for action in p._actions:
        assert action.help in " ".join(out.split()), f"stages.{stage}: help of {action.option_strings[0]} not shown"


def test_help_runs_as_a_module():
    """The docstring's continuation lines (a backslash at a line's end) reach the terminal as written."""
    out = subprocess.run([sys.executable, "-m", "stages.caption", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert ("--retrieval results/retrieval/single \\\n    --base-model data/models/base --row trained --adapter "
            "results/train/adapter") in out


@pytest.mark.parametrize("stage", ["caption", "score"])
def test_usage_names_the_module_command(stage):
    """`--help`'s usage line is the command to type (`python -m stages.X`), run as a module or imported."""
    out = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith(f"usage: python -m stages.{stage} [-h]")
    module = importlib.import_module(f"stages.{stage}")
    with pytest.raises(SystemExit):
        module.main(["--help"])
