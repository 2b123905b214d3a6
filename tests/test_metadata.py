"""Spec of load_metadata: both CSV layouts, and a clear DataError for every kind of broken metadata."""

import os
import shutil
import time
from pathlib import Path

import pytest

from bfly.core.data.metadata import KAGGLE_FILE, DataError, DatasetMeta, Split, load_metadata

from conftest import MINI_ROOT as MINI, folder_copy

# The full Kaggle dataset, for the two tests that need it: BFLY_FULL_DATA=<its folder> (else they skip).
FULL_DATA = Path(os.environ["BFLY_FULL_DATA"]) if os.environ.get("BFLY_FULL_DATA") else None


def read_lines(csv_path: Path) -> list[str]:
    return csv_path.read_text().splitlines()


def write_lines(csv_path: Path, lines: list[str], newline: str = "\n") -> None:
    csv_path.write_text(newline.join(lines) + newline)


def set_line(csv_path: Path, line_number: int, text: str) -> None:
    """Replace 1-based line ``line_number`` (header = 1) of ``csv_path``."""
    lines = read_lines(csv_path)
    lines[line_number - 1] = text
    write_lines(csv_path, lines)


def set_cell(csv_path: Path, line_number: int, column: int, value: str) -> None:
    fields = read_lines(csv_path)[line_number - 1].split(",")
    fields[column] = value
    set_line(csv_path, line_number, ",".join(fields))


def kaggle_only(root: Path) -> Path:
    for split in ("train", "valid", "test"):
        (root / f"{split}.csv").unlink()
    return root


def pairs(split: Split) -> list[tuple[str, int]]:
    return sorted(zip(split.paths, split.labels))


# --- both layouts -------------------------------------------------------------------------------


def test_course_layout_reads_every_split(mini_root_meta):
    meta = load_metadata(mini_root_meta)
    assert isinstance(meta, DatasetMeta)
    assert meta.layout == "course"
    assert meta.root == mini_root_meta
    assert meta.num_classes == 10
    assert meta.class_names[0] == "ADONIS"
    assert {name: len(s.paths) for name, s in meta.splits.items()} == {"train": 300, "valid": 50, "test": 50}
    for name, split in meta.splits.items():
        assert split.name == name
        assert len(split.labels) == len(split.paths)
        for path, label in zip(split.paths, split.labels):
            assert os.path.isabs(path) and os.path.isfile(path)
            assert Path(path).parent.name == meta.class_names[label]  # folder name = class name


def test_kaggle_layout_gives_the_same_labels_and_class_names(mini_copy_meta, mini_root_meta):
    course = load_metadata(mini_root_meta)
    kaggle = load_metadata(kaggle_only(mini_copy_meta))
    assert kaggle.layout == "kaggle"
    assert kaggle.class_names == course.class_names
    for name in ("train", "valid", "test"):
        relative = [(os.path.relpath(p, kaggle.root), y) for p, y in pairs(kaggle.splits[name])]
        assert relative == [(os.path.relpath(p, course.root), y) for p, y in pairs(course.splits[name])]


def test_kaggle_csv_with_crlf_endings_and_no_final_newline_reads_like_lf(mini_copy_meta):
    root = kaggle_only(mini_copy_meta)
    expected = load_metadata(root)
    csv_path = root / KAGGLE_FILE
    csv_path.write_bytes("\r\n".join(read_lines(csv_path)).encode())  # as in the Kaggle original
    assert load_metadata(root) == expected


def test_course_layout_is_preferred_when_both_are_present(mini_root_meta):
    assert (mini_root_meta / KAGGLE_FILE).is_file()
    assert load_metadata(mini_root_meta).layout == "course"


def test_kaggle_layout_is_used_when_a_requested_course_csv_is_absent(mini_copy_meta):
    (mini_copy_meta / "test.csv").unlink()
    assert load_metadata(mini_copy_meta, splits=("train", "valid")).layout == "course"
    assert load_metadata(mini_copy_meta).layout == "kaggle"


