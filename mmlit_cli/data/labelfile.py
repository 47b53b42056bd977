"""Label files: a CSV that names each image and its label, instead of class folders.

    path,label[,split]            header: the image column may also be file, image or filename
    photos/0001.jpg,cat,train     paths relative to the CSV's folder (or absolute)
    photos/0002.jpg,dog,val       split: train, val or test (optional column)

Classes are the labels, sorted (as folder names are), and the images are taken in the order
of their paths, so the same images as a folder give the same split and the same pixels,
whatever the rows' order. With a `split` column the rows say
which split each image is in; a split that no row names is handled as for a folder without
that sub-folder (validation held out of train, stratified, unless the paper protocol). Every
bad row (no file, an empty label, an unknown split, an image that does not decode) is
reported with its line number in one error: nothing trains on a row that silently failed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError, one_line
from .decode import decode_files
from .splits import ImageData, stratified_holdout

IMAGE_COLUMNS = ("path", "file", "image", "filename")
SPLIT_NAMES = ("train", "val", "test")
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
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
            image_col = next((header[c] for c in IMAGE_COLUMNS if c in header), None)
            if image_col is None:
                raise DataError(f"{csv_path}: no image column in the header (name one of "
                                f"{', '.join(IMAGE_COLUMNS)}; found {', '.join(header) or 'nothing'})")
            label_col, split_col = header.get("label"), header.get("split")
            if label_col is None and require_labels:
                raise DataError(f"{csv_path}: no 'label' column in the header")
            raw = [(reader.line_num, r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {csv_path}: {one_line(e)}") from None
    rows, bad = [], []
    for line, r in raw:
        path = (r.get(image_col) or "").strip()
        label = (r.get(label_col) or "").strip() if label_col else ""
        split = (r.get(split_col) or "").strip().lower() if split_col else None
        full = Path(path).expanduser()
        full = full if full.is_absolute() else csv_path.parent / full
        if not path:
            bad.append(f"line {line}: no image path")
        elif not full.is_file():
            bad.append(f"line {line}: {path} not found")
        elif require_labels and not label:
            bad.append(f"line {line}: empty label")
        elif split_col and split not in SPLIT_NAMES:
            bad.append(f"line {line}: split {split!r} is not train, val or test")
        else:
            rows.append(Row(line, str(full), label, split or None, path))
    _raise_bad(csv_path, bad)
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    return rows


def _raise_bad(csv_path: Path, bad: list[str]) -> None:
    if bad:
        more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise DataError(f"{csv_path}: {len(bad)} bad row(s): {'; '.join(bad[:_SHOWN])}{more}")


def label_file_split(csv_path: Path, split: str, hold: float | None,
                     require_labels: bool) -> tuple[list[Row], list[str], str]:
    """(rows of `split`, classes, how they were chosen), nothing decoded."""
    rows = sorted(read_rows(csv_path, require_labels), key=lambda r: r.path)  # as a folder lists its files
    classes = sorted({r.label for r in rows if r.label})
    part, note = _split_rows(csv_path, rows, split, hold, classes)
    return part, classes, note


def load_label_file(csv_path: Path, split: str, image_size: int, hold: float | None,
                    require_labels: bool) -> ImageData:
    """`split` of the CSV's images, decoded. `hold`: the fraction of train held out for
    validation when no row is in `val` (None: nothing held out, the paper protocol)."""
    part, classes, note = label_file_split(csv_path, split, hold, require_labels)
    labelled = bool(classes)
    index = {c: i for i, c in enumerate(classes)}
    paths = [r.path for r in part]
    images, ok = decode_files(paths, image_size)
    _raise_bad(csv_path, [f"line {r.line}: {r.given} does not decode as an image"
                          for r, good in sorted(zip(part, ok), key=lambda t: t[0].line) if not good])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([index[r.label] if labelled else -1 for r in part], dtype=torch.int64)
    kind = f"{len(classes)} classes" if classes else "unlabeled"
    return ImageData(tensor, labels, classes, f"label file {csv_path} {note} ({len(part)} images, {kind})")


def _split_rows(csv_path: Path, rows: list[Row], split: str, hold: float | None,
                classes: list[str]) -> tuple[list[Row], str]:
    """The rows of `split` and how they were chosen: as for an image folder whose train/,
    val/ and test/ folders are the rows' splits (see `folders.folder_split`)."""
    by_split = {name: [r for r in rows if r.split == name] for name in ("val", "test")}
    train = [r for r in rows if r.split in (None, "train")]
    held = not by_split["val"] and hold is not None
    if split == "train" or (held and (split == "val" or not by_split["test"])):
        if not held:
            return train, "'train' split"
        index = {c: i for i, c in enumerate(classes)}
        train_pos, held_pos = stratified_holdout([index.get(r.label, 0) for r in train], hold)
        keep = train_pos if split == "train" else held_pos
        if not keep:
            raise DataError(f"{csv_path}: too few images to hold out a validation split (a class needs at "
                            f"least 2)")
        pct = f"{hold * 100:g}%"
        note = f"'train' split (minus the held-out {pct})" if split == "train" else \
            f"'{split}' split = held-out {pct} of train (stratified, seed 0)"
        return [train[i] for i in keep], note
    other = "test" if split == "val" else "val"
    if by_split[split]:
        return by_split[split], f"'{split}' split (its rows)"
    if by_split[other]:
        return by_split[other], f"'{split}' split (no {split} rows: using the {other} rows)"
    raise DataError(f"{csv_path}: no row is in the val or test split, and with nothing held out of train "
                    f"there is no '{split}' split")
