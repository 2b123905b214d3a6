"""Dataset metadata: find the layout, read it, and validate it before training starts.

Three layouts are read:

- "course": ``train.csv``, ``valid.csv``, ``test.csv`` with columns ``filepaths,labels,label_id``;
- "kaggle": one ``butterflies and moths.csv`` with columns ``class id,filepaths,labels,data set``;
- "folders": no CSV at all, torchvision's ImageFolder arrangement: ``train/<class>/<image>``,
  ``valid/`` (or ``val/``) and ``test/`` alike; class ids are the sorted folder names' positions.

A CSV wins over folders. Paths in the CSVs are relative to the dataset root. Where the images also
lie in class folders, an image labelled in the CSV as another folder's class is an error; class
sets or ids that differ from the folders' are a warning (a CSV may rename, select or renumber classes).
Validation never decodes an image (one stat and one access check per file find a missing, empty or
unreadable one), so it is cheap enough to run on every start-up, and every error
names the CSV file, the row (its 1-based line number, header = line 1) and the column, or the
folder or file, so the culprit can be found in an editor or a shell.
"""

from __future__ import annotations

import csv
import os
import re
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SPLIT_NAMES = ("train", "valid", "test")
COURSE_FILES = {name: f"{name}.csv" for name in SPLIT_NAMES}
COURSE_COLUMNS = ("filepaths", "labels", "label_id")
KAGGLE_FILE = "butterflies and moths.csv"
KAGGLE_COLUMNS = ("class id", "filepaths", "labels", "data set")
FOLDERS = "folders"
SPLIT_FOLDERS = {"train": ("train",), "valid": ("valid", "val"), "test": ("test",)}
# torchvision's ImageFolder extensions; compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_INTEGER = re.compile(r"[+-]?[0-9]+")
_MISSING_VALUES = ("", "nan")  # pandas writes NaN as an empty cell; str(NaN) gives "nan"
_MAX_LISTED = 5  # problems quoted in one message; the rest are only counted


class DataError(ValueError):
    """The dataset metadata is unusable; the message names the file, row and column."""


@dataclass(frozen=True, repr=False)
class Split:
    name: str
    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __repr__(self) -> str:
        # The default repr would print every path of a 12k-image split into the logs.
        return f"Split(name={self.name!r}, images={len(self.paths)})"


@dataclass(frozen=True)
class DatasetMeta:
    root: Path
    layout: str
    class_names: tuple[str, ...]
    splits: dict[str, Split]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class _Row:
    file: Path
    line: int
    split: str
    path: str
    class_id: int
    name: str

    @property
    def where(self) -> str:
        return f"{self.file}: row {self.line}"


# Where the data comes from, said with a missing data root.
GET_DATA = (
    ': download the Kaggle dataset "Butterfly & Moths Image Classification 100 species" (gpiosenka), unzip it '
    "there (or set data.root=<folder>; any of the Kaggle CSV, course CSV or class-folder layouts), then check it "
    "with python -m bfly.train --check --config <config>"
)


def load_metadata(
    root: str | Path,
    splits: Sequence[str] = SPLIT_NAMES,
    check_files: bool = True,
) -> DatasetMeta:
    """Read and validate the metadata of the requested splits under ``root``.

    Class ids must be the contiguous range 0..K-1 over the requested splits, with one name per id.
    Raises DataError on anything that would make training wrong; warns on duplicate rows.
    """
    root = Path(root).expanduser().resolve()
    splits = _check_split_names(splits)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root is not a directory{GET_DATA}")
    layout = _detect_layout(root, splits)
    if layout == FOLDERS:
        return _read_folders(root, splits)
    if layout == "course":
        rows = [row for split in splits for row in _read_course_split(root, split)]
        id_column = "label_id"
    else:
        rows = _read_kaggle(root, splits)
        id_column = "class id"
    by_split = {split: [row for row in rows if row.split == split] for split in splits}
    _check_not_empty(root, layout, by_split)
    class_names = _class_names(rows, id_column)
    if check_files:
        _check_files_exist(by_split)
        _compare_with_folders(root, by_split, class_names)
    _warn_duplicates(by_split)
    return DatasetMeta(
        root=root,
        layout=layout,
        class_names=class_names,
        splits={split: _to_split(split, split_rows) for split, split_rows in by_split.items()},
    )