@pytest.mark.parametrize("layout", ["course", "kaggle"])
def test_only_requested_splits_are_loaded(mini_copy_meta, layout):
    root = mini_copy_meta if layout == "course" else kaggle_only(mini_copy_meta)
    meta = load_metadata(root, splits=("valid",))
    assert list(meta.splits) == ["valid"]
    assert len(meta.splits["valid"].paths) == 50


def test_a_bare_split_name_means_that_one_split(mini_root_meta):
    assert list(load_metadata(mini_root_meta, splits="test").splits) == ["test"]


@pytest.mark.parametrize("splits", [(), ("train", "validation"), ("train", "train")])
def test_bad_split_requests_are_rejected(mini_root_meta, splits):
    with pytest.raises(ValueError, match="split"):
        load_metadata(mini_root_meta, splits=splits)


def test_split_repr_counts_images_instead_of_listing_them(mini_root_meta):
    assert repr(load_metadata(mini_root_meta).splits["train"]) == "Split(name='train', images=300)"


# --- layout and column errors -------------------------------------------------------------------


def test_folder_without_metadata_names_folder_and_expected_files(tmp_path):
    with pytest.raises(DataError) as error:
        load_metadata(tmp_path)
    message = str(error.value)
    for expected in (str(tmp_path), "train.csv", "valid.csv", "test.csv", KAGGLE_FILE):
        assert expected in message


def test_missing_root_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_metadata(tmp_path / "nowhere")


@pytest.mark.parametrize("column", ["filepaths", "labels", "label_id"])
def test_course_csv_without_a_required_column(mini_copy_meta, column):
    csv_path = mini_copy_meta / "valid.csv"
    lines = read_lines(csv_path)
    lines[0] = lines[0].replace(column, "something_else")
    write_lines(csv_path, lines)
    with pytest.raises(DataError) as error:
        load_metadata(mini_copy_meta)
    assert str(csv_path) in str(error.value)
    assert "row 1" in str(error.value)
    assert f"'{column}'" in str(error.value)


def test_kaggle_csv_without_the_split_column(mini_copy_meta):
    csv_path = kaggle_only(mini_copy_meta) / KAGGLE_FILE
    set_line(csv_path, 1, "class id,filepaths,labels,split")
    with pytest.raises(DataError, match=r"butterflies and moths\.csv: row 1 .*'data set'"):
        load_metadata(mini_copy_meta)


def test_row_with_wrong_number_of_fields(mini_copy_meta):
    set_line(mini_copy_meta / "train.csv", 4, "train/ADONIS/013.jpg,ADONIS")
    with pytest.raises(DataError, match=r"train\.csv: row 4: expected 3 fields .* found 2"):
        load_metadata(mini_copy_meta)


def test_blank_lines_are_not_rows(mini_copy_meta):
    csv_path = mini_copy_meta / "test.csv"
    write_lines(csv_path, read_lines(csv_path) + ["", ""])
    assert len(load_metadata(mini_copy_meta).splits["test"].paths) == 50


# --- cell errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("column, index", [("filepaths", 0), ("labels", 1), ("label_id", 2)])
@pytest.mark.parametrize("value", ["", "  ", "nan", "NaN"])
def test_empty_or_nan_cell(mini_copy_meta, column, index, value):
    csv_path = mini_copy_meta / "train.csv"
    set_cell(csv_path, 7, index, value)
    with pytest.raises(DataError) as error:
        load_metadata(mini_copy_meta)
    assert f"{csv_path}: row 7, column '{column}': missing value" in str(error.value)


@pytest.mark.parametrize("value", ["abc", "3.0", "2.5", "1e1", "0x3"])
def test_non_integer_class_id(mini_copy_meta, value):
    csv_path = mini_copy_meta / "train.csv"
    set_cell(csv_path, 3, 2, value)
    with pytest.raises(DataError) as error:
        load_metadata(mini_copy_meta)
    assert f"{csv_path}: row 3, column 'label_id': class id '{value}' is not an integer" in str(error.value)


