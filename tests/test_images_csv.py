"""Images and CSVs as users bring them: each problem is one line naming the file (and the row for a CSV),
in training, `bfly.evaluate` and `bfly.predict`; predict still answers the other files; phone photos
are read upright.

Every case is a real file made in the test's folder: a 14000x14000 JPEG (196 Mpx, over twice Pillow's
decompression-bomb limit of 89 Mpx: refused), a 12000x12000 one (144 Mpx: decoded with a warning that
names it), JPEGs carrying an EXIF orientation tag, a CSV saved in Windows-1252, a directory named like
an image, and one image listed twice under two spellings of its path. A flat gray JPEG of that size
takes ~0.2 s and 2 MB to write.

Default tier: training in-process with the shipped 4 loader workers (the error crosses from a worker),
evaluate in-process with 2 workers, predict, EXIF and duplicates (~15 s together, besides the shared
`trained_run`). Slow tier: the same under torchrun (training and evaluate) and the 12000x12000 warning
as printed by a real `python -m bfly.train` (10-20 s each).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bfly.core import trained
from bfly.core.data.decode_cache import decode_resized
from bfly.core.data.metadata import load_metadata
from bfly.core.data.pil_input import open_rgb
from bfly.core.data.transforms import build_eval_transform
from bfly.job.train import main as train_main
from bfly.tools import evaluate, predict
from test_bad_input import FIRST_READ, Bad, Workspace, is_the_error, run_bad_case_under_torchrun, torchrun_summary
from test_evaluate_predict import parse_predictions

from conftest import MINI_ROOT, run_python, torchrun
from probes.fault_launch import children, read_rows, replace_image, write_rows

PHOTO = MINI_ROOT / "valid/ADONIS/1.jpg"
BOMB_ERROR = r"too large to decode safely \(Image size \(196000000 pixels\) exceeds limit of 178956970 pixels"


def huge_jpeg(path: Path, side: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (side, side), 128).save(path, quality=10)
    return path


def cp1252_csv(csv_path: Path, row: int, column: str, value: str) -> None:
    """Re-save `csv_path` as a Windows spreadsheet would, with `value` in data row `row` (0-based)."""
    header, rows = read_rows(csv_path)
    rows[row][header.index(column)] = value
    csv_path.write_bytes("\r\n".join(",".join(r) for r in [header, *rows]).encode("cp1252") + b"\r\n")


# --- training: the real trainer, shipped number of loader workers (4) -------------------------------------


def bomb_image(ws):
    path = huge_jpeg(replace_image(ws.data, "train", FIRST_READ, "huge.jpg"), 14000)
    return str(path), BOMB_ERROR


def directory_named_like_an_image(ws):
    path = replace_image(ws.data, "train", 4, "folder.jpg")
    path.mkdir(parents=True)
    return (
        f"{ws.csv()}: 1 path(s) in column 'filepaths' are directories",
        rf"\(first 1: row 6: {re.escape(str(path))}\)$",
    )


def csv_saved_in_cp1252(ws):
    cp1252_csv(ws.csv(), 6, "labels", "CAFÉ AU LAIT")
    return f"{ws.csv()}: row 8: byte 0xc9 is not UTF-8", r"\(row text: .*,CAF\\xc9 AU LAIT,\d\); .*re-save it as UTF-8"


TRAIN_CASES = [bomb_image, directory_named_like_an_image, csv_saved_in_cp1252]


@pytest.mark.parametrize("setup", TRAIN_CASES, ids=lambda f: f.__name__.replace("_", " "))
def test_training_stops_with_one_line_naming_the_file(setup, tiny_data, tmp_path, capsys):
    ws = Workspace(tmp_path, tiny_data)
    culprit, says = setup(ws)
    assert train_main(ws.args(**{"data.workers": 4})) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and is_the_error(err.strip(), culprit, says), err
    assert " step 1/" not in out
    assert children(os.getpid()) == []  # the loader's workers ended with the error


@pytest.mark.slow
def test_training_under_torchrun_names_the_huge_image_on_the_rank_that_met_it(tiny_data, tmp_path):
    """Decoded in a loader worker of one rank (data.workers=2): that rank prints one line, every rank exits."""
    ws = Workspace(tmp_path, tiny_data)

    def setup(ws):
        culprit, says = bomb_image(ws)
        return ws.args(**{"data.workers": 2}), culprit, says

    run_bad_case_under_torchrun(Bad("bomb image", setup), ws)


@pytest.mark.slow
def test_a_large_image_under_the_hard_limit_trains_with_one_warning_naming_it(tiny_data, tmp_path):
    ws = Workspace(tmp_path, tiny_data)
    path = huge_jpeg(replace_image(ws.data, "train", FIRST_READ, "large.jpg"), 12000)
    proc = run_python("-m", "bfly.train", *ws.args(**{"data.workers": 2, "run.stop_after_steps": 1}), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stderr.splitlines() if "decompression-bomb limit" in line]
    assert len(warned) == 1, proc.stderr[-3000:]  # read once, by one worker
    assert warned[0].startswith(f"warning: {path}: 12000x12000 = 144000000 pixels is over Pillow's ")
    assert "decoding it anyway" in warned[0]
    assert "exceeds limit" not in proc.stderr  # Pillow's own warning, which names no file, is not shown
    assert (ws.run / "last.pt").exists()


# --- CSV paths: the same file under two spellings ----------------------------------------------------------


def test_one_image_under_two_spellings_of_its_path_is_a_duplicate(tiny_data, tmp_path):
    ws = Workspace(tmp_path, tiny_data)
    header, rows = read_rows(ws.csv())
    again = list(rows[4])
    again[header.index("filepaths")] = again[header.index("filepaths")].replace("train/", "train/../train/", 1)
    write_rows(ws.csv(), header, rows + [again])
    first = ws.data.resolve() / rows[4][header.index("filepaths")]
    with pytest.warns(
        UserWarning,
        match=rf"^{re.escape(str(ws.csv()))}: split 'train' lists 1 duplicate image "
        rf"path\(s\) \(first 1: rows 6 and {len(rows) + 2}: "
        rf"{re.escape(str(first))} and .*/train/\.\./train/",
    ):
        load_metadata(ws.data)


# --- evaluate --------------------------------------------------------------------------------------------


def one_error(err: str, program: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: ") and "Traceback" not in err, err
    return lines[0]


def test_evaluate_names_the_image_or_csv_that_cannot_be_read(trained_run, tiny_data, tmp_path, capsys):
    best = str(trained_run / "best.pt")
    ws = Workspace(tmp_path, tiny_data)
    path = huge_jpeg(replace_image(ws.data, "valid", 3, "huge.jpg"), 14000)
    args = ["--checkpoint", best, "--split", "valid", "--data-root", str(ws.data), "--workers", "2"]
    assert evaluate.main(args) == 2
    line = one_error(capsys.readouterr().err, "bfly.evaluate")
    assert line.startswith(f"bfly.evaluate: error: {path}: ") and re.search(BOMB_ERROR, line)
    assert children(os.getpid()) == []  # the loader's workers ended with the error, not with this process

    replace_image(ws.data, "valid", 3, "folder.jpg").mkdir()
    assert evaluate.main(args) == 2
    line = one_error(capsys.readouterr().err, "bfly.evaluate")
    assert f"{ws.csv('valid')}: 1 path(s) in column 'filepaths' are directories, not image files " in line
    assert line.endswith(f"row 5: {ws.data.resolve() / 'broken/folder.jpg'})")

    cp1252_csv(ws.csv("valid"), 1, "labels", "CAFÉ")
    assert evaluate.main(args) == 2
    assert f"{ws.csv('valid')}: row 3: byte 0xc9 is not UTF-8" in one_error(capsys.readouterr().err, "bfly.evaluate")


@pytest.mark.slow
def test_evaluate_under_torchrun_names_the_image_on_the_rank_that_met_it(trained_run, tiny_data, tmp_path):
    ws = Workspace(tmp_path, tiny_data)
    path = huge_jpeg(replace_image(ws.data, "valid", 1, "huge.jpg"), 14000)  # row 1: rank 1's shard
    args = ["--checkpoint", str(trained_run / "best.pt"), "--split", "valid", "--data-root", str(ws.data)]
    proc = torchrun(2, "bfly.evaluate", [*args, "--workers", "2"])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bfly.evaluate: error")]
    assert len(errors) == 1 and errors[0].startswith(f"bfly.evaluate: error [rank 1]: {path}: "), proc.stderr[-3000:]
    assert re.search(BOMB_ERROR, errors[0])
    assert proc.stderr.count("Traceback") == 1  # torchrun's own summary, no rank's
    summary = torchrun_summary(proc.stdout + proc.stderr, "bfly.evaluate")
    assert summary.root_cause == 1 and summary.said[1] == errors[0]  # the box names bfly's line, not a crash


# --- predict ----------------------------------------------------------------------------------------------


def test_predict_answers_every_other_file_and_names_each_bad_one(trained_run, tmp_path, capsys):
    good = tmp_path / "photo.jpg"
    good.write_bytes(PHOTO.read_bytes())
    bomb = huge_jpeg(tmp_path / "bomb.jpg", 14000)
    large = huge_jpeg(tmp_path / "large.jpg", 12000)
    folder = tmp_path / "album.jpg"
    folder.mkdir()
    with pytest.warns(Image.DecompressionBombWarning, match=rf"^{re.escape(str(large))}: 12000x12000 = 144000000 "):
        rc = predict.main(["--checkpoint", str(trained_run / "best.pt"), *map(str, [bomb, good, folder, large])])
    out, err = capsys.readouterr()
    assert rc == 1
    assert list(parse_predictions(out)) == [str(good), str(large)]
    errors = err.splitlines()
    assert len(errors) == 2 and "Traceback" not in err, err
    assert errors[0].startswith(f"bfly.predict: error: {bomb}: ") and re.search(BOMB_ERROR, errors[0])
    assert errors[1] == f"bfly.predict: error: {folder}: is a directory, not an image file"


# --- EXIF orientation: read upright everywhere --------------------------------------------------------------

# How a camera stores an upright picture for each EXIF orientation tag (EXIF 2.3, tag 0x0112): 6 is a
# phone held upright (sensor rotated 90 degrees counter-clockwise), 8 the other way, 3 upside down.
STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upright_photo() -> Image.Image:
    with Image.open(PHOTO) as im:
        return im.convert("RGB").resize((96, 64))  # not square: a sideways read has the wrong size too


def tagged_jpeg(path: Path, picture: Image.Image, orientation: int) -> Path:
    stored = picture.transpose(STORED[orientation]) if STORED[orientation] is not None else picture
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, "JPEG", quality=95, exif=exif)
    return path


def distance(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_images_are_read_upright_whatever_their_exif_orientation(orientation, tmp_path):
    picture = upright_photo()
    path = tagged_jpeg(tmp_path / f"orientation-{orientation}.jpg", picture, orientation)
    read = open_rgb(str(path))  # what training's loader workers, compact and predict read
    assert read.size == picture.size and distance(read, picture) < 4
    with Image.open(path) as raw:  # the pixels as stored: sideways, mirrored or upside down
        assert orientation == 1 or raw.size != picture.size or distance(raw.convert("RGB"), picture) > 20
    cached = decode_resized(str(path), 32)  # what the decode cache stores (data.input=cached)
    assert distance(cached, picture.resize((32, 32), Image.BILINEAR)) < 4


def test_predict_classifies_a_phone_photo_upright(trained_run, tmp_path, capsys):
    path = tagged_jpeg(tmp_path / "phone.jpg", upright_photo(), 6)
    best = trained_run / "best.pt"
    assert predict.main(["--checkpoint", str(best), "--top", "10", str(path)]) == 0
    printed = dict(parse_predictions(capsys.readouterr().out)[str(path)])
    saved, cfg, model = trained.load_trained(best)
    transform = build_eval_transform(cfg.data.image_size)
    with Image.open(path) as im:
        stored = im.convert("RGB")
    with torch.no_grad():
        upright, sideways = (
            model(transform(im)[None]).softmax(1)[0].tolist()
            for im in (stored.transpose(Image.Transpose.ROTATE_270), stored)
        )
    names = saved["class_names"]
    assert all(p == pytest.approx(upright[names.index(name)], abs=5.1e-5) for name, p in printed.items())
    assert any(abs(p - sideways[names.index(name)]) > 1e-3 for name, p in printed.items())  # the test can tell