def _check_split_names(splits: Sequence[str]) -> tuple[str, ...]:
    if isinstance(splits, str):  # a bare "train" would otherwise iterate as "t", "r", ...
        splits = (splits,)
    splits = tuple(splits)
    if not splits:
        raise ValueError("no splits requested")
    unknown = [s for s in splits if s not in SPLIT_NAMES]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; valid splits: {list(SPLIT_NAMES)}")
    if len(set(splits)) != len(splits):
        raise ValueError(f"split requested twice: {list(splits)}")
    return splits


def _detect_layout(root: Path, splits: tuple[str, ...]) -> str:
    # Course files win when both CSV layouts are present; the layout field tells which was used.
    if all((root / COURSE_FILES[s]).is_file() for s in splits):
        return "course"
    if (root / KAGGLE_FILE).is_file():
        return "kaggle"
    any_csv = any((root / name).is_file() for name in COURSE_FILES.values())
    # Folders only when there is no CSV at all: an incomplete course layout is a mistake to report,
    # not a reason to read something else.
    if not any_csv and (root / "train").is_dir():
        return FOLDERS
    course = ", ".join(COURSE_FILES[s] for s in splits)
    missing = ", ".join(COURSE_FILES[s] for s in splits if not (root / COURSE_FILES[s]).is_file())
    raise DataError(
        f"{root}: no dataset metadata found; expected the course layout ({course}; "
        f"missing: {missing}), the Kaggle layout ('{KAGGLE_FILE}') or, with no CSV at all, "
        "class folders (train/<class>/<image>, valid/ or val/, test/)"
    )


# --- the folder layout ---------------------------------------------------------------------------


def _split_folder(root: Path, split: str) -> Path | None:
    found = [root / name for name in SPLIT_FOLDERS[split] if (root / name).is_dir()]
    if len(found) > 1:
        raise DataError(f"{root}: both {found[0].name}/ and {found[1].name}/ exist; keep one as the {split!r} split")
    return found[0] if found else None


def _class_folders(split_dir: Path) -> list[str]:
    """The sorted class folder names of a split folder; a loose file there has no class."""
    names = []
    for entry in os.scandir(split_dir):
        if entry.name.startswith("."):
            continue  # .DS_Store and friends
        if not entry.is_dir():
            raise DataError(
                f"{entry.path}: a file directly in the split folder has no class; images go in {split_dir}/<class>/"
            )
        names.append(entry.name)
    if not names:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    return sorted(names)


def _images_of(class_dir: Path) -> list[str]:
    images: list[str] = []
    others: list[str] = []
    for entry in os.scandir(class_dir):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            raise DataError(
                f"{entry.path}: a folder inside class folder {class_dir.name!r}; the folder "
                "layout is one level of class folders holding images"
            )
        (images if entry.name.lower().endswith(IMAGE_EXTENSIONS) else others).append(entry.path)
    if others:
        others.sort()
        raise DataError(
            f"{class_dir}: {len(others)} file(s) that are not images (first {min(len(others), _MAX_LISTED)}: "
            f"{'; '.join(others[:_MAX_LISTED])}); image extensions: {' '.join(IMAGE_EXTENSIONS)}"
        )
    if not images:
        raise DataError(f"{class_dir}: class folder has no images")
    images.sort()
    found = [(path, _file_problem(path)) for path in images]
    for problem in ("empty", "unreadable"):
        bad = [path for path, p in found if p == problem]
        if bad:
            says = _FILE_PROBLEMS[problem][0].replace(" in column 'filepaths'", "")
            raise DataError(
                f"{class_dir}: {len(bad)} {says} (first {min(len(bad), _MAX_LISTED)}: "
                f"{'; '.join(bad[:_MAX_LISTED])}){_FILE_PROBLEMS[problem][1]}"
            )
    return images


