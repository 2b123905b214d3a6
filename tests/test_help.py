"""Every command's `--help`: it exits 0, and every option that has a default shows it."""

import argparse
import runpy
import sys
from pathlib import Path

import pytest

# Every `python -m bfly.X` entry point (bfly/X.py), so that a new command cannot be left out.
COMMANDS = [
    *sorted(
        f"bfly.{p.stem}" for p in (Path(__file__).resolve().parents[1] / "bfly").glob("*.py") if p.stem != "__init__"
    ),
    "launch.submit",
]


def help_of(module: str, monkeypatch, capsys) -> tuple[int, str, list[argparse.ArgumentParser]]:
    """`python -m MODULE --help`, run as python runs it: exit status, output, the parsers that printed help."""
    if module == "launch.submit":
        pytest.importorskip("submitit")
    printed: list[argparse.ArgumentParser] = []
    print_help = argparse.ArgumentParser.print_help

    def recording(parser, file=None):
        printed.append(parser)
        print_help(parser, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", recording)
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    return stop.value.code or 0, capsys.readouterr().out, printed


def shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    formatter.add_argument(action)
    return formatter.format_help()


@pytest.mark.parametrize("module", COMMANDS)
def test_help_exits_0_and_shows_every_default(module, monkeypatch, capsys):
    code, out, parsers = help_of(module, monkeypatch, capsys)
    assert code == 0 and f"python -m {module}" in out
    for parser in parsers:
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
                continue
            assert "default" in shown_help(parser, action), f"{module} {action.option_strings}: no default shown"


def test_the_config_keys_of_train_help_are_in_aligned_columns(monkeypatch, capsys):
    _, out, _ = help_of("bfly.train", monkeypatch, capsys)
    rows = [line for line in out.splitlines() if line.startswith("  ") and line.split()[0].count(".") == 1]
    keys = [line for line in rows if line.split()[0].split(".")[0] in ("model", "data", "optim", "run", "dist")]
    assert len(keys) > 40
    value_columns = {len(line) - len(line[len(line.split()[0]) + 2 :].lstrip()) for line in keys}
    assert len(value_columns) == 1, value_columns