def test_non_integer_class_id_in_kaggle_layout(mini_copy_meta):
    csv_path = kaggle_only(mini_copy_meta) / KAGGLE_FILE
    set_cell(csv_path, 12, 0, "one")
    with pytest.raises(DataError, match=r"butterflies and moths\.csv: row 12, column 'class id': .*'one'"):
        load_metadata(mini_copy_meta)


def test_unknown_value_in_data_set_column(mini_copy_meta):
    csv_path = kaggle_only(mini_copy_meta) / KAGGLE_FILE
    set_cell(csv_path, 5, 3, "validation")
    with pytest.raises(DataError, match=r"row 5, column 'data set': unknown split 'validation'"):
        load_metadata(mini_copy_meta)


@pytest.mark.parametrize("class_id", ["11", "-1"])
def test_class_id_out_of_range(mini_copy_meta, class_id):
    # A new class name keeps id <-> name consistent, so only the range is wrong:
    # the 11 distinct ids must be 0..10.
    csv_path = mini_copy_meta / "test.csv"
    set_line(csv_path, 9, f"test/ADONIS/1.jpg,NEW CLASS,{class_id}")
    with pytest.raises(DataError) as error:
        load_metadata(mini_copy_meta)
    message = str(error.value)
    assert f"{csv_path}: row 9, column 'label_id': class id {class_id} is outside [0, 11)" in message
    assert "absent: [10]" in message


def test_class_ids_with_a_gap(mini_copy_meta):
    # Renumber class 9 to 10 everywhere: 10 distinct ids, but 9 is absent.
    for name in ("train", "valid", "test"):
        csv_path = mini_copy_meta / f"{name}.csv"
        write_lines(csv_path, [line[:-2] + ",10" if line.endswith(",9") else line for line in read_lines(csv_path)])
    with pytest.raises(DataError) as error:
        load_metadata(mini_copy_meta)
    message = str(error.value)
    assert "train.csv: row " in message and "column 'label_id'" in message
    assert "class id 10 is outside [0, 10)" in message and "absent: [9]" in message


def test_one_class_id_with_two_names(mini_copy_meta):
    csv_path = mini_copy_meta / "valid.csv"
    first = read_lines(csv_path)[1]  # valid/HERCULES MOTH/4.jpg,HERCULES MOTH,5
    assert first.endswith(",HERCULES MOTH,5")
    set_cell(csv_path, 2, 1, "HERCULES BEETLE")
    with pytest.raises(DataError) as error:
        load_metadata(mini_copy_meta)
    message = str(error.value)
    assert "class id 5 has two names in column 'labels'" in message
    assert "'HERCULES MOTH' at " in message and "train.csv: row " in message  # the first use, in train
    assert f"'HERCULES BEETLE' at {csv_path}: row 2" in message


def test_one_class_name_with_two_ids(mini_copy_meta):
    csv_path = mini_copy_meta / "train.csv"
    # A class name nobody else uses, under two different fresh ids, leaves no other clash.
    set_line(csv_path, 2, "train/MANGROVE SKIPPER/029.jpg,NEW CLASS,20")
    set_line(csv_path, 5, "train/PAINTED LADY/012.jpg,NEW CLASS,21")
    with pytest.raises(DataError) as error:
        load_metadata(mini_copy_meta)
    assert (
        f"class 'NEW CLASS' has two ids in column 'label_id': 20 at {csv_path}: row 2 and 21 at {csv_path}: row 5"
        in str(error.value)
    )


# --- split, file and duplicate checks -----------------------------------------------------------


def test_empty_course_split(mini_copy_meta):
    csv_path = mini_copy_meta / "valid.csv"
    write_lines(csv_path, read_lines(csv_path)[:1])
    with pytest.raises(DataError, match=r"valid\.csv: split 'valid' has no rows"):
        load_metadata(mini_copy_meta)


def test_empty_kaggle_split(mini_copy_meta):
    csv_path = kaggle_only(mini_copy_meta) / KAGGLE_FILE
    write_lines(csv_path, [line for line in read_lines(csv_path) if not line.endswith(",test")])
    expected = r"butterflies and moths\.csv \('data set' == 'test'\): split 'test' has no rows"
    with pytest.raises(DataError, match=expected):
        load_metadata(mini_copy_meta)
    assert list(load_metadata(mini_copy_meta, splits=("train", "valid")).splits) == ["train", "valid"]