def _read_folders(root: Path, splits: tuple[str, ...]) -> DatasetMeta:
    split_dirs = {}
    for split in splits:
        split_dir = _split_folder(root, split)
        if split_dir is None:
            expected = " or ".join(f"{name}/" for name in SPLIT_FOLDERS[split])
            raise DataError(
                f"{root}: split folder {expected} missing (the folder layout has train/, valid/ "
                "or val/, and test/, each with one folder per class)"
            )
        split_dirs[split] = split_dir
    # Class ids come from train/'s folders (the layout is detected by it) even when train is not
    # requested, so that evaluating one split numbers the classes as training did.
    reference = root / "train"
    class_names = _class_folders(reference)
    for split_dir in split_dirs.values():
        names = _class_folders(split_dir)
        if names != class_names:
            raise DataError(
                f"{split_dir}: class folders differ from {reference}'s "
                f"({_set_difference(names, class_names, split_dir.name, reference.name)}); "
                "every split needs the same class folders"
            )
    ids = {name: i for i, name in enumerate(class_names)}
    built = {}
    for split, split_dir in split_dirs.items():
        paths, labels = [], []
        for name in class_names:
            images = _images_of(split_dir / name)
            paths += images
            labels += [ids[name]] * len(images)
        built[split] = Split(name=split, paths=tuple(paths), labels=tuple(labels))
    return DatasetMeta(root=root, layout=FOLDERS, class_names=tuple(class_names), splits=built)


def _set_difference(a: Sequence[str], b: Sequence[str], a_name: str, b_name: str) -> str:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    parts = [
        f"only in {name}: {missing[:_MAX_LISTED]}"
        + (f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else "")
        for name, missing in ((a_name, only_a), (b_name, only_b))
        if missing
    ]
    return "; ".join(parts)


def _compare_with_folders(root: Path, by_split: dict[str, list[_Row]], class_names: tuple[str, ...]) -> None:
    """Where a CSV's images also lie in class folders, say where the two disagree; the CSV is used.

    An image in folder X labelled as another folder's class Y is an error: the two layouts give it
    different classes and one of them is wrong. Class sets or ids that differ are a warning: a CSV
    may rename, select or renumber classes on purpose.
    """
    for split, rows in by_split.items():
        split_dir = next((root / name for name in SPLIT_FOLDERS[split] if (root / name).is_dir()), None)
        if split_dir is None or not rows:
            continue
        folders = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
        if not folders:
            continue  # images flat in the split folder: no folder layout to compare with
        for row in rows:
            parent = os.path.dirname(os.path.normpath(row.path))
            if (
                os.path.dirname(parent) == str(split_dir)
                and os.path.basename(parent) != row.name
                and row.name in folders
            ):
                raise _cell_error(
                    row.file,
                    row.line,
                    "labels",
                    f"{row.name!r}, but the image lies in class folder {parent}; the CSV and the "
                    "folders disagree about this image (fix the row or move the image)",
                )
        labels = sorted({row.name for row in rows})
        if labels != folders:
            warnings.warn(
                f"{rows[0].file}: the CSV's classes of split {split!r} differ from the class folders "
                f"in {split_dir} ({_set_difference(labels, folders, 'the CSV', split_dir.name)}); "
                "the CSV is used",
                stacklevel=3,
            )
        elif split == "train" and tuple(folders) != class_names:
            moved = [
                f"{n!r} is {class_names.index(n)}, folder order {i}"
                for i, n in enumerate(folders)
                if class_names[i] != n
            ]
            warnings.warn(
                f"{rows[0].file}: class ids differ from the sorted class folders' order in {split_dir} "
                f"({'; '.join(moved[:_MAX_LISTED])}); the CSV's ids are used, the folder layout "
                "alone would number the classes differently",
                stacklevel=3,
            )


def _read_course_split(root: Path, split: str) -> list[_Row]:
    csv_path = root / COURSE_FILES[split]
    return [
        _make_row(root, csv_path, line, split, cells, "label_id")
        for line, cells in _read_table(csv_path, COURSE_COLUMNS)
    ]


