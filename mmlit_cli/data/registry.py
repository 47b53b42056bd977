"""`load_split`: a named dataset or an image folder -> one decoded split (`ImageData`).

Names (and their aliases) are looked up in `datasets.NAMED_LOADERS`; anything else is taken
as the path of an image folder (`folders.py`). Every split is decoded and resized once, into
one uint8 tensor `[N, 3, S, S]`.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path

from ..errors import DataError
from .datasets import NAMED_LOADERS
from .folders import load_folder
from .splits import SPLITS, ImageData

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


def default_data_dir() -> Path:
    """`$MMLIT_DATA`, else `./data`."""
    return Path(os.environ.get("MMLIT_DATA") or "data").expanduser().resolve()


def load_split(dataset: str, split: str, image_size: int, data_dir: str | os.PathLike | None = None,
               download: bool = False, val_fraction: float = 0.1,
               require_labels: bool = True, holdout: bool = True) -> ImageData:
    """Load one split of a named dataset or of an image folder, decoded and resized once.

    `split` is "train", "val" or "test". "test" is the official test split (tiny-imagenet,
    which has no labelled one, uses its val split). "val" is the official validation split
    (tiny-imagenet, flowers102, an image folder's val/). Where there is none (cifar10,
    cifar100, svhn, fashion-mnist, folders without val/), a stratified `val_fraction` of the
    training split is held out (per class, seed 0): "val" is that part and "train" the rest,
    so model selection never sees the test split.

    `holdout=False` is the paper protocol: nothing is held out, "train" is the whole training
    split and "val" (where there is no official one) is the test split. An image folder with
    neither val/ nor test/ then has no split besides "train".
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    try:
        size = operator.index(image_size)
    except TypeError:
        size = 0
    if size <= 0:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    image_size = size
    if not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")

    name = _ALIASES.get(str(dataset).strip().lower(), str(dataset).strip().lower())
    hold = float(val_fraction) if holdout else None
    if name in DATASET_NAMES:
        root = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
        loader = NAMED_LOADERS[name]
        return loader(root, split, image_size, download, hold)

    path = Path(str(dataset)).expanduser()
    if path.is_dir():
        return load_folder(path.resolve(), split, image_size, hold, require_labels)
    if path.exists():
        raise DataError(f"{dataset} is a file, not a folder: pass a folder of images (one "
                        f"sub-folder per class) or one of {', '.join(DATASET_NAMES)}")
    looks_like_path = os.sep in str(dataset) or str(dataset).startswith((".", "~"))
    if looks_like_path:
        raise DataError(f"image folder {path.resolve()} does not exist (known dataset names: "
                        f"{', '.join(DATASET_NAMES)})")
    raise DataError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASET_NAMES)}, "
                    f"or the path of an image folder")
