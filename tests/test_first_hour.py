"""Spec of a user's first hour: what the README tells a new user to run does what it says, and each
mistake a new user makes gets one line that names it (and what to do), never a traceback or silence."""

import re
import subprocess
import warnings
from pathlib import Path

import pytest

from bfly.core.config import ConfigError, load_config
from bfly.core.data.metadata import DataError, load_metadata
from bfly.core.errors import first_to_say
from bfly.job.train import main as train_main

from conftest import REPO, run_python, subprocess_env

SCRIPTS = {name: REPO / "slurm" / f"train_{name}_node.sbatch" for name in ("single", "multi")}


def sbatch_defaults(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), re.M))


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


# --- the sbatch scripts ------------------------------------------------------------------------------


def test_both_sbatch_scripts_ask_each_node_for_the_same_4_gpus_and_32_cpus():
    single, multi = (sbatch_defaults(script) for script in SCRIPTS.values())
    for defaults in (single, multi):
        assert (defaults["gpus-per-node"], defaults["cpus-per-task"], defaults["ntasks-per-node"]) == ("4", "32", "1")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_an_sbatch_scripts_dry_run_shows_its_defaults_and_command_without_slurm(name):
    proc = subprocess.run(
        ["bash", str(SCRIPTS[name]), "--dry-run", "--config", "configs/resnet50.yaml", "train.epochs=2"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --gpus-per-node=4" in proc.stdout and "#SBATCH --cpus-per-task=32" in proc.stdout
    assert "-m bfly.train --config configs/resnet50.yaml train.epochs=2 run.stopped_exit_code=0" in proc.stdout


# --- config errors -----------------------------------------------------------------------------------


def test_a_mis_indented_config_file_is_one_line_naming_the_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "my config.yaml"
    bad.write_text("model:\n  name: resnet50\n   dropout: 0.1\n")
    assert train_main(["--config", str(bad), "--print-config"]) == 2
    assert stderr_lines(capsys) == [
        f"bfly.train: error: {bad}: invalid YAML: line 3, column 11: mapping values are not allowed here"
    ]


def test_an_override_that_is_not_yaml_is_one_line_naming_the_override(capsys):
    assert train_main(["train.eval_splits=[valid", "--print-config"]) == 2
    assert stderr_lines(capsys) == [
        "bfly.train: error: override train.eval_splits: cannot parse value '[valid': line 1, column 7: "
        "expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)"
    ]


def test_launch_submit_says_a_yaml_error_in_the_same_one_line(tmp_path, capsys):
    pytest.importorskip("submitit")
    from launch.submit import main as submit

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: resnet50\n   dropout: 0.1\n")
    assert submit(["--dry-run", "--config", str(bad)]) == 2
    assert stderr_lines(capsys) == [
        f"launch.submit: error: {bad}: invalid YAML: line 3, column 11: mapping values are not allowed here"
    ]
    assert submit(["--dry-run", "train.eval_splits=[valid"]) == 2
    (line,) = stderr_lines(capsys)
    assert line.startswith("launch.submit: error: override train.eval_splits: cannot parse value '[valid': line 1")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["run.hang_timeout_s=900"], "run.hang_timeout_s=900 must be below dist.timeout_s=600"),
        (
            ["run.startup_timeout_s=700", "dist.timeout_s=650"],
            "run.startup_timeout_s=700 must be below dist.timeout_s=650",
        ),
    ],
)
def test_a_hang_limit_at_or_above_the_collective_timeout_is_refused_naming_both_keys(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_with_hang_detection_off_or_a_longer_collective_timeout_the_limits_are_accepted():
    assert load_config(None, ["run.hang_timeout_s=0", "run.startup_timeout_s=900"]).run.hang_timeout_s == 0
    assert load_config(None, ["run.hang_timeout_s=900", "dist.timeout_s=1800"]).dist.timeout_s == 1800


def config_warnings(config: str | None, overrides: list[str]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(config, overrides)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "overrides, key, path",
    [
        (["data.crop_scale_min=0.5"], "data.crop_scale_min=0.5", "data.input=pil"),
        (["data.cache_placement=host"], "data.cache_placement='host'", "data.input=pil"),
        (["data.input=cached", "data.workers=8"], "data.workers=8", "data.input=cached"),
        (["data.reprob=0.5"], "data.reprob=0.5", "data.preset=course"),
    ],
)
def test_a_key_the_chosen_input_path_does_not_read_is_warned_about_once(overrides, key, path):
    assert config_warnings(None, overrides) == [
        f"{key} changes nothing with {path} (it is read with {path.split('=')[0]}="
        f"{'cached' if path == 'data.input=pil' else 'pil' if 'cached' in path else 'timm'} only)"
    ]


@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml")))
def test_the_shipped_configs_set_only_keys_their_input_path_reads(config, monkeypatch):
    monkeypatch.chdir(REPO)
    assert config_warnings(config, []) == []


# --- launch.submit -------------------------------------------------------------------------------------


def test_submitting_where_there_is_no_slurm_is_one_line_pointing_to_local_and_dry_run(tmp_path):
    pytest.importorskip("submitit")
    no_tools = tmp_path / "bin"
    no_tools.mkdir()
    proc = run_python(
        "-m", "launch.submit", "--gpus-per-node", "4", "--config", "configs/resnet50.yaml",
        env=subprocess_env(PATH=str(no_tools)),
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "launch.submit: error: no SLURM on this machine (sbatch and srun not found): submit from the cluster's "
        "login node, print what would be submitted with --dry-run, or run the same tasks here with --cluster local"
    ]


def dry_run(argv: list[str], capsys) -> tuple[str, str]:
    pytest.importorskip("submitit")
    from launch.submit import main as submit

    assert submit(["--dry-run", *argv]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_a_grid_without_a_group_trains_in_the_same_folder_when_submitted_again(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    argv = ["--gpus-per-node", "4", "--sweep", "optim.lr=0.1,0.2", "--seeds", "0,1", "model.name=vgg19_bn"]
    first, _ = dry_run(argv, capsys)
    again, _ = dry_run(argv, capsys)
    folders = set(re.findall(r"^# run directory.*: (.*)/lr-", first, re.M))
    assert len(folders) == 1 and re.fullmatch(rf"{tmp_path}/runs/lr-seed-[0-9a-f]{{8}}", folders.pop())
    assert first == again


def test_cpus_per_task_defaults_to_what_each_trainer_needs_and_the_flag_wins(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    pil, _ = dry_run(["--gpus-per-node", "4", "--config", "configs/resnet50_pil.yaml"], capsys)
    assert "#SBATCH --cpus-per-task=9" in pil  # data.workers: 8, and the trainer itself
    cached, _ = dry_run(["--gpus-per-node", "4", "--config", "configs/resnet50.yaml"], capsys)
    assert "#SBATCH --cpus-per-task=4" in cached  # no loader workers: the trainer, its copy thread, the cache build
    given, _ = dry_run(
        ["--gpus-per-node", "4", "--cpus-per-task", "12", "--config", "configs/resnet50_pil.yaml"], capsys
    )
    assert "#SBATCH --cpus-per-task=12" in given


def test_a_submission_without_config_says_it_trains_the_built_in_defaults(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _, err = dry_run(["--gpus-per-node", "4"], capsys)
    assert err.splitlines() == [
        "launch.submit: warning: no --config: training the built-in defaults (resnet50, data.root=data/butterfly-mini, "
        "30 epochs at 224 px, with the overrides given); python -m bfly.train --print-config shows them all"
    ]
    _, err = dry_run(["--gpus-per-node", "4", "--config", str(REPO / "configs" / "resnet50.yaml")], capsys)
    assert err == ""


# --- start-up errors under torchrun, and a missing dataset ------------------------------------------------


def test_a_start_up_error_is_said_by_the_first_rank_that_meets_it_and_by_no_other(tmp_path):
    """torchrun gives each rank an error file in the attempt's folder: the first rank to claim it says the
    line, whichever rank that is, once; rank 0 may have been ended by torchrun before it met the error."""
    attempt = tmp_path / "attempt_0"
    files = [attempt / str(rank) / "error.json" for rank in range(3)]
    for f in files:
        f.parent.mkdir(parents=True)
    assert [first_to_say(files[1], is_main=False), first_to_say(files[0], True), first_to_say(files[2], False)] == [
        True,
        False,
        False,
    ]
    assert first_to_say(None, is_main=True) and not first_to_say(None, is_main=False)  # no torchrun: rank 0


def test_a_missing_dataset_says_where_to_get_it_and_how_to_check_it(tmp_path):
    with pytest.raises(DataError) as refused:
        load_metadata(tmp_path / "butterflies")
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'butterflies'}: dataset root is not a directory: download the Kaggle")
    assert '"Butterfly & Moths Image Classification 100 species"' in message
    assert "python -m bfly.train --check" in message
