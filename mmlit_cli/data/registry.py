"""`load_split`: a named dataset or an image folder -> one decoded split (`ImageData`).

Names (and their aliases) are looked up in `datasets.NAMED_LOADERS`; anything else is taken
as the path of an image folder (`folders.py`). Every split is decoded and resized once, into
one uint8 tensor `[N, 3, S, S]`.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path

from ..errors import DataError, DataNotFound
from .datasets import DATASET_SUBDIRS, NAMED_LOADERS, SAMPLE_DIR
from .folders import folder_split, load_folder
from .labelfile import is_label_file, label_file_split, load_label_file
from .splits import EVAL_SPLITS, SPLITS, ImageData, held_out_count

DATASET_NAMES = tuple(NAMED_LOADERS)

_ALIASES = {name.replace("-", ""): name for name in DATASET_NAMES}
_ALIASES.update({"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist",
                 "fashion_mnist": "fashion-mnist", "tiny_imagenet": "tiny-imagenet",
                 "tinyimagenet": "tiny-imagenet", "oxford-flowers102": "flowers102",
                 "flowers-102": "flowers102"})


def canonical_name(dataset: str) -> str:
    """A dataset name as the registry spells it ("CIFAR-10" -> "cifar10"); a path is returned
    as given (lower-cased only when it is a known name)."""
    name = str(dataset).strip().lower()
    return _ALIASES.get(name, name) if _ALIASES.get(name, name) in DATASET_NAMES else str(dataset)


def is_sample(dataset: str | None) -> bool:
    """Whether `dataset` names the bundled sample (what a run without --dataset trains on)."""
    return dataset is not None and canonical_name(dataset) == "sample"


# The named datasets' official training splits, images per class: what `train_split_size`
# counts without reading them. Flowers102 and Tiny-ImageNet have a validation split of their
# own, so nothing is held out of theirs.
OFFICIAL_TRAIN_COUNTS = {
    "cifar10": [5000] * 10,
    "cifar100": [500] * 100,
    "svhn": [4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595, 5045, 4659],  # digits 0-9, 73,257 in all
    "flowers102": [10] * 102,
    "fashion-mnist": [6000] * 10,
    "tiny-imagenet": [500] * 200,
}
_OWN_VALIDATION = {"flowers102", "tiny-imagenet"}


def train_split_size(dataset: str, val_fraction: float = 0.1, holdout: bool = True,
                     require_labels: bool = True) -> tuple[int, int]:
    """(images, classes) of the "train" split `load_split` gives, counted without decoding
    anything: an image folder (the sample too) is listed, a label file read; a named dataset
    is its official size, less the stratified hold-out. Undecodable files are not known here."""
    name = canonical_name(dataset)
    if name in OFFICIAL_TRAIN_COUNTS:
        counts = OFFICIAL_TRAIN_COUNTS[name]
        if holdout and name not in _OWN_VALIDATION:
            counts = [n - held_out_count(n, val_fraction) for n in counts]
        return sum(counts), len(counts)
    return split_size(dataset, "train", val_fraction, holdout, require_labels)


def split_size(dataset: str, split: str, val_fraction: float = 0.1, holdout: bool = True,
               require_labels: bool = True) -> tuple[int, int]:
    """(images, classes) of `split` of an image folder (the sample too) or a label file, listed
    or read, nothing decoded; the error `load_split` gives where there is no such split. A named
    dataset (it has its splits; it is not read here) is (0, 0)."""
    name = canonical_name(dataset)
    if name in OFFICIAL_TRAIN_COUNTS:
        return 0, 0
    root = SAMPLE_DIR if name == "sample" else Path(str(dataset)).expanduser()
    if is_label_file(root):
        rows, classes, _ = label_file_split(root.resolve(), split, val_fraction if holdout else None, require_labels)
        return len(rows), len(classes)
    if not root.is_dir():
        load_split(dataset, "train", 1)  # the error load_split gives for this name or path
    part = folder_split(root.resolve(), split, val_fraction if holdout else None, require_labels)
    return len(part.files), len(part.classes)


def default_data_dir() -> Path:
    """`$MMLIT_DATA`, else `./data`."""
    return Path(os.environ.get("MMLIT_DATA") or "data").expanduser().resolve()


# a file that only a named dataset's folder holds: given as an image folder, it is that dataset
_DATASET_FILES = (("cifar10", "data_batch_1"), ("cifar10", "data_batch_1.bin"), ("cifar100", "meta"),
                  ("cifar100", "fine_label_names.txt"), ("fashion-mnist", "train-images-idx3-ubyte"),
                  ("fashion-mnist", "train-images-idx3-ubyte.gz"), ("svhn", "train_32x32.mat"),
                  ("flowers102", "imagelabels.mat"), ("tiny-imagenet", "wnids.txt"))


def _named_dataset_files(folder: Path) -> str | None:
    """The named dataset whose files `folder` holds, itself (cifar-10-batches-py/ passed as an
    image folder) or in a sub-folder that dataset's loader reads (the folder above it, the root
    torchvision downloads into), or None."""
    return next((name for name, file in _DATASET_FILES
                 for base in (folder, *(folder / sub for sub in DATASET_SUBDIRS[name]))
                 if (base / file).is_file()), None)


def load_split(dataset: str, split: str, image_size: int, data_dir: str | os.PathLike | None = None,
               download: bool = False, val_fraction: float = 0.1,
               require_labels: bool = True, holdout: bool = True) -> ImageData:
    """Load one split of a named dataset or of an image folder, decoded and resized once.

    `split` is "train", "val", "test" or "all" (every image of an image folder of class folders,
    or every row of a label file, nothing held out). "test" is the official test split (tiny-imagenet,
    which has no labelled one, uses its val split). "val" is the official validation split
    (tiny-imagenet, flowers102, an image folder's val/). Where there is none (cifar10,
    cifar100, svhn, fashion-mnist, folders without val/), a stratified `val_fraction` of the
    training split is held out (per class, seed 0): "val" is that part and "train" the rest,
    so model selection never sees the test split.

    `holdout=False` is the paper protocol: nothing is held out, "train" is the whole training
    split and "val" (where there is no official one) is the test split. An image folder with
    neither val/ nor test/ then has no split besides "train".
    """
    if split not in EVAL_SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)} (or all: every image of a "
                        f"folder or label file)")
    try:
        size = operator.index(image_size)
    except TypeError:
        size = 0
    if size <= 0:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    image_size = size
    if not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")

    if not str(dataset).strip():  # not the current folder: an unset variable in a script gives ""
        raise DataError(f"the dataset is an empty string: use one of {', '.join(DATASET_NAMES)}, or the path "
                        f"of an image folder ('.' for the current one)")
    data = _load(dataset, split, image_size, data_dir, download, float(val_fraction) if holdout else None,
                 require_labels)
    if len(data) == 0:  # scored, an empty split would read as 0 % of 1 image
        raise DataError(f"{data.source}: the '{split}' split has no images")
    return data


def _load(dataset: str, split: str, image_size: int, data_dir, download: bool, hold: float | None,
          require_labels: bool) -> ImageData:
    """`load_split`, its arguments checked: a named dataset, an image folder or a label file."""
    name = _ALIASES.get(str(dataset).strip().lower(), str(dataset).strip().lower())
    path = Path(str(dataset)).expanduser()
    if name in DATASET_NAMES:
        if split == "all":
            raise DataError(f"--split all is every image of an image folder or a label file; {name} has splits of "
                            f"its own: pass --split test (or val, train)")
        root = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
        loader = NAMED_LOADERS[name]
        try:
            return loader(root, split, image_size, download, hold)
        except DataNotFound as e:
            if path.is_dir():  # ./cifar10 here, an image folder the user meant
                raise DataNotFound(f"{e} ({dataset} is also a folder here: --dataset ./{dataset} reads it as an "
                                   f"image folder, --data-dir {dataset} looks for the dataset's files in it)") from None
            raise

    if path.is_dir():
        try:
            return load_folder(path.resolve(), split, image_size, hold, require_labels)
        except DataError as e:
            named = _named_dataset_files(path)
            if named is None:
                raise
            raise DataError(f"{e}; {path} holds {named}'s files: pass --dataset {named} --data-dir {path}") from None
    if is_label_file(path):
        return load_label_file(path.resolve(), split, image_size, hold, require_labels)
    if path.exists():
        raise DataError(f"{dataset} is not a folder or a .csv label file: pass a folder of images (one "
                        f"sub-folder per class), a CSV of path,label rows, or one of {', '.join(DATASET_NAMES)}")
    if path.suffix.lower() == ".csv":  # a label file's name: "unknown dataset" / "image folder" misled
        raise DataError(f"label file {path.resolve()} does not exist")
    looks_like_path = os.sep in str(dataset) or str(dataset).startswith((".", "~"))
    if looks_like_path:
        raise DataError(f"image folder {path.resolve()} does not exist (known dataset names: "
                        f"{', '.join(DATASET_NAMES)})")
    raise DataError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASET_NAMES)}, "
                    f"the path of an image folder, or a .csv label file")