def _read_kaggle(root: Path, splits: tuple[str, ...]) -> list[_Row]:
    csv_path = root / KAGGLE_FILE
    rows = []
    for line, cells in _read_table(csv_path, KAGGLE_COLUMNS):
        split = cells["data set"]
        if split not in SPLIT_NAMES:
            problem = f"unknown split {split!r}; expected one of {list(SPLIT_NAMES)}"
            raise _cell_error(csv_path, line, "data set", problem)
        if split in splits:
            rows.append(_make_row(root, csv_path, line, split, cells, "class id"))
    return rows


def _read_table(csv_path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Return (line number, {column: stripped non-empty value}) for each data row."""
    _check_utf8(csv_path)
    # newline="" lets the csv module handle the CRLF endings of the Kaggle original;
    # utf-8-sig drops the byte-order mark that spreadsheet exports add.
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        if len(header) == 1 and ";" in header[0]:
            # A spreadsheet in a locale whose decimal mark is a comma saves "CSV" with semicolons.
            raise DataError(
                f"{csv_path}: row 1 (header): one column {header[0]!r}: the file looks ';'-separated; "
                "re-save it with commas ('CSV UTF-8 (Comma delimited)' in a spreadsheet; in Python: "
                f"pandas.read_csv(path, sep=';').to_csv(path, index=False)); expected columns {', '.join(columns)}"
            )
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(
                f"{csv_path}: row 1 (header): missing required column(s) "
                f"{', '.join(repr(c) for c in missing)}; found {header}"
            )
        index = {c: header.index(c) for c in columns}
        table = []
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue  # blank lines, e.g. a trailing one, carry no row
            if len(fields) != len(header):
                raise DataError(
                    f"{csv_path}: row {reader.line_num}: expected {len(header)} fields "
                    f"({', '.join(header)}), found {len(fields)}"
                )
            table.append((reader.line_num, _cells(csv_path, reader.line_num, fields, index)))
    return table


def _check_utf8(csv_path: Path) -> None:
    """A row number and a fix instead of the codec's "can't decode byte 0xe9 in position 4113"."""
    try:
        csv_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        data = e.object  # without the byte-order mark, as e.start counts
        start = data.rfind(b"\n", 0, e.start) + 1
        end = data.find(b"\n", e.start)
        text = data[start : end if end >= 0 else len(data)].rstrip(b"\r").decode("utf-8", "backslashreplace")
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{csv_path}: row {line}: byte 0x{data[e.start]:02x} is not UTF-8 (row text: {text[:120]}); "
            "the file was saved in another encoding (Windows-1252/Latin-1 are common for spreadsheet "
            "exports): re-save it as UTF-8 ('CSV UTF-8' in a spreadsheet)"
        ) from None


def _cells(csv_path: Path, line: int, fields: list[str], index: dict[str, int]) -> dict[str, str]:
    cells = {}
    for column, i in index.items():
        value = fields[i].strip()
        if value.lower() in _MISSING_VALUES:
            raise _cell_error(csv_path, line, column, f"missing value ({fields[i]!r})")
        cells[column] = value
    return cells


def _make_row(root: Path, csv_path: Path, line: int, split: str, cells: dict[str, str], id_column: str) -> _Row:
    value = cells[id_column]
    if not _INTEGER.fullmatch(value):
        raise _cell_error(csv_path, line, id_column, f"class id {value!r} is not an integer")
    return _Row(
        file=csv_path,
        line=line,
        split=split,
        path=os.path.join(root, cells["filepaths"]),  # an absolute CSV path stays as it is
        class_id=int(value),
        name=cells["labels"],
    )


def _cell_error(csv_path: Path, line: int, column: str, problem: str) -> DataError:
    return DataError(f"{csv_path}: row {line}, column {column!r}: {problem}")


def _check_not_empty(root: Path, layout: str, by_split: dict[str, list[_Row]]) -> None:
    for split, rows in by_split.items():
        if not rows:
            source = COURSE_FILES[split] if layout == "course" else f"{KAGGLE_FILE} ('data set' == {split!r})"
            raise DataError(f"{root / source}: split {split!r} has no rows")