def test_missing_image_file(mini_copy_meta):
    csv_path = mini_copy_meta / "train.csv"
    set_line(csv_path, 6, "train/ADONIS/999.jpg,ADONIS,0")
    with pytest.raises(DataError) as error:
        load_metadata(mini_copy_meta)
    message = str(error.value)
    assert f"{csv_path}: 1 image file(s) in column 'filepaths' do not exist" in message
    assert f"row 6: {mini_copy_meta / 'train/ADONIS/999.jpg'}" in message


def test_many_missing_image_files_are_counted_and_the_first_five_listed(mini_copy_meta):
    csv_path = mini_copy_meta / "test.csv"
    for line in range(2, 9):
        set_cell(csv_path, line, 0, f"test/GONE/{line}.jpg")
    with pytest.raises(DataError) as error:
        load_metadata(mini_copy_meta)
    message = str(error.value)
    assert "7 image file(s)" in message and "(first 5: row 2: " in message
    assert "row 6: " in message and "row 7: " not in message


def test_a_directory_is_not_an_image_file(mini_copy_meta):
    set_cell(mini_copy_meta / "valid.csv", 2, 0, "valid/HERCULES MOTH")
    with pytest.raises(
        DataError,
        match=r"valid\.csv: 1 path\(s\) in column 'filepaths' are directories, "
        r"not image files \(first 1: row 2: .*/valid/HERCULES MOTH\)$",
    ):
        load_metadata(mini_copy_meta)


def test_file_check_can_be_turned_off(mini_copy_meta):
    set_cell(mini_copy_meta / "train.csv", 6, 0, "train/ADONIS/999.jpg")
    meta = load_metadata(mini_copy_meta, check_files=False)
    assert str(mini_copy_meta / "train/ADONIS/999.jpg") in meta.splits["train"].paths


def test_duplicate_rows_warn_but_load(mini_copy_meta):
    csv_path = mini_copy_meta / "train.csv"
    lines = read_lines(csv_path)
    write_lines(csv_path, lines + [lines[1], lines[1], lines[4]])  # lines 302-304 repeat rows 2, 2, 5
    with pytest.warns(UserWarning) as record:
        meta = load_metadata(mini_copy_meta)
    assert len(record) == 1
    message = str(record[0].message)
    assert str(csv_path) in message and "split 'train' lists 3 duplicate image path(s)" in message
    assert "rows 2 and 302" in message and "rows 2 and 303" in message and "rows 5 and 304" in message
    assert len(meta.splits["train"].paths) == 303


def test_same_image_in_two_splits_is_not_a_duplicate(mini_copy_meta, recwarn):
    csv_path = mini_copy_meta / "valid.csv"
    write_lines(csv_path, read_lines(csv_path) + ["train/ADONIS/013.jpg,ADONIS,0"])
    load_metadata(mini_copy_meta)
    assert not [w for w in recwarn if "duplicate" in str(w.message)]


# --- the full dataset, where it is present ------------------------------------------------------

needs_full_data = pytest.mark.skipif(
    FULL_DATA is None or not (FULL_DATA / KAGGLE_FILE).is_file(),
    reason="set BFLY_FULL_DATA to the full dataset's folder",
)


@needs_full_data
def test_full_kaggle_dataset_loads_fast():
    start = time.perf_counter()
    meta = load_metadata(FULL_DATA)
    seconds = time.perf_counter() - start
    assert meta.layout == "kaggle" and meta.num_classes == 100
    assert {name: len(s.paths) for name, s in meta.splits.items()} == {"train": 12594, "valid": 500, "test": 500}
    assert seconds < 2.0


# --- the folder layout (no CSV): train/<class>/<image>, valid/ or val/, test/ ---------------------


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    """3 train, 2 valid and 2 test images per class (linking all 400 costs a second per test)."""
    return folder_copy(tmp_path / "folders", {"train": 3, "valid": 2, "test": 2})


