"""What a split is: `ImageData`, and how a split is carved out of the files a dataset has.

Datasets without a validation split (cifar10, cifar100, svhn, fashion-mnist, image folders
without val/) hold a deterministic stratified part of the training split out for validation
(`stratified_holdout`: per class, seed 0, independent of the training seed), so that model
selection never looks at the test split. Without a hold-out (the paper protocol), "val" is
the test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

SPLITS = ("train", "val", "test")
# what eval and benchmark score: a split, or "all", every image of a folder or label file
EVAL_SPLITS = (*SPLITS, "all")


@dataclass
class ImageData:
    """A fully decoded split: uint8 images already at the model's image size."""

    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]; -1 everywhere when unlabeled
    classes: list[str]  # index = label; [] when unlabeled
    source: str  # one human line describing where the images came from
    skipped: list[str] = field(default_factory=list)  # undecodable files that were skipped
    # Which files were held out of a folder's or label file's training images for validation
    # (`held_out_digest`), in both parts; None where nothing was held out, or for a named
    # dataset, whose files do not change. A run records it: files added to the folder later
    # change which ones the hold-out picks, and its "val" would then hold images it trained on.
    held_out: str | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def skipped_warning(skipped: list[str]) -> str | None:
    """The undecodable files a split left out, in a line (None when there are none): said by
    every command that reads the split, so that no image is dropped without a word."""
    if not skipped:
        return None
    return f"skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}"


def split_note(name: str, split: str, official: str, why: str) -> str:
    """How a requested split is named in `ImageData.source`, saying `why` when it is read
    from another official split."""
    if split == official:
        return f"{name} '{split}' split"
    return f"{name} '{split}' split (= official {official} split; {why})"


def source_line(note: str, where: Path, n: int) -> str:
    """`ImageData.source` of a named dataset: the split's note, where its files are, how many."""
    return f"{note}, {where} ({n} images)"


def official_split(split: str, hold: float | None) -> str:
    """The official split (train or test) a requested split comes from, for a dataset with no
    validation split: "val" is a part of train held out when `hold` (its fraction) is given,
    else the test split (the paper protocol)."""
    return "train" if split == "train" or (split == "val" and hold is not None) else "test"


def requested_part(images: np.ndarray, labels: np.ndarray, name: str, split: str, official: str,
                   hold: float | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, note) of `split` in the official split that was read: all of it, or,
    when a validation part is held out of train, the training part or the held-out part."""
    why = f"{name} has no validation split"
    if official != "train" or hold is None:
        return images, labels, split_note(name, split, official, why)
    train_pos, held_pos = stratified_holdout(labels.tolist(), hold)
    keep = train_pos if split == "train" else held_pos
    if not keep:
        raise DataError(f"{name}: too few images to hold out a validation split (a class needs at least 2 images)")
    pct = held_out_share(hold, len(held_pos), len(labels), why=split != "train")
    if split == "train":
        note = f"{name} 'train' split minus the {pct} held out for validation (stratified, seed 0)"
    else:
        note = (f"{name} 'val' split = {pct} held out of the train split (stratified, seed 0; {why}; "
                f"the test split is untouched)")
    return images[keep], labels[keep], note


def classes_shown(classes: list[str], labels: torch.Tensor) -> str:
    """A split's classes for its data line: "10 classes", or "2 of the 3 classes" when some
    have no image in it (a val/ folder without one)."""
    if not classes:
        return "unlabeled"
    present = labels.unique().numel()
    return f"{len(classes)} classes" if present == len(classes) else f"{present} of the {len(classes)} classes"


def held_out_share(hold: float, held: int, total: int, why: bool = True) -> str:
    """The share of train a stratified hold-out took, for a data line: "10%" as asked, or where
    rounding per class made it another share (each class of 2+ images gives at least one, and
    keeps one), what it took: "29% (58 of 200 images; 10% asked, rounded per class, at least one
    each)"."""
    asked, took = hold * 100, 100 * held / max(total, 1)
    if abs(took - asked) <= 0.5:
        return f"{asked:g}%"
    if not why:  # the training part's line: the validation part's says why
        return f"{took:.3g}%"
    return f"{took:.3g}% ({held:,} of {total:,} images; {asked:g}% asked, rounded per class, at least one each)"


def held_out_count(n: int, val_fraction: float) -> int:
    """How many of a class's `n` training images `stratified_holdout` holds out."""
    return 0 if n < 2 else min(n - 1, max(1, round(val_fraction * n)))


def held_out_digest(names: list[str]) -> str:
    """An identifier of the files held out for validation (names relative to the dataset)."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(names)).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def stratified_holdout(labels: list[int], val_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic stratified split of positions -> (train positions, held-out positions)."""
    by_class: dict[int, list[int]] = {}
    for pos, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(pos)  # positions are in sorted-file order
    train, held = [], []
    for lab in sorted(by_class):
        pos = by_class[lab]
        n = len(pos)
        k = held_out_count(n, val_fraction)
        perm = np.random.default_rng(0).permutation(n)
        out = set(perm[:k].tolist())
        held += [pos[i] for i in range(n) if i in out]
        train += [pos[i] for i in range(n) if i not in out]
    return sorted(train), sorted(held)
