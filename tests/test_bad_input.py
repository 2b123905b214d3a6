"""Bad input: one clear line naming the culprit, exit code 2, on every rank, and no hang.

`BAD` is the table of broken inputs: data files, CSV metadata, config and checkpoints. Each row
breaks one thing in a fresh copy of the tiny dataset and says which file, row or key the error must
name. Add a row to cover a new case. `VALID` lists images that look unusual but are valid input:
they are converted, never refused.

Under torchrun, the failure summary torchrun prints (its "bfly.train FAILED" box) names bfly's line
as the root cause, no frame of bfly's code is printed, and a rank that stops because another failed
says which.

Default tier: the whole table in-process (one process), and four rows under torchrun. Slow tier
(`-m slow`): every row under `torchrun --nproc_per_node=2`.
"""

import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bfly
from bfly.core.data.metadata import DataError, load_metadata
from bfly.core.data.pil_input import open_rgb
from bfly.core.data.sampling import epoch_permutation
from bfly.core.models import build_model
from bfly.job.train import main

from conftest import (
    MINI_ROOT,
    PYTHON,
    REPO,
    TEST_MODEL,
    data_copy,
    folder_copy,
    read_jsonl,
    run_python,
    subprocess_env,
    tiny_overrides,
)
from probes.fault_launch import Launch, read_rows, replace_image, torchrun_cmd, write_rows

PACKAGE = Path(bfly.__file__).resolve().parent  # a frame of bfly's own code names a file in here


class Workspace:
    """A fresh editable copy of the tiny data, a run directory, and ways to break them."""

    def __init__(self, tmp: Path, tiny_data: Path):
        self.tmp = tmp
        self.data = data_copy(tiny_data, tmp / "data")
        self.run = tmp / "run"

    def args(self, **extra) -> list[str]:
        return tiny_overrides(self.data, self.run, **extra)

    def csv(self, split: str = "train") -> Path:
        return self.data.resolve() / f"{split}.csv"

    def edit_cell(self, split: str, row: int, column: str, value: str) -> None:
        header, rows = read_rows(self.csv(split))
        rows[row][header.index(column)] = value
        write_rows(self.csv(split), header, rows)

    def image_bytes(self, row: int = 0) -> bytes:
        header, rows = read_rows(self.csv())
        return (self.data / rows[row][header.index("filepaths")]).read_bytes()

    def checkpoint(self, name: str, arch: str = TEST_MODEL, num_classes: int = 10, **entries) -> Path:
        """A checkpoint as bfly writes it, of our own model with the given architecture and classes."""
        model = build_model(arch, num_classes)
        payload = {
            "arch": arch,
            "num_classes": num_classes,
            "model": model.state_dict(),
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
            "epoch": 0,
            "step_in_epoch": 1,
            "global_step": 1,
            "best_top1": -1.0,
            "epoch_sums": {},
            "rng": [],
            "world_size": 1,
            **entries,
        }
        path = self.tmp / name
        torch.save(payload, path)
        return path


# The train row read first (by rank 0, whatever the world size): a broken image there fails at once.
FIRST_READ = int(epoch_permutation(60, 0, 0)[0])
# What an image error met while training adds (escaped for a pattern).
CHECK_HINT = re.escape("; run `python -m bfly.train --check` to find every such file before a long run")

Setup = Callable[[Workspace], tuple[list[str], str, str]]  # -> (overrides, culprit, what the line says)


def missing_image(ws):
    path = replace_image(ws.data, "train", 5, "gone.jpg")
    return ws.args(), str(path), r"\d image file\(s\) in column 'filepaths' do not exist \(first 1: row 7: "