def test_folder_layout_numbers_classes_by_sorted_folder_name(tmp_path, mini_root_meta):
    folders = folder_copy(tmp_path / "folders")
    meta = load_metadata(folders)
    course = load_metadata(mini_root_meta)
    assert meta.layout == "folders"
    assert meta.class_names == tuple(sorted(p.name for p in (folders / "train").iterdir()))
    assert meta.class_names == course.class_names  # the mini CSVs number the classes the same way
    assert {name: len(s.paths) for name, s in meta.splits.items()} == {"train": 300, "valid": 50, "test": 50}
    for name in ("train", "valid", "test"):
        assert [(os.path.relpath(p, folders), y) for p, y in pairs(meta.splits[name])] == [
            (os.path.relpath(p, mini_root_meta), y) for p, y in pairs(course.splits[name])
        ]


def test_folder_layout_accepts_val_for_valid_and_ignores_hidden_files(folders):
    (folders / "valid").rename(folders / "val")
    (folders / "train" / ".DS_Store").write_bytes(b"\0")
    (folders / "train" / "ADONIS" / "._001.jpg").write_bytes(b"\0")  # macOS resource fork
    meta = load_metadata(folders)
    assert len(meta.splits["valid"].paths) == 20 and len(meta.splits["train"].paths) == 30


def test_folder_layout_loads_only_the_requested_splits(folders):
    shutil.rmtree(folders / "test")
    assert list(load_metadata(folders, splits=("train", "valid")).splits) == ["train", "valid"]


def test_folder_layout_evaluating_one_split_numbers_classes_as_training(folders):
    assert load_metadata(folders, splits=("valid",)).class_names == load_metadata(folders).class_names


def folder_error(root: Path, **kw) -> str:
    with pytest.raises(DataError) as error:
        load_metadata(root, **kw)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_folder_layout_missing_split_folder(folders):
    shutil.rmtree(folders / "test")
    message = folder_error(folders)
    assert f"{folders}: split folder test/ missing" in message


def test_folder_layout_both_valid_and_val(folders):
    shutil.copytree(folders / "valid", folders / "val", symlinks=True)
    assert f"{folders}: both valid/ and val/ exist" in folder_error(folders)


def test_folder_layout_empty_class_folder(folders):
    shutil.rmtree(folders / "valid" / "ADONIS")
    (folders / "valid" / "ADONIS").mkdir()
    assert folder_error(folders) == f"{folders / 'valid' / 'ADONIS'}: class folder has no images"


def test_folder_layout_class_sets_differ_between_splits(folders):
    shutil.rmtree(folders / "valid" / "ADONIS")
    (folders / "valid" / "MONARCH").mkdir()
    message = folder_error(folders)
    assert message.startswith(f"{folders / 'valid'}: class folders differ from {folders / 'train'}'s")
    assert "only in valid: ['MONARCH']" in message and "only in train: ['ADONIS']" in message


def test_folder_layout_non_image_files_are_named(folders):
    for name in ("notes.txt", "labels.csv"):
        (folders / "train" / "ADONIS" / name).write_text("x")
    message = folder_error(folders)
    assert message.startswith(f"{folders / 'train' / 'ADONIS'}: 2 file(s) that are not images")
    assert str(folders / "train" / "ADONIS" / "labels.csv") in message and ".jpg" in message


def test_folder_layout_image_directly_in_a_split_folder(folders):
    (folders / "test" / "stray.jpg").symlink_to(MINI / "test" / "ADONIS" / "001.jpg")
    assert folder_error(folders).startswith(f"{folders / 'test' / 'stray.jpg'}: a file directly in the split folder")


def test_folder_layout_nested_folder_in_a_class(folders):
    (folders / "train" / "ADONIS" / "more").mkdir()
    assert folder_error(folders).startswith(f"{folders / 'train' / 'ADONIS' / 'more'}: a folder inside class folder")


