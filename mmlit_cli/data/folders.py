"""Image folders: one sub-folder per class, optionally split into train/ and val/ or test/.

    root/<class>/*.jpg                          labelled images, one folder per class
    root/train/<class>/*.jpg (+ val/, test/)    the split layout (val/ may be valid/, validation/)
    root/*.jpg                                  unlabelled (pre-training only)

The train (or only) folder decides the classes, in sorted order; val/ and test/ must not have
classes of their own. Without a val/ folder, validation is a stratified part held out of
train (`splits.stratified_holdout`); a test/ folder stays the test split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, listed, one_line, readable
from .decode import decode_labelled, list_images, walk_images
from .splits import ImageData, classes_shown, held_out_digest, held_out_share, stratified_holdout


_SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
_SPLIT_NAMES = {n for names in _SPLIT_DIRS.values() for n in names}


def _subdirs(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder)
                      if not e.name.startswith(".") and e.is_dir())
    except OSError as exc:
        raise DataError(f"cannot read folder {folder} ({one_line(exc)})") from None


def _scan_part(folder: Path, classes: list[str] | None, require_labels: bool,
               one_class: bool = False) -> tuple[list[str], list[str], list[int]]:
    """Scan one folder -> (classes, files, labels); `classes` fixes the label order if given.
    A class is named by its folder's name as text (`readable`: bytes that are not UTF-8 shown
    as U+FFFD), which figures, TensorBoard and exported files can hold. `one_class`: a folder
    of a single class folder is a test set too (`--split all`), not only a training set,
    which needs two."""
    dirs = _subdirs(folder)
    names = {d: readable(d) for d in dirs}
    is_train = classes is None
    if is_train:  # the train (or only) folder decides what the classes are
        if not dirs:
            files = list_images(folder)
            if not files:
                raise DataError(f"no images found in {folder}: expected one sub-folder per class "
                                f"({folder}/<class>/*.jpg)")
            if require_labels:
                raise DataError(f"{folder} has {len(files)} images but no class sub-folders; put "
                                f"them in {folder}/<class>/ (one folder per class, at least 2)")
            return [], files, [-1] * len(files)
        classes = [names[d] for d in dirs]
        if len(set(classes)) < len(classes):
            same = sorted(d for d in dirs if classes.count(names[d]) > 1)
            raise DataError(f"{folder}: class folders {', '.join(map(repr, same[:3]))} differ only in bytes that are "
                            f"not UTF-8, so their classes would have one name: rename them")
        if require_labels and len(classes) < 2 and classes[0].lower() in _SPLIT_NAMES:  # root/val/<class>/ alone
            raise DataError(f"{folder} holds only a {classes[0]}/ folder, no train/: to score its images, pass "
                            f"--dataset {folder / classes[0]} --split all")
        if require_labels and len(classes) < 2 and not one_class:
            raise DataError(f"{folder} has only one class folder ({classes[0]!r}); a classifier "
                            f"needs at least 2 class sub-folders")
    elif not classes:  # unlabeled train folder: its val/test folder is unlabeled too
        files = list_images(folder) or [f for d in dirs for f in walk_images(folder / d)]
        if not files:
            raise DataError(f"no images found in {folder}")
        return [], files, [-1] * len(files)
    else:
        extra = [names[d] for d in dirs if names[d] not in classes]
        if extra:
            raise DataError(f"{folder} has class folder(s) not in the train folder: "
                            f"{', '.join(extra[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for d in dirs:
        found = walk_images(folder / d)
        if not found and is_train:
            raise DataError(f"class folder {folder / d} has no images")
        files += found
        labels += [index[names[d]]] * len(found)
    if not files:
        raise DataError(f"no images found in {folder}")
    return classes, files, labels


def _not_a_class(root: Path, named: dict[str, str]) -> None:
    """In a folder that is not a split layout, a folder named as a split can be a split whose
    classes would otherwise become one class, named 'train' or 'test' (a test set trained on
    under that label). A `train/` is taken for one when it holds class folders and no image;
    a `val/` or `test/` when it holds class folders named as the classes beside it
    (cat/, dog/, test/cat/): a class named valid (of valid/invalid parts) whose images sit in
    sub-folders of their own stays a class."""
    for name, folder in ((n, root / d) for n, d in named.items() if n in _SPLIT_NAMES):
        inner = _subdirs(folder)
        if not inner or list_images(folder):
            continue
        if name == "train":
            others = [d for n, d in named.items() if n != "train"]
            raise DataError(f"{folder} holds class folders, so it looks like a training split, but "
                            f"{', '.join(others[:3])} beside it is not val/, valid/, validation/ or test/: "
                            f"rename it, or move it out of {root}")
        shared = sorted(set(inner) & (set(named.values()) - {folder.name}))
        if shared:
            kind = "test" if name == "test" else "validation"
            raise DataError(f"{folder} holds class folders named as those beside it ({listed(shared, 3)}), so it "
                            f"looks like a {kind} split, but {root} has no train/: move the training class folders "
                            f"into {root / 'train'}, or move {folder.name}/ out of {root}")


@dataclass
class FolderSplit:
    """The files of one split of an image folder, before decoding."""

    classes: list[str]
    files: list[str]
    labels: list[int]
    note: str  # how the split was carved ("'val' split = held-out 10% of train ...")
    part_dir: Path  # the folder its files are in
    held_out: str | None = None  # `splits.held_out_digest` of the files held out of train/, if any


def folder_split(root: Path, split: str, hold: float | None, require_labels: bool) -> FolderSplit:
    """Which files make `split` of the image folder `root` (nothing is decoded). `hold`: the
    fraction of train held out for validation when there is no val/ folder (None: nothing
    held out, the paper protocol). "all": every image of a folder of class folders (a test set
    of one's own), which a folder of train/, val/, test/ folders is not."""
    named = {d.lower(): d for d in _subdirs(root)}  # Train/ and Val/ too, as Kaggle names them
    # root/train/<class>/ (+ val/ or test/); other folders next to train/ and val/ are ignored
    split_layout = "train" in named and (set(named) <= _SPLIT_NAMES or len(set(named) & _SPLIT_NAMES) > 1)
    train_root = root / named["train"] if split_layout else root
    if not split_layout and len(named) > 1:  # (a val/ alone is refused below, saying --split all)
        _not_a_class(root, named)
    if split == "all":
        if split_layout:
            parts = ", ".join(f"{named[n]}/" for n in sorted(set(named) & _SPLIT_NAMES))
            raise DataError(f"image folder {root} has {parts}: --split all is every image of a folder of class "
                            f"folders; pass --split test or val here, or --dataset {root}/<split> --split all")
        classes, files, labels = _scan_part(root, None, require_labels, one_class=True)
        return FolderSplit(list(classes), files, labels, "every image (--split all: nothing held out)", root)

    def find(which: str) -> Path | None:
        for n in _SPLIT_DIRS[which] if split_layout else ():
            if n in named:
                return root / named[n]
        return None

    val_dir, test_dir = find("val"), find("test")
    classes, files, labels = _scan_part(train_root, None, require_labels)
    part_dir = train_root
    # Without a val/ folder, validation is held out of train; a test/ folder stays the test
    # split. A folder with neither uses its held-out part for "test" too.
    held = val_dir is None and hold is not None
    if held:
        train_pos, held_pos = stratified_holdout(labels, hold)
        pct = held_out_share(hold, len(held_pos), len(labels), why=split != "train")
    if split == "train":
        use = "val/test" if test_dir is None else "val; test/ is the test split"
        note = f"'train' split (minus the held-out {pct} used for {use})" if held else "'train' split"
    elif held and (split == "val" or test_dir is None):
        untouched = "; test/ untouched" if test_dir is not None else ""
        how = "stratified" if classes else "at random"  # an unlabelled folder's labels are all -1
        note = f"'{split}' split = held-out {pct} of train ({how}, seed 0{untouched})"
    else:
        held = False
        own, other = (val_dir, test_dir) if split == "val" else (test_dir, val_dir)
        if own is not None:
            part_dir, note = own, f"'{split}' split"
        elif other is not None:
            part_dir, note = other, f"'{split}' split (no {split} folder: using {other.name}/)"
        else:
            raise DataError(f"image folder {root} has no val/ or test/ folder: with nothing held out of its "
                            f"training images it has no '{split}' split")
        _, files, labels = _scan_part(part_dir, classes, require_labels)
    if held:
        keep = train_pos if split == "train" else held_pos
        if not keep:
            raise DataError(f"{train_root}: too few images to hold out a validation split (a class needs at least "
                            f"2 images): add images, or give the folder validation images of its own "
                            f"({root / 'train'}/<class>/ and {root / 'val'}/<class>/)")
        digest = held_out_digest([os.path.relpath(files[i], train_root) for i in held_pos])
        files = [files[i] for i in keep]
        labels = [labels[i] for i in keep]
        return FolderSplit(list(classes), files, labels, note, part_dir, digest)
    return FolderSplit(list(classes), files, labels, note, part_dir)


def load_folder(root: Path, split: str, image_size: int, hold: float | None,
                require_labels: bool) -> ImageData:
    """`split` of the image folder `root` (see `folder_split`), decoded."""
    part = folder_split(root, split, hold, require_labels)
    images, labels_t, skipped = decode_labelled(part.files, part.labels, part.classes, image_size,
                                                f"image folder {part.part_dir}", every_class=split == "train")
    kind = classes_shown(part.classes, labels_t)
    where = f", {part.part_dir.relative_to(root)}/" if part.part_dir != root else ""
    return ImageData(images, labels_t, part.classes,
                     f"image folder {root} {part.note}{where} ({len(labels_t)} images, {kind})",
                     skipped, part.held_out)