def truncated_jpeg(ws):
    whole = ws.image_bytes(FIRST_READ)
    path = replace_image(ws.data, "train", FIRST_READ, "truncated.jpg", whole[: len(whole) * 2 // 3])
    return ws.args(), str(path), rf"cannot decode image \(image file is truncated .*\){CHECK_HINT}$"


def text_named_jpg(ws):
    path = replace_image(ws.data, "train", FIRST_READ, "notes.jpg", b"these are my notes, not a picture\n")
    return ws.args(), str(path), f"not an image Pillow can read{CHECK_HINT}$"


def zero_byte_image(ws):
    path = replace_image(ws.data, "train", 5, "empty.jpg", b"")
    return ws.args(), str(path), r"1 image file\(s\) in column 'filepaths' are empty \(0 bytes\) \(first 1: row 7: "


def semicolon_separated_csv(ws):
    header, rows = read_rows(ws.csv())
    ws.csv().write_text("\n".join(";".join(r) for r in [header, *rows]) + "\n")
    return ws.args(), f"{ws.csv()}: row 1 (header)", r"the file looks ';'-separated; re-save it with commas"


def csv_missing_column(ws):
    header, rows = read_rows(ws.csv())
    i = header.index("label_id")
    write_rows(ws.csv(), header[:i] + header[i + 1 :], [r[:i] + r[i + 1 :] for r in rows])
    return ws.args(), str(ws.csv()), r"row 1 \(header\): missing required column\(s\) 'label_id'"


def label_out_of_range(ws):
    ws.edit_cell("train", 3, "label_id", "99")
    ws.edit_cell("train", 3, "labels", "NEW SPECIES")
    return ws.args(), str(ws.csv()), r"row 5, column 'label_id': class id 99 is outside \[0, 11\)"


def non_integer_label(ws):
    ws.edit_cell("train", 3, "label_id", "7.5")
    return ws.args(), str(ws.csv()), r"row 5, column 'label_id': class id '7\.5' is not an integer"


def empty_split(ws):
    header, _ = read_rows(ws.csv("valid"))
    write_rows(ws.csv("valid"), header, [])
    return ws.args(), str(ws.csv("valid")), "split 'valid' has no rows"


def id_name_mismatch(ws):
    header, rows = read_rows(ws.csv())
    other = next(r for r in rows if r[header.index("label_id")] != "0")[header.index("labels")]
    ws.edit_cell("train", 0, "labels", other)
    return ws.args(), f"{ws.csv()}: row 2", "class id 0 has two names in column 'labels'"


def unknown_config_key(ws):
    return ws.args(**{"train.epoch": 3}), "'train.epoch'", r"unknown config key 'train\.epoch' \(known in train: "


def unknown_key_in_config_file(ws):
    config = ws.tmp / "my.yaml"
    config.write_text("train:\n  epochs: 2\n  lr: 0.1\n")
    return ["--config", str(config), *ws.args()], str(config), r"unknown config key 'train\.lr'"


def wrong_config_type(ws):
    return ws.args(**{"train.epochs": "two"}), "train.epochs", "expected int, got str 'two'"


def run_directory_under_a_file(ws):
    (ws.tmp / "a-file").write_text("")
    run_dir = ws.tmp / "a-file" / "run"
    return ws.args(**{"run.dir": run_dir}), str(run_dir), "is not writable: Not a directory$"


def nonexistent_checkpoint(ws):
    path = ws.tmp / "nowhere" / "last.pt"
    return ws.args(**{"run.resume": path}), str(path), "checkpoint not found$"


def checkpoint_of_another_architecture(ws):
    path = ws.checkpoint(f"{TEST_MODEL}.pt")
    return (
        ws.args(**{"run.resume": path, "model.name": "vgg19"}),
        str(path),
        f"checkpoint is a {TEST_MODEL} model, this run builds vgg19",
    )


def checkpoint_of_another_class_count(ws):
    path = ws.checkpoint("nine-classes.pt", num_classes=9)
    return ws.args(**{"run.resume": path}), str(path), "checkpoint has 9 classes, this dataset has 10"


class OpensAFile:
    """Unpickling this calls open(path, "w"): what a malicious checkpoint could do with any callable."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def checkpoint_with_a_pickled_object(ws):
    path = ws.checkpoint("pickled.pt", note=OpensAFile(ws.tmp / "created-by-unpickling"))
    return ws.args(**{"run.resume": path}), str(path), r"refused by torch\.load\(weights_only=True\)"


def best_checkpoint_as_resume(ws):
    path = ws.tmp / "best.pt"
    torch.save(
        {
            "arch": TEST_MODEL,
            "num_classes": 10,
            "model": build_model(TEST_MODEL, 10).state_dict(),
            "epoch": 1,
            "global_step": 5,
            "metrics": {},
        },
        path,
    )
    return ws.args(**{"run.resume": path}), str(path), "holds weights only .* resume from a last.pt$"


def truncated_last_checkpoint(ws):
    ws.run.mkdir()
    whole = ws.checkpoint("whole.pt").read_bytes()
    (ws.run / "last.pt").write_bytes(whole[: len(whole) // 2])
    return ws.args(), str(ws.run / "last.pt"), r"truncated or corrupt checkpoint \(File is not a zip file\)$"


@dataclass(frozen=True)
class Bad:
    name: str
    setup: Setup


BAD = [
    Bad(f.__name__.replace("_", " "), f)
    for f in (
        missing_image,
        zero_byte_image,
        truncated_jpeg,
        text_named_jpg,
        csv_missing_column,
        semicolon_separated_csv,
        label_out_of_range,
        non_integer_label,
        empty_split,
        id_name_mismatch,
        unknown_config_key,
        unknown_key_in_config_file,
        wrong_config_type,
        run_directory_under_a_file,
        nonexistent_checkpoint,
        checkpoint_of_another_architecture,
        checkpoint_of_another_class_count,
        checkpoint_with_a_pickled_object,
        best_checkpoint_as_resume,
        truncated_last_checkpoint,
    )
]
TORCHRUN_DEFAULT = {"csv missing column"}
TORCHRUN_OWN_TEST = {"zero byte image", "truncated jpeg"}  # default tier too, with more checks (below)


def is_the_error(line: str, culprit: str, says: str, rank_tag: str = "") -> bool:
    return bool(re.match(rf"bfly\.train: error{rank_tag}: ", line)) and culprit in line and bool(re.search(says, line))


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_bad_input_is_one_line_naming_the_culprit(case, tiny_data, tmp_path, capsys):
    ws = Workspace(tmp_path, tiny_data)
    args, culprit, says = case.setup(ws)
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and is_the_error(err.strip(), culprit, says), err
    assert " step 1/" not in out  # stopped before the first step's end
    assert not (tmp_path / "created-by-unpickling").exists()


@dataclass(frozen=True)
class Summary:
    """torchrun's failure summary (the "bfly.train FAILED" box): per rank, its exit code and what the box
    shows as its "traceback"; the rank named as the root cause."""

    exit_codes: dict[int, int]
    said: dict[int, str]
    root_cause: int


def torchrun_summary(out: str, module: str = "bfly.train") -> Summary:
    box = out[out.index(f"{module} FAILED") :]
    ranks = re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\n\s+exitcode\s+: (-?\d+).*\n.*\n\s+traceback : (.*)", box)
    root = re.search(r"Root Cause \(first observed failure\):\n.*\n.*\n.*\n\s+rank\s+: (\d+)", box)
    assert ranks and root, box
    return Summary(
        {int(r): int(code) for r, code, _ in ranks}, {int(r): said for r, _, said in ranks}, int(root.group(1))
    )


def run_bad_case_under_torchrun(case: Bad, ws: Workspace) -> str:
    """Returns torchrun's output."""
    args, culprit, says = case.setup(ws)
    launch = Launch(torchrun_cmd(2, args), timeout=240)
    assert launch.wait() != 0
    out = launch.output
    lines = [line for line in out.splitlines() if line.startswith("bfly.train: error")]
    # Errors met before the process group starts (config, metadata, run directory) are the same on
    # every rank: rank 0 prints them. Errors met later (checkpoints, images) are printed by each rank
    # that meets them: one line per rank at most, each tagged with its rank.
    assert 1 <= len(lines) <= 2, out[-3000:]
    for line in lines:
        assert is_the_error(line, culprit, says, r" \[rank \d\]"), out[-3000:]
    summary = torchrun_summary(out)
    assert set(summary.exit_codes) == {0, 1} and 0 not in summary.exit_codes.values(), out[-3000:]
    # The summary's root cause is bfly's line (not "To enable traceback see: ..."), of a rank that met the error.
    root = summary.said[summary.root_cause]
    assert is_the_error(root, culprit, says, rf" \[rank {summary.root_cause}\]"), out[-3000:]
    # A rank that did not meet the error itself says which rank did, in its line and in the summary.
    for rank, said in summary.said.items():
        if not said.startswith("bfly.train: error"):
            stopping = f"bfly.train [rank {rank}]: stopping: rank {summary.root_cause} failed (see its error)"
            assert said == stopping and stopping in out.splitlines(), out[-3000:]
    assert out.count("Traceback (most recent call last)") == 1  # torchrun's own ChildFailedError, no worker's
    assert f'File "{PACKAGE}' not in out, out[-3000:]  # no frame of bfly's code
    return out


@pytest.mark.parametrize("case", [c for c in BAD if c.name in TORCHRUN_DEFAULT], ids=lambda c: c.name)
def test_bad_input_stops_every_rank(case, tiny_data, tmp_path):
    run_bad_case_under_torchrun(case, Workspace(tmp_path, tiny_data))


def test_an_image_one_rank_cannot_decode_mid_run_the_other_rank_names_that_rank(tiny_data, tmp_path):
    """Rank 0 meets the truncated image in its first batch, rank 1 waits for it in a collective."""
    ws = Workspace(tmp_path, tiny_data)
    out = run_bad_case_under_torchrun(Bad("truncated jpeg", truncated_jpeg), ws)
    summary = torchrun_summary(out)
    assert summary.root_cause == 0 and summary.exit_codes == {0: 2, 1: 1}, out[-3000:]
    assert summary.said[1] == "bfly.train [rank 1]: stopping: rank 0 failed (see its error)"
    assert "Connection closed by peer" not in out and "collective failed" not in out


def test_a_zero_byte_image_is_refused_at_start_up_with_nothing_written(tiny_data, tmp_path):
    ws = Workspace(tmp_path, tiny_data)
    out = run_bad_case_under_torchrun(Bad("zero byte image", zero_byte_image), ws)
    assert f"bfly: {TEST_MODEL}," not in out  # the start-up line of a run that trains
    assert not ws.run.exists()


def test_a_zero_byte_image_in_a_class_folder_is_refused(tmp_path):
    root = folder_copy(tmp_path / "folders", {"train": 2, "valid": 1, "test": 1})
    empty = sorted((root / "train").iterdir())[3] / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{re.escape(str(empty.parent))}: 1 image file\(s\) are empty \(0 bytes\)"):
        load_metadata(root, splits=["train", "valid"])


def test_a_bug_keeps_its_traceback_in_torchruns_summary(tmp_path):
    """A crash (not a user error) is recorded with its traceback, as torchrun's own @record would; read
    back by torchrun's own summary code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    error_file = tmp_path / "error.json"
    env = {**subprocess_env(TORCHELASTIC_ERROR_FILE=str(error_file)), "RANK": "0", "WORLD_SIZE": "two"}
    proc = subprocess.run([PYTHON, "-m", "bfly.train"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    failure = ProcessFailure(local_rank=0, pid=0, exitcode=1, error_file=str(error_file))
    box = ChildFailedError("bfly.train", {0: failure}).format_msg()
    assert "traceback : Traceback (most recent call last):" in box
    assert "environment variable WORLD_SIZE='two' is not an integer" in box
    assert json.loads(error_file.read_text())["message"]["message"].startswith("RuntimeError: environment variable")


def as_plain_user(cmd: list[str]) -> list[str]:
    """`cmd` without root's right to read any file (root bypasses file permissions)."""
    if os.geteuid() != 0:
        return cmd
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *cmd]


def test_an_image_without_read_permission_is_refused_at_start_up(tiny_data, tmp_path):
    ws = Workspace(tmp_path, tiny_data)
    path = replace_image(ws.data, "train", 5, "private.jpg", ws.image_bytes(5))
    path.chmod(0)
    proc = subprocess.run(
        as_plain_user([PYTHON, "-m", "bfly.train", *ws.args()]),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"bfly.train: error: {ws.csv()}: 1 image file(s) in column 'filepaths' cannot be read (permission denied) "
        f"(first 1: row 7: {path})\n"
    )
    assert not ws.run.exists()


def test_an_image_without_read_permission_says_cannot_read_when_opened(tmp_path):
    """The same file met later (its permission changed while training ran): "cannot read", not "cannot decode"."""
    path = tmp_path / "private.jpg"
    path.write_bytes((MINI_ROOT / "valid/ADONIS/1.jpg").read_bytes())
    path.chmod(0)
    opens = f"from bfly.core.data.pil_input import open_rgb; open_rgb({str(path)!r})"
    proc = subprocess.run(
        as_plain_user([PYTHON, "-c", opens]), cwd=REPO, env=subprocess_env(), capture_output=True, text=True
    )
    assert f"ImageError: {path}: cannot read image file (Permission denied)" in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [c for c in BAD if c.name not in TORCHRUN_DEFAULT | TORCHRUN_OWN_TEST], ids=lambda c: c.name
)
def test_bad_input_stops_every_rank_slow(case, tiny_data, tmp_path):
    run_bad_case_under_torchrun(case, Workspace(tmp_path, tiny_data))


