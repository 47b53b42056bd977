"""The named datasets, each read in its official on-disk layout (downloaded on request).

One loader per dataset, `(root, split, image_size, download, hold) -> ImageData`, listed in
`NAMED_LOADERS` at the end of this file: that table is the registry `load_split` reads
(`hold` is the fraction held out of train for validation, None for the paper protocol;
Flowers102 and Tiny-ImageNet have a validation split of their own and ignore it). The file
formats are read in `formats.py`, files decoded in `decode.py`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, DataNotFound, listed, one_line
from .decode import decode_labelled, list_images, to_uint8_images
from .folders import load_folder
from .formats import (cifar_binary_batch, cifar_pickle_batch, cifar_pickle_names, read_idx, read_mat,
                      read_text_names)
from .splits import ImageData, official_split, requested_part, source_line, split_note

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

# the sub-folders of the data folder each named dataset is also looked for in: the folders its
# archives extract to and torchvision's layouts under its download root (cifar: python version,
# then binary version)
DATASET_SUBDIRS = {"cifar10": ("cifar-10-batches-py", "cifar-10-batches-bin"),
                   "cifar100": ("cifar-100-python", "cifar-100-binary"), "svhn": ("svhn", "SVHN"),
                   "fashion-mnist": ("FashionMNIST/raw", "fashion-mnist"), "flowers102": ("flowers-102",),
                   "tiny-imagenet": ("tiny-imagenet-200",)}


def _subdirs(name: str, root: Path) -> list[Path]:
    return [root / sub for sub in DATASET_SUBDIRS[name]]


# --------------------------------------------------------------------------------------------
# Downloads (torchvision's downloaders; every failure becomes one DataError line)
# --------------------------------------------------------------------------------------------

def _download(name: str, root: Path, split: str, manual_hint: str) -> None:
    import torchvision.datasets as tvd  # imported here: only needed for downloads
    from torchvision.datasets import utils as tvu

    old_timeout = socket.getdefaulttimeout()
    try:
        root.mkdir(parents=True, exist_ok=True)
        socket.setdefaulttimeout(60)  # a dead network must not hang forever
        if name == "cifar10":
            tvd.CIFAR10(str(root), train=split == "train", download=True)
        elif name == "cifar100":
            tvd.CIFAR100(str(root), train=split == "train", download=True)
        elif name == "svhn":
            tvd.SVHN(str(root), split="train" if split == "train" else "test", download=True)
        elif name == "flowers102":
            tvd.Flowers102(str(root), split="train", download=True)
        elif name == "fashion-mnist":
            tvd.FashionMNIST(str(root), train=split == "train", download=True)
        elif name == "tiny-imagenet":
            tvu.download_and_extract_archive(TINY_IMAGENET_URL, download_root=str(root))
        else:  # pragma: no cover - guarded by the callers
            raise DataError(f"no downloader for {name}")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any download failure is reported in one line
        raise DataError(f"{name} download failed ({one_line(exc)}). Put the files in by hand: "
                        f"{manual_hint}") from exc
    finally:
        socket.setdefaulttimeout(old_timeout)


def _missing(name: str, expected: list[Path], manual_hint: str) -> DataNotFound:
    """The error for a dataset not where it should be: the expected files that are not there
    (all of them when none is), and how to put them there. `eval`, `benchmark` and `export`
    take no --download: the training commands fetch a dataset."""
    absent = [p for p in expected if not p.exists()] or expected
    shown = listed([str(p) for p in absent], 3)
    return DataNotFound(f"{name} not found: expected {shown}. {manual_hint}, or pass --download to mmlit "
                        f"finetune or pretrain.")


def _find_or_download(name: str, root: Path, split: str, download: bool,
                      locate: Callable[[], Any], expected: Callable[[], list[Path]],
                      manual_hint: str) -> Any:
    found = locate()
    if found is not None:
        return found
    if download:
        _download(name, root, split, manual_hint)
        found = locate()
        if found is not None:
            return found
    raise _missing(name, expected(), manual_hint)


# --------------------------------------------------------------------------------------------
# CIFAR-10 and CIFAR-100 (python pickles or the binary version)
# --------------------------------------------------------------------------------------------

def _load_cifar(name: str, root: Path, split: str, image_size: int, download: bool,
                hold: float | None) -> ImageData:
    ten = name == "cifar10"
    official = official_split(split, hold)
    py_dir, bin_dir = DATASET_SUBDIRS[name]
    if ten:
        py_files = ([f"data_batch_{i}" for i in range(1, 6)] if official == "train"
                    else ["test_batch"]) + ["batches.meta"]
        bin_files = ([f"data_batch_{i}.bin" for i in range(1, 6)] if official == "train"
                     else ["test_batch.bin"]) + ["batches.meta.txt"]
        hint = (f"Download the 'CIFAR-10 python version' from https://www.cs.toronto.edu/~kriz/"
                f"cifar.html and extract it into {root}")
    else:
        py_files = [official, "meta"]
        bin_files = [f"{official}.bin", "fine_label_names.txt"]
        hint = (f"Download the 'CIFAR-100 python version' from https://www.cs.toronto.edu/~kriz/"
                f"cifar.html and extract it into {root}")

    def locate() -> tuple[str, Path] | None:
        for kind, sub, files in (("py", py_dir, py_files), ("bin", bin_dir, bin_files)):
            for base in (root / sub, root):
                if all((base / f).is_file() for f in files):
                    return kind, base
        return None

    kind, base = _find_or_download(
        name, root, official, download, locate,
        lambda: [root / py_dir / f for f in py_files if not (root / py_dir / f).is_file()],
        hint)

    parts = []
    if kind == "py":
        for f in py_files[:-1]:
            parts.append(cifar_pickle_batch(base / f, "labels" if ten else "fine_labels"))
        classes = cifar_pickle_names(base / py_files[-1], "label_names" if ten else "fine_label_names")
    else:
        for f in bin_files[:-1]:
            parts.append(cifar_binary_batch(base / f, 1 if ten else 2))
        classes = read_text_names(base / bin_files[-1])
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    n_cls = 10 if ten else 100
    if len(classes) != n_cls:
        raise DataError(f"{base}: expected {n_cls} class names in the meta file, got {len(classes)}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_cls):
        raise DataError(f"{base}: labels out of range 0..{n_cls - 1}")
    images, labels, note = requested_part(images, labels, name, split, official, hold)
    return ImageData(to_uint8_images(images, image_size), torch.from_numpy(labels), classes,
                     source_line(note, base, len(labels)), [])


# --------------------------------------------------------------------------------------------
# SVHN (.mat files)
# --------------------------------------------------------------------------------------------


def _load_svhn(root: Path, split: str, image_size: int, download: bool, hold: float | None) -> ImageData:
    official = official_split(split, hold)
    fname = f"{official}_32x32.mat"
    hint = (f"Download {fname} (format 2, cropped digits) from http://ufldl.stanford.edu/"
            f"housenumbers/ into {root}")

    def locate() -> Path | None:
        for base in (root, *_subdirs("svhn", root)):
            if (base / fname).is_file():
                return base / fname
        return None

    path = _find_or_download("svhn", root, official, download, locate, lambda: [root / fname], hint)
    d = read_mat(path, ["X", "y"])
    x, y = np.asarray(d["X"]), np.asarray(d["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y) or x.dtype != np.uint8:
        raise DataError(f"{path} is malformed: expected X uint8 [32, 32, 3, N] and N labels, got "
                        f"{x.dtype} {list(x.shape)} and {len(y)} labels")
    y[y == 10] = 0
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path}: labels out of range 1..10")
    images, y, note = requested_part(x.transpose(3, 2, 0, 1), y, "svhn", split, official, hold)
    return ImageData(to_uint8_images(np.ascontiguousarray(images), image_size), torch.from_numpy(y),
                     [str(i) for i in range(10)], source_line(note, path, len(y)), [])


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)
# --------------------------------------------------------------------------------------------


def _load_fashion_mnist(root: Path, split: str, image_size: int, download: bool,
                        hold: float | None) -> ImageData:
    official = official_split(split, hold)
    prefix = "train" if official == "train" else "t10k"
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    dirs = [root, *_subdirs("fashion-mnist", root)]
    hint = (f"Download the four Fashion-MNIST idx files (e.g. {stems[0]}.gz) from "
            f"https://github.com/zalandoresearch/fashion-mnist into {root}")

    def locate() -> list[Path] | None:
        for base in dirs:
            found = []
            for stem in stems:
                for cand in (base / stem, base / f"{stem}.gz"):
                    if cand.is_file():
                        found.append(cand)
                        break
            if len(found) == 2:
                return found
        return None

    expected = lambda: [root / f"{s}(.gz)" for s in stems  # noqa: E731 - the ones in none of the folders
                        if not any((d / n).is_file() for d in dirs for n in (s, f"{s}.gz"))] or \
        [root / f"{s}(.gz)" for s in stems]
    img_path, lab_path = _find_or_download("fashion-mnist", root, official, download, locate,
                                           expected, hint + f" (or {dirs[1]}, {dirs[2]})")
    images, labels = read_idx(img_path), read_idx(lab_path).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != np.uint8 \
            or 0 in images.shape[1:]:
        raise DataError(f"{img_path.parent}: expected uint8 images [N, H, W] and N labels, got "
                        f"{images.dtype} {list(images.shape)} and {list(labels.shape)} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{lab_path}: labels out of range 0..9")
    images, labels, note = requested_part(images, labels, "fashion-mnist", split, official, hold)
    tensor = to_uint8_images(images[:, None], image_size)
    return ImageData(tensor, torch.from_numpy(labels), list(FASHION_MNIST_CLASSES),
                     source_line(note, img_path.parent, len(labels)), [])


# --------------------------------------------------------------------------------------------
# Flowers102 and Tiny-ImageNet (file based)
# --------------------------------------------------------------------------------------------

def _flowers_classes() -> list[str]:
    try:
        import torchvision.datasets as tvd
        names = list(getattr(tvd.Flowers102, "classes", []))
    except Exception:  # noqa: BLE001 - names are cosmetic
        names = []
    return names if len(names) == 102 else [f"class_{i:03d}" for i in range(1, 103)]


def _load_flowers102(root: Path, split: str, image_size: int, download: bool) -> ImageData:
    need = ["imagelabels.mat", "setid.mat", "jpg"]
    hint = (f"Download 102flowers.tgz, imagelabels.mat and setid.mat from https://www.robots.ox."
            f"ac.uk/~vgg/data/flowers/102/ and put them (jpg/ extracted) into {root / 'flowers-102'}")

    def locate() -> Path | None:
        for base in (*_subdirs("flowers102", root), root):
            if (base / "imagelabels.mat").is_file() and (base / "setid.mat").is_file() \
                    and (base / "jpg").is_dir():
                return base
        return None

    base = _find_or_download("flowers102", root, split, download, locate,
                             lambda: [root / "flowers-102" / n for n in need], hint)
    labels = np.asarray(read_mat(base / "imagelabels.mat", ["labels"])["labels"]).reshape(-1)
    key = {"train": "trnid", "val": "valid", "test": "tstid"}[split]
    ids = np.asarray(read_mat(base / "setid.mat", [key])[key]).reshape(-1).astype(np.int64)
    if ids.size == 0:
        raise DataError(f"{base / 'setid.mat'}: the {key} list is empty")
    if ids.min() < 1 or ids.max() > len(labels):
        raise DataError(f"{base / 'setid.mat'}: image ids outside 1..{len(labels)}")
    labs = labels[ids - 1].astype(np.int64) - 1
    if labs.min() < 0 or labs.max() > 101:
        raise DataError(f"{base / 'imagelabels.mat'}: labels outside 1..102")
    paths = [str(base / "jpg" / f"image_{i:05d}.jpg") for i in ids]
    absent = [p for p in paths if not os.path.isfile(p)]
    if absent:
        raise DataError(f"flowers102: {len(absent)} image(s) missing, e.g. {absent[0]}. {hint}.")
    classes = _flowers_classes()
    images, labels_t, skipped = decode_labelled(paths, labs.tolist(), classes, image_size,
                                                f"flowers102 {base}", every_class=split == "train")
    return ImageData(images, labels_t, classes,
                     f"flowers102 '{split}' split, {base} ({len(labels_t)} images)", skipped)


def _tiny_names(base: Path, wnids: list[str]) -> list[str]:
    words = base / "words.txt"
    if not words.is_file():
        return list(wnids)
    wanted, found = set(wnids), {}
    try:
        with open(words, encoding="utf-8-sig") as f:
            for line in f:
                wnid, _, text = line.rstrip("\n").partition("\t")
                if wnid in wanted and text.strip():
                    found[wnid] = text.strip()
    except (OSError, UnicodeDecodeError):
        return list(wnids)
    short = [found.get(w, w).split(",")[0].strip() or w for w in wnids]
    dup = {s for s in short if short.count(s) > 1}
    names = [found.get(w, w) if s in dup else s for w, s in zip(wnids, short)]
    # two synsets with one text (ImageNet has two "crane"s): the wnid tells them apart, as
    # classes are matched by name (eval, --init) and shown by name (predict)
    return [f"{n} ({w})" if names.count(n) > 1 else n for w, n in zip(wnids, names)]


def _load_tiny_imagenet(root: Path, split: str, image_size: int, download: bool) -> ImageData:
    hint = f"Download {TINY_IMAGENET_URL} and extract it into {root}"
    part = "train" if split == "train" else "val"
    need = ["wnids.txt", "train" if part == "train" else "val/val_annotations.txt"]

    def locate() -> Path | None:
        for base in (*_subdirs("tiny-imagenet", root), root):
            if all((base / n).exists() for n in need):
                return base
        return None

    base = _find_or_download("tiny-imagenet", root, split, download, locate,
                             lambda: [root / "tiny-imagenet-200" / n for n in need], hint)
    wnids = read_text_names(base / "wnids.txt")
    twice = sorted({w for w in wnids if wnids.count(w) > 1})
    if twice:  # each would be a class of its own, one of them with no image
        raise DataError(f"{base / 'wnids.txt'} lists {', '.join(twice[:3])} more than once")
    if len(wnids) < 2:
        raise DataError(f"{base / 'wnids.txt'} lists {len(wnids)} class(es); expected 200")
    index = {w: i for i, w in enumerate(wnids)}
    classes = _tiny_names(base, wnids)
    paths: list[str] = []
    labels: list[int] = []
    if part == "train":
        for w in wnids:
            folder = base / "train" / w / "images"
            files = list_images(folder)
            if not files:
                raise DataError(f"tiny-imagenet: no images in {folder}")
            paths += files
            labels += [index[w]] * len(files)
    else:
        ann = base / "val" / "val_annotations.txt"
        try:
            lines = ann.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {ann} ({one_line(exc)})") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) < 2 or cols[1] not in index:
                raise DataError(f"{ann}:{lineno}: expected 'file<TAB>wnid...' with a wnid "
                                f"from wnids.txt, got {line[:60]!r}")
            paths.append(str(base / "val" / "images" / cols[0]))
            labels.append(index[cols[1]])
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise DataError(f"tiny-imagenet: {len(absent)} val image(s) missing, e.g. "
                            f"{absent[0]}. {hint}.")
        if not paths:
            raise DataError(f"{ann} lists no images")
    images, labels_t, skipped = decode_labelled(paths, labels, classes, image_size,
                                                f"tiny-imagenet {base}", every_class=split == "train")
    note = split_note("tiny-imagenet", split, part,
                      "tiny-imagenet has no labelled test split")
    return ImageData(images, labels_t, classes, f"{note}, {base} ({len(labels_t)} images)",
                     skipped)


# --------------------------------------------------------------------------------------------
# The bundled sample: 1,400 real CIFAR-10 JPEGs shipped inside the package (sample/README.md)
# --------------------------------------------------------------------------------------------

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample"


def _load_sample(split: str, image_size: int, hold: float | None) -> ImageData:
    """The bundled sample, an image folder in the train/val/test layout (100/20/20 images per
    class): what `finetune` and `pretrain` train on when no --dataset is given. It needs no
    data directory and no download, so the README's first commands run anywhere."""
    if not (SAMPLE_DIR / "train").is_dir():
        raise DataError(f"the bundled sample is missing from this installation ({SAMPLE_DIR}): "
                        f"reinstall mmlit")
    data = load_folder(SAMPLE_DIR, split, image_size, hold, True)
    data.source = data.source.replace(f"image folder {SAMPLE_DIR}", "sample (bundled CIFAR-10 subset)", 1)
    return data


# --------------------------------------------------------------------------------------------
# The registry: name -> loader, in the order the names are shown to users
# --------------------------------------------------------------------------------------------

# (root, split, image_size, download, held-out fraction or None) -> ImageData. Flowers102 and
# Tiny-ImageNet have a validation split of their own: nothing is ever held out of theirs.
NAMED_LOADERS: dict[str, Callable[[Path, str, int, bool, float | None], ImageData]] = {
    "cifar10": lambda r, s, n, d, h: _load_cifar("cifar10", r, s, n, d, h),
    "cifar100": lambda r, s, n, d, h: _load_cifar("cifar100", r, s, n, d, h),
    "svhn": _load_svhn,
    "flowers102": lambda r, s, n, d, h: _load_flowers102(r, s, n, d),
    "fashion-mnist": _load_fashion_mnist,
    "tiny-imagenet": lambda r, s, n, d, h: _load_tiny_imagenet(r, s, n, d),
    "sample": lambda r, s, n, d, h: _load_sample(s, n, h),
}
