"""Label files: a CSV that names each image and its label, instead of class folders.

    path,label[,split]            header: the image column may also be file, image or filename
    photos/0001.jpg,cat,train     paths relative to the CSV's folder (or absolute)
    photos/0002.jpg,dog,val       split: train, val or test (optional column)

Classes are the labels, sorted (as folder names are), and the images are taken in the order
of their paths, so the same images as a folder give the same split and the same pixels,
whatever the rows' order. With a `split` column the rows say
which split each image is in; a split that no row names is handled as for a folder without
that sub-folder (validation held out of train, stratified, unless the paper protocol). Every
bad row (no file, an empty label, an unknown split, an image that does not decode, a file
listed again) is reported with its line number in one error: nothing trains on a row that
silently failed, and no image is in two splits or has two labels. `valid` and `validation`
are `val`, as for folders.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import DataError, one_line
from .decode import decode_files
from .splits import ImageData, classes_shown, held_out_digest, held_out_share, stratified_holdout

IMAGE_COLUMNS = ("path", "file", "image", "filename")
SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"valid": "val", "validation": "val"}  # as an image folder's valid/ and validation/
_SHOWN = 8  # bad rows listed in the error; the rest are counted


@dataclass
class Row:
    line: int  # line number in the CSV (the header is line 1)
    path: str  # resolved
    label: str
    split: str | None
    given: str  # the path as the CSV writes it, for messages


def is_label_file(path: Path) -> bool:
    return path.suffix.lower() == ".csv" and path.is_file()


def read_rows(csv_path: Path, require_labels: bool) -> list[Row]:
    """The CSV's rows, checked: one `DataError` naming every bad row by its line number."""
    rows, bad = checked_rows(csv_path, require_labels)
    if bad:
        raise _bad_rows(csv_path, bad)
    return rows


