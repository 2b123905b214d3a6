"""Spec of load_metadata: both CSV layouts, and a clear DataError for every kind of broken metadata."""

import os
import time
from pathlib import Path

import pytest

from bfly.data.metadata import KAGGLE_FILE, DataError, DatasetMeta, Split, load_metadata

FULL_DATA = Path(os.environ.get("BFLY_FULL_DATA", "/work/fulldata/archive"))


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
    with pytest.raises(DataError, match=r"valid\.csv: 1 path\(s\) in column 'filepaths' are directories, "
                                        r"not image files \(first 1: row 2: .*/valid/HERCULES MOTH\)$"):
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


@pytest.mark.skipif(not (FULL_DATA / KAGGLE_FILE).is_file(), reason=f"full dataset not at {FULL_DATA}")
def test_full_kaggle_dataset_loads_fast():
    start = time.perf_counter()
    meta = load_metadata(FULL_DATA)
    seconds = time.perf_counter() - start
    assert meta.layout == "kaggle" and meta.num_classes == 100
    assert {name: len(s.paths) for name, s in meta.splits.items()} == {"train": 12594, "valid": 500, "test": 500}
    assert seconds < 2.0
