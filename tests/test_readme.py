"""The README's commands are real, and the text users read speaks about the product only.

Every command in the README's bash blocks is checked the cheapest way that still runs our code: a
training command resolves its config (`--print-config`), a preflight checks the mini data, a submission
and an sbatch script print what they would do (`--dry-run`), the other commands parse their arguments.
"""

import argparse
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bfly.job.train import main as train_main

from conftest import MINI_ROOT, REPO, subprocess_env

README = REPO / "README.md"


def readme_commands() -> list[list[str]]:
    """The commands of the README's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.M | re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def command_id(cmd: list[str]) -> str:
    return " ".join(cmd)[:90]


COMMANDS = readme_commands()


class Parsed(Exception):
    pass


def parses(module: str, args: list[str], monkeypatch) -> None:
    """`python -m MODULE ARGS` as far as its argument parsing: a bad argument exits 2, --help exits 0."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, argv=None, namespace=None):
        original(parser, argv, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module, *args])
    with pytest.raises((Parsed, SystemExit)) as stop:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert stop.type is Parsed or (stop.value.code == 0 and "--help" in args)


def train_args(cmd: list[str]) -> list[str]:
    """bfly.train's arguments in `python -m bfly.train ...` or `torchrun ... -m bfly.train ...`."""
    return cmd[cmd.index("bfly.train") + 1 :]


def without_check(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif a != "--check":
            out.append(a)
    return out


@pytest.mark.parametrize("cmd", COMMANDS, ids=command_id)
def test_every_readme_command_runs(cmd, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    program = cmd[0]
    if program in ("pip", "export", "wandb") or cmd[:3] == ["python3", "-m", "venv"]:
        pytest.skip("another tool's command")
    if program == "bash" and cmd[1].startswith(".ci/"):
        assert (REPO / cmd[1]).is_file()
        return
    if program in ("bash", "sbatch"):
        script = next(a for a in cmd if a.startswith("slurm/"))
        args = cmd[cmd.index(script) + 1 :]
        dry = [] if args[:1] == ["--dry-run"] else ["--dry-run"]
        proc = subprocess.run(
            ["bash", script, *dry, *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0 and "#SBATCH --gpus-per-node=" in proc.stdout, proc.stderr
        return
    if "bfly.train" in cmd:
        args = train_args(cmd)
        if args == ["--help"]:
            parses("bfly.train", args, monkeypatch)
        elif "--check" in args:
            from bfly.job.preflight import preflight

            overrides = [a for a in without_check(args) if "=" in a] + [f"data.root={MINI_ROOT}"]
            assert preflight(args[args.index("--config") + 1], overrides, 1) == 0
        else:
            assert train_main([*without_check(args), "--print-config"]) == 0, capsys.readouterr().err
        return
    if cmd[:3] == ["python", "-m", "launch.submit"]:
        pytest.importorskip("submitit")
        from launch.submit import main as submit

        args = [a for a in cmd[3:] if a not in ("--check", "--dry-run")]
        assert submit(["--dry-run", *args]) == 0, capsys.readouterr().err
        return
    assert cmd[:2] == ["python", "-m"], cmd
    parses(cmd[2], cmd[3:], monkeypatch)


def test_the_readme_fits_users_and_maintainers_have_their_own_file():
    text = README.read_text()
    assert len(text.splitlines()) <= 350
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    assert [line for line in prose.splitlines() if len(line) > 120] == []
    assert "(DEVELOPING.md)" in text and (REPO / "DEVELOPING.md").is_file()


# Words about how the project was made: the text users read speaks about the product only.
BANNED = [
    r"\brooms\b",
    r"\bformerly\b",
    r"was called `seed`",
    r"\(was `seed`\)",
    r"seed report",
    r"seed's comparison",
    r"\bpilot\b",
    r"test machine",
    r"shared VM",
    r"no GPU run",
    r"before this watchdog",
    r"per rank before\)",
    r"should replace them",
    r"\$OUT\b",
    r"timeout 565",
    r"Commit them under",
    r"moved here from",
    r"in at most 9 minutes",
    r"could not train it",
    r"DEVELOPERS\.md",
]


def shipped_text() -> list[Path]:
    files = [README, REPO / "DEVELOPING.md", *REPO.glob("configs/*.yaml"), *REPO.glob("data/*/README.md")]
    files += [*REPO.glob("slurm/*"), *REPO.glob("bfly/**/*.py"), *REPO.glob("launch/*.py")]
    return [f for f in files if f.is_file()]


def test_shipped_text_speaks_about_the_product_only():
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in shipped_text()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if any(re.search(word, line, re.I) for word in BANNED)
    ]
    assert found == []


def test_pil_recipes_describe_the_pil_input_and_cached_recipes_the_cached_one():
    for config in REPO.glob("configs/*.yaml"):
        header = "".join(line for line in config.read_text().splitlines(True) if line.startswith("#"))
        if config.stem == "demo_cpu":
            continue
        path = "pil" if config.stem.endswith("_pil") else "cached"
        assert f"data.input={path}" in header and f"input: {path}" in config.read_text(), config.name
        assert "GPU memory" not in header or path == "cached", config.name