def test_folder_layout_split_without_class_folders(folders):
    shutil.rmtree(folders / "valid")
    (folders / "valid").mkdir()
    assert folder_error(folders).startswith(f"{folders / 'valid'}: no class folders")


def test_a_partial_course_layout_is_not_read_as_folders(folders):
    (folders / "train.csv").write_text((MINI / "train.csv").read_text())
    message = folder_error(folders)
    assert "no dataset metadata found" in message and "missing: valid.csv, test.csv" in message


# --- a CSV over class folders: the CSV is used, disagreements are reported --------------------------


def test_csv_labelling_an_image_as_another_folders_class_is_an_error(mini_copy_meta):
    csv_path = mini_copy_meta / "train.csv"
    set_line(csv_path, 4, "train/ADONIS/013.jpg,PAINTED LADY,7")  # a valid row, but the folder says ADONIS
    message = folder_error(mini_copy_meta)
    assert message.startswith(
        f"{csv_path}: row 4, column 'labels': 'PAINTED LADY', but the image lies in "
        f"class folder {mini_copy_meta / 'train' / 'ADONIS'}; the CSV and the folders disagree"
    )


def test_a_class_renamed_in_the_csv_warns_and_the_csv_is_used(mini_copy_meta):
    for split in ("train", "valid", "test"):
        lines = read_lines(mini_copy_meta / f"{split}.csv")
        write_lines(mini_copy_meta / f"{split}.csv", [ln.replace(",ADONIS,", ",MONARCH,") for ln in lines])
    with pytest.warns(UserWarning) as record:
        meta = load_metadata(mini_copy_meta)
    assert meta.class_names[0] == "MONARCH"
    assert [str(w.message) for w in record] == [
        f"{mini_copy_meta / split}.csv: the CSV's classes of split {split!r} differ from the class folders in "
        f"{mini_copy_meta / split} (only in the CSV: ['MONARCH']; only in {split}: ['ADONIS']); the CSV is used"
        for split in ("train", "valid", "test")
    ]


def test_csv_with_fewer_classes_than_folders_warns_and_is_used(mini_copy_meta):
    for split in ("train", "valid", "test"):
        lines = read_lines(mini_copy_meta / f"{split}.csv")
        write_lines(mini_copy_meta / f"{split}.csv", [ln for ln in lines if not ln.endswith(",9")])
    with pytest.warns(UserWarning) as record:
        meta = load_metadata(mini_copy_meta)
    assert meta.num_classes == 9
    assert [str(w.message) for w in record] == [
        f"{mini_copy_meta / split}.csv: the CSV's classes of split {split!r} differ from the class folders in "
        f"{mini_copy_meta / split} (only in {split}: ['SOUTHERN DOGFACE']); the CSV is used"
        for split in ("train", "valid", "test")
    ]


def test_csv_ids_in_another_order_than_the_folders_warn(mini_copy_meta):
    for split in ("train", "valid", "test"):  # swap ids 0 and 1
        lines = read_lines(mini_copy_meta / f"{split}.csv")
        swapped = [ln[:-2] + {",0": ",1", ",1": ",0"}.get(ln[-2:], ln[-2:]) for ln in lines[1:]]
        write_lines(mini_copy_meta / f"{split}.csv", lines[:1] + swapped)
    with pytest.warns(UserWarning, match="class ids differ from the sorted class folders' order") as record:
        meta = load_metadata(mini_copy_meta)
    assert "'ADONIS' is 1, folder order 0" in str(record[0].message)
    assert meta.class_names[:2] == ("BANDED TIGER MOTH", "ADONIS")


@needs_full_data
def test_full_dataset_as_folders_matches_its_csv(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / split).symlink_to(FULL_DATA / split, target_is_directory=True)
    folders, kaggle = load_metadata(tmp_path), load_metadata(FULL_DATA)
    assert folders.class_names == kaggle.class_names
    for name in ("train", "valid", "test"):
        relative = [(os.path.relpath(p, tmp_path), y) for p, y in pairs(folders.splits[name])]
        assert relative == [(os.path.relpath(p, FULL_DATA), y) for p, y in pairs(kaggle.splits[name])]