# --- warnings, not errors ------------------------------------------------------------------------------


def test_bflys_warnings_print_as_one_line(tiny_data, tmp_path):
    ws = Workspace(tmp_path, tiny_data)
    header, rows = read_rows(ws.csv())
    write_rows(ws.csv(), header, rows + [rows[4]])
    proc = run_python("-m", "bfly.train", *ws.args(**{"run.stop_after_steps": 1}), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stderr.splitlines() if "duplicate image path" in line]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {ws.csv()}: split 'train' lists 1 duplicate"), warned
    assert "warnings.warn(" not in proc.stderr and "UserWarning" not in proc.stderr, proc.stderr[-3000:]


def tiny_picture(ws: Workspace, row: int, side: int) -> Path:
    path = replace_image(ws.data, "train", row, "tiny.png", b"")
    Image.new("RGB", (side, side + 1), (90, 120, 60)).save(path)
    return path


def test_an_image_under_an_eighth_of_the_image_size_is_named_by_check(tiny_data, tmp_path):
    ws = Workspace(tmp_path, tiny_data)
    path = tiny_picture(ws, 5, 3)  # 3x4 px, data.image_size=32: under 32 / 8 = 4 px on a side
    proc = run_python("-m", "bfly.train", "--check", *ws.args(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("warning ")]
    assert len(warned) == 1 and f": {path} (3x4)" in warned[0], proc.stdout
    assert "1 image(s) smaller than 1/8 of data.image_size=32 on a side" in warned[0]


def test_an_image_under_an_eighth_of_the_image_size_is_named_when_the_decode_cache_is_built(tiny_data, tmp_path):
    ws = Workspace(tmp_path, tiny_data)
    path = tiny_picture(ws, 5, 3)
    cached = {"data.input": "cached", "data.cache_dir": tmp_path / "cache", "run.stop_after_steps": 1}
    with pytest.warns(UserWarning) as warned:
        assert main(ws.args(**cached)) == 0
    small = [str(w.message) for w in warned if "smaller than" in str(w.message)]
    assert small == [
        f"split 'train': 1 image(s) smaller than 1/8 of data.image_size=32 on a side, each blown up "
        f"8x or more: {path} (3x4)"
    ]


def test_duplicate_rows_are_a_warning_and_the_run_goes_on(tiny_data, tmp_path):
    ws = Workspace(tmp_path, tiny_data)
    header, rows = read_rows(ws.csv())
    write_rows(ws.csv(), header, rows + [rows[4]])
    with pytest.warns(
        UserWarning,
        match=rf"{re.escape(str(ws.csv()))}: split 'train' lists 1 duplicate image "
        rf"path\(s\) \(first 1: rows 6 and {len(rows) + 2}: ",
    ):
        assert main(ws.args(**{"run.stop_after_steps": 1})) == 0
    assert (ws.run / "last.pt").exists()


# --- unusual but valid images: converted to RGB -------------------------------------------------------


def sixteen_bit(image: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)


VALID = {  # name: (file name, how to make it from an RGB picture, format)
    "grayscale JPEG": ("gray.jpg", lambda im: im.convert("L"), "JPEG"),
    "CMYK JPEG": ("cmyk.jpg", lambda im: im.convert("CMYK"), "JPEG"),
    "RGBA PNG": ("rgba.png", lambda im: im.convert("RGBA"), "PNG"),
    "RGB PNG": ("rgb.png", lambda im: im, "PNG"),
    "palette PNG": ("palette.png", lambda im: im.convert("P"), "PNG"),
    "grayscale+alpha PNG": ("la.png", lambda im: im.convert("LA"), "PNG"),
    "16-bit grayscale PNG": ("gray16.png", sixteen_bit, "PNG"),
    "PNG named .jpg": ("really-a-png.jpg", lambda im: im, "PNG"),
}


def test_unusual_image_modes_are_converted_not_refused(tiny_data, tmp_path):
    ws = Workspace(tmp_path, tiny_data)
    for split in ("train", "valid"):
        header, rows = read_rows(ws.csv(split))
        for i, (name, (file_name, make, fmt)) in enumerate(VALID.items()):
            picture = open_rgb(str(ws.data / rows[i][header.index("filepaths")]))
            path = replace_image(ws.data, split, i, f"{split}-{file_name}", b"")
            make(picture).save(path, fmt)
            converted = open_rgb(str(path))
            assert converted.mode == "RGB" and converted.size == picture.size, name
            # Same brightness as the picture it was made from: not clipped to white, not black.
            assert abs(np.asarray(converted).mean() - np.asarray(picture).mean()) < 8, name
    # One epoch of one step: every train image read once, then every valid one.
    assert main(ws.args(**{"train.epochs": 1, "train.batch_size": 60})) == 0
    assert read_jsonl(ws.run / "metrics.jsonl")[0]["epoch"] == 0