def _class_names(rows: list[_Row], id_column: str) -> tuple[str, ...]:
    first_of_id: dict[int, _Row] = {}
    first_of_name: dict[str, _Row] = {}
    for row in rows:
        first = first_of_id.setdefault(row.class_id, row)
        if first.name != row.name:
            raise DataError(
                f"class id {row.class_id} has two names in column 'labels': {first.name!r} at "
                f"{first.where} and {row.name!r} at {row.where}"
            )
        first = first_of_name.setdefault(row.name, row)
        if first.class_id != row.class_id:
            raise DataError(
                f"class {row.name!r} has two ids in column {id_column!r}: {first.class_id} at "
                f"{first.where} and {row.class_id} at {row.where}"
            )
    num_classes = len(first_of_id)
    # K distinct ids are 0..K-1 exactly when none lies outside [0, K).
    for class_id, row in first_of_id.items():
        if not 0 <= class_id < num_classes:
            gaps = sorted(set(range(num_classes)) - first_of_id.keys())
            raise _cell_error(
                row.file,
                row.line,
                id_column,
                f"class id {class_id} is outside [0, {num_classes}): the {num_classes} distinct ids "
                f"must be 0..{num_classes - 1} (absent: {gaps[:_MAX_LISTED]})",
            )
    return tuple(first_of_id[i].name for i in range(num_classes))


# What the start-up check finds wrong with an image file, and how an error says it (the CSV layouts'
# wording, then the fix when there is one).
_FILE_PROBLEMS = {
    "directory": ("path(s) in column 'filepaths' are directories, not image files", ""),
    "missing": (
        "image file(s) in column 'filepaths' do not exist",
        "; paths in the CSV are relative to the dataset root (data.root)",
    ),
    "empty": (
        "image file(s) in column 'filepaths' are empty (0 bytes)",
        "; an interrupted copy or download leaves such files: copy them again",
    ),
    "unreadable": ("image file(s) in column 'filepaths' cannot be read (permission denied)", ""),
}


def _file_problem(path: str) -> str | None:
    """None for a readable, non-empty file, else a key of _FILE_PROBLEMS: one stat and one access check."""
    try:
        st = os.stat(path)
    except PermissionError:
        return "unreadable"  # a folder on its path cannot be searched
    except OSError:
        return "missing"
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if st.st_size == 0:
        return "empty"
    return None if os.access(path, os.R_OK) else "unreadable"


def _check_files_exist(by_split: dict[str, list[_Row]]) -> None:
    for rows in by_split.values():
        found = [(row, _file_problem(row.path)) for row in rows]
        for problem, (says, fix) in _FILE_PROBLEMS.items():
            bad = [row for row, p in found if p == problem]
            if bad:
                listed = "; ".join(f"row {row.line}: {row.path}" for row in bad[:_MAX_LISTED])
                raise DataError(f"{bad[0].file}: {len(bad)} {says} (first {min(len(bad), _MAX_LISTED)}: {listed}){fix}")


def _warn_duplicates(by_split: dict[str, list[_Row]]) -> None:
    for split, rows in by_split.items():
        first: dict[str, _Row] = {}
        duplicates = []
        for row in rows:
            # train/X and train/../train/X are one file: compare the paths spelled the one way.
            seen = first.setdefault(os.path.normpath(row.path), row)
            if seen is not row:
                same = row.path if seen.path == row.path else f"{seen.path} and {row.path}"
                duplicates.append(f"rows {seen.line} and {row.line}: {same}")
        if duplicates:
            warnings.warn(
                f"{rows[0].file}: split {split!r} lists {len(duplicates)} duplicate image path(s) "
                f"(first {min(len(duplicates), _MAX_LISTED)}: {'; '.join(duplicates[:_MAX_LISTED])})",
                stacklevel=3,
            )


def _to_split(name: str, rows: list[_Row]) -> Split:
    return Split(name=name, paths=tuple(r.path for r in rows), labels=tuple(r.class_id for r in rows))