def checked_rows(csv_path: Path, require_labels: bool) -> tuple[list[Row], list[tuple[int, str]]]:
    """(the CSV's good rows, its bad ones as (line, problem)); `DataError` if it has no usable
    header or no row at all."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            names = [(name or "").strip().lower() for name in reader.fieldnames or []]
            read = (*IMAGE_COLUMNS, "label", "split")  # a column mmlit does not read may repeat (spreadsheets do)
            twice = sorted({n for n in names if n in read and names.count(n) > 1})
            if twice:  # csv.DictReader would keep the last silently
                raise DataError(f"{csv_path}: the header names {', '.join(map(repr, twice))} more than once")
            header = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
            image_col = next((header[c] for c in IMAGE_COLUMNS if c in header), None)
            if image_col is None:
                raise DataError(f"{csv_path}: no image column in the header (name one of "
                                f"{', '.join(IMAGE_COLUMNS)}; found {', '.join(header) or 'nothing'})")
            label_col, split_col = header.get("label"), header.get("split")
            if label_col is None and require_labels:
                raise DataError(f"{csv_path}: no 'label' column in the header")
            raw = [(reader.line_num, r) for r in reader]
            columns = len(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {csv_path}: {one_line(e)}") from None
    rows, bad = [], []
    first_line: dict[str, int] = {}  # each file's first row: a file listed twice could be in train and val
    for line, r in raw:
        path = (r.get(image_col) or "").strip()
        label = (r.get(label_col) or "").strip() if label_col else ""
        split = (r.get(split_col) or "").strip().lower() if split_col else None
        split = SPLIT_ALIASES.get(split, split)
        full = Path(path).expanduser()
        full = full if full.is_absolute() else csv_path.parent / full
        key = os.path.normpath(full)
        extra = [v for v in r.get(None) or [] if v.strip()]  # fields past the header's (DictReader's restkey)
        if not path:
            bad.append((line, "no image path"))
        elif extra:
            bad.append((line, f"{columns + len(r[None])} fields where the header has {columns} (a path or label "
                              f"with a comma must be in double quotes)"))
        elif key in first_line:
            bad.append((line, f"{path} is listed again (first on line {first_line[key]})"))
        elif full.is_dir():
            bad.append((line, f"{path} is a folder, not an image file"))
        elif not full.is_file():
            bad.append((line, f"{path} not found"))
        elif require_labels and not label:
            bad.append((line, "empty label"))
        elif split_col and split not in SPLIT_NAMES:
            bad.append((line, f"split {split!r} is not train, val or test"))
        else:
            rows.append(Row(line, str(full), label, split or None, path))
        if path:
            first_line.setdefault(key, line)
    if not rows and not bad:
        raise DataError(f"{csv_path}: no rows")
    return rows, bad


def _bad_rows(csv_path: Path, bad: list[tuple[int, str]]) -> DataError:
    """One error for every bad row, (line, problem), in line order."""
    shown = "; ".join(f"line {line}: {problem}" for line, problem in sorted(bad)[:_SHOWN])
    more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    return DataError(f"{csv_path}: {len(bad)} bad row(s): {shown}{more}")


def _undecodable(rows: list[Row], ok: list[bool]) -> list[tuple[int, str]]:
    """The rows whose file did not decode (`ok`: decode_files' verdicts), as (line, problem)."""
    return [(r.line, f"{r.given} does not decode as an image") for r, good in zip(rows, ok) if not good]


def label_file_split(csv_path: Path, split: str, hold: float | None,
                     require_labels: bool) -> tuple[list[Row], list[str], str]:
    """(rows of `split`, classes, how they were chosen), nothing decoded."""
    return _split(csv_path, read_rows(csv_path, require_labels), split, hold, require_labels)[:3]


def _split(csv_path: Path, rows: list[Row], split: str, hold: float | None,
           require_labels: bool) -> tuple[list[Row], list[str], str, str | None]:
    rows = sorted(rows, key=lambda r: r.path)  # as a folder lists its files
    classes = sorted({r.label for r in rows if r.label})
    if require_labels:  # what a folder's classes must be, a label file's must be too
        if len(classes) < 2 and split != "all":  # (a test set of one class is scored, not trained on)
            raise DataError(f"{csv_path}: every row has the label {classes[0]!r}; a classifier needs at least 2 "
                            f"classes")
        trained = {r.label for r in rows if r.split in (None, "train")}
        extra = [c for c in classes if c not in trained]
        if extra and split != "all":
            raise DataError(f"{csv_path}: label(s) in val/test rows but in no train row: {', '.join(extra[:5])}")
    part, note, held_out = _split_rows(csv_path, rows, split, hold, classes)
    return part, classes, note, held_out


def load_label_file(csv_path: Path, split: str, image_size: int, hold: float | None,
                    require_labels: bool) -> ImageData:
    """`split` of the CSV's images, decoded. `hold`: the fraction of train held out for
    validation when no row is in `val` (None: nothing held out, the paper protocol). A CSV with
    bad rows is reported whole, in one error: every bad row and every file that does not decode,
    in any split (the rows not yet decoded are decoded for it, on this failing path only), so
    that one run shows the user all there is to mend."""
    rows, bad = checked_rows(csv_path, require_labels)
    if not bad:
        part, classes, note, held_out = _split(csv_path, rows, split, hold, require_labels)
        images, ok = decode_files([r.path for r in part], image_size)
        if all(ok):
            return replace(_image_data(csv_path, part, classes, note, images), held_out=held_out)
        bad, decoded = _undecodable(part, ok), {r.line for r in part}
        rows = [r for r in rows if r.line not in decoded]
    _, ok = decode_files([r.path for r in rows], image_size)
    raise _bad_rows(csv_path, bad + _undecodable(rows, ok))


def _image_data(csv_path: Path, part: list[Row], classes: list[str], note: str, images) -> ImageData:
    labelled = bool(classes)
    index = {c: i for i, c in enumerate(classes)}
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([index[r.label] if labelled else -1 for r in part], dtype=torch.int64)
    return ImageData(tensor, labels, classes, f"label file {csv_path} {note} ({len(part)} images, "
                                              f"{classes_shown(classes, labels)})")


def _split_rows(csv_path: Path, rows: list[Row], split: str, hold: float | None,
                classes: list[str]) -> tuple[list[Row], str, str | None]:
    """The rows of `split`, how they were chosen, and the `held_out_digest` of the rows held out
    of train (None if none): as for an image folder whose train/, val/ and test/ folders are the
    rows' splits (see `folders.folder_split`)."""
    if split == "all":  # every row, whatever its split: a label file of one's own test images
        return rows, "every row (--split all: any split, nothing held out)", None
    by_split = {name: [r for r in rows if r.split == name] for name in ("val", "test")}
    train = [r for r in rows if r.split in (None, "train")]
    held = not by_split["val"] and hold is not None
    if split == "train" or (held and (split == "val" or not by_split["test"])):
        if not held:
            return train, "'train' split", None
        index = {c: i for i, c in enumerate(classes)}
        train_pos, held_pos = stratified_holdout([index.get(r.label, 0) for r in train], hold)
        keep = train_pos if split == "train" else held_pos
        if not keep:
            raise DataError(f"{csv_path}: too few images to hold out a validation split (a class needs at "
                            f"least 2): add images, or rows whose split is val")
        pct = held_out_share(hold, len(held_pos), len(train), why=split != "train")
        note = f"'train' split (minus the held-out {pct})" if split == "train" else \
            f"'{split}' split = held-out {pct} of train ({'stratified' if classes else 'at random'}, seed 0)"
        return [train[i] for i in keep], note, held_out_digest([os.path.relpath(train[i].path, csv_path.parent)
                                                                for i in held_pos])
    other = "test" if split == "val" else "val"
    if by_split[split]:
        return by_split[split], f"'{split}' split (its rows)", None
    if by_split[other]:
        return by_split[other], f"'{split}' split (no {split} rows: using the {other} rows)", None
    raise DataError(f"{csv_path}: no row is in the val or test split, and with nothing held out of train "
                    f"there is no '{split}' split")
