"""Datasets, augmentation and loaders.

`load_split` reads a named dataset in its official on-disk layout (or an image folder) and
decodes every image exactly once into one uint8 tensor `[N, 3, S, S]`. Images stay uint8 all
the way through the `DataLoader` (per-sample augmentation works on uint8 too); the engine
normalises them on the device (`Normalize`), then applies the optional batch-level MixUp/CutMix.

Reading rules worth knowing:

* CIFAR pickles are read with a restricted unpickler (`_SafeUnpickler`) that only rebuilds
  numpy arrays; anything else in a pickle is refused with a `DataError`.
* Non-square images are resized aspect-preserving (shorter side to S, then a centre crop),
  square ones are simply resized; nothing is resized when it already has the right size.
* Datasets without a validation split (cifar10, cifar100, svhn, fashion-mnist, image folders
  without val/) hold a deterministic stratified part of the training split out for
  validation (per class, seed 0, independent of the training seed), so that model selection
  never looks at the test split; `holdout=False` (the paper protocol) holds nothing out.
"""

from __future__ import annotations

import gzip
import math
import multiprocessing
import operator
import os
import pickle
import socket
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .errors import DataError

if TYPE_CHECKING:
    from .config import AugmentConfig

__all__ = [
    "DATASET_NAMES", "ImageData", "load_split", "build_train_transform", "build_batch_mix",
    "normalize", "Normalize", "AugmentedImages", "build_loader", "set_epoch", "default_data_dir",
]

DATASET_NAMES = ("cifar10", "cifar100", "svhn", "flowers102", "fashion-mnist", "tiny-imagenet")
SPLITS = ("train", "val", "test")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

_ALIASES = {name.replace("-", ""): name for name in DATASET_NAMES}
_ALIASES.update({"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist",
                 "fashion_mnist": "fashion-mnist", "tiny_imagenet": "tiny-imagenet",
                 "tinyimagenet": "tiny-imagenet", "oxford-flowers102": "flowers102",
                 "flowers-102": "flowers102"})


@dataclass
class ImageData:
    """A fully decoded split: uint8 images already at the model's image size."""

    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]; -1 everywhere when unlabeled
    classes: list[str]  # index = label; [] when unlabeled
    source: str  # one human line describing where the images came from
    skipped: list[str] = field(default_factory=list)  # undecodable files that were skipped

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def default_data_dir() -> Path:
    """`$MMLIT_DATA`, else `./data`."""
    return Path(os.environ.get("MMLIT_DATA") or "data").expanduser().resolve()


# --------------------------------------------------------------------------------------------
# load_split
# --------------------------------------------------------------------------------------------

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
        loader = _NAMED_LOADERS[name]
        return loader(root, split, image_size, download, hold)

    path = Path(str(dataset)).expanduser()
    if path.is_dir():
        return _load_folder(path.resolve(), split, image_size, hold, require_labels)
    if path.exists():
        raise DataError(f"{dataset} is a file, not a folder: pass a folder of images (one "
                        f"sub-folder per class) or one of {', '.join(DATASET_NAMES)}")
    looks_like_path = os.sep in str(dataset) or str(dataset).startswith((".", "~"))
    if looks_like_path:
        raise DataError(f"image folder {path.resolve()} does not exist (known dataset names: "
                        f"{', '.join(DATASET_NAMES)})")
    raise DataError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASET_NAMES)}, "
                    f"or the path of an image folder")


def _split_note(name: str, split: str, official: str, why: str) -> str:
    if split == official:
        return f"{name} '{split}' split"
    return f"{name} '{split}' split (= official {official} split; {why})"


def _source(note: str, where: Path, n: int) -> str:
    return f"{note}, {where} ({n} images)"


def _official_split(split: str, hold: float | None) -> str:
    """The official split (train or test) a requested split comes from, for a dataset with no
    validation split: "val" is a part of train held out when `hold` (its fraction) is given,
    else the test split (the paper protocol)."""
    return "train" if split == "train" or (split == "val" and hold is not None) else "test"


def _requested_part(images: np.ndarray, labels: np.ndarray, name: str, split: str, official: str,
                    hold: float | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, note) of `split` in the official split that was read: all of it, or,
    when a validation part is held out of train, the training part or the held-out part."""
    why = f"{name} has no validation split"
    if official != "train" or hold is None:
        return images, labels, _split_note(name, split, official, why)
    train_pos, held_pos = _holdout(labels.tolist(), hold)
    keep = train_pos if split == "train" else held_pos
    if not keep:
        raise DataError(f"{name}: too few images to hold out a validation split (a class needs at least 2 images)")
    pct = f"{hold * 100:g}%"
    if split == "train":
        note = f"{name} 'train' split minus the {pct} held out for validation (stratified, seed 0)"
    else:
        note = (f"{name} 'val' split = {pct} held out of the train split (stratified, seed 0; {why}; "
                f"the test split is untouched)")
    return images[keep], labels[keep], note


def _to_tensor(images: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [N, C, H, W] (C = 1 or 3) -> contiguous uint8 [N, 3, S, S]."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise DataError(f"expected 8-bit images, got {x.dtype}")
    x = _resize_uint8(x, image_size)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def _resize_uint8(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 [N, C, H, W] to size x size (square inputs)."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        part = x[start:start + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


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
        raise DataError(f"{name} download failed ({_one_line(exc)}). Put the files in by hand: "
                        f"{manual_hint}") from exc
    finally:
        socket.setdefaulttimeout(old_timeout)


def _missing(name: str, expected: list[Path], manual_hint: str) -> DataError:
    shown = " ".join(str(p) for p in expected[:3]) + (" ..." if len(expected) > 3 else "")
    return DataError(f"{name} not found: expected {shown}. {manual_hint}, or pass --download.")


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
# CIFAR (python pickles read with a restricted unpickler, or the binary version)
# --------------------------------------------------------------------------------------------

def _latin1_encode(text: Any, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What Python 3 protocol-2 pickles use to store bytes (`_codecs.encode(s, 'latin1')`)."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise DataError("refusing to unpickle: unexpected _codecs.encode call")
    return text.encode("latin1", errors)


def _safe_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray as ma
        from numpy._core import numeric as nm
    except ImportError:  # numpy < 2
        from numpy.core import multiarray as ma  # type: ignore[no-redef]
        from numpy.core import numeric as nm  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = ma._reconstruct
        allowed[(mod, "scalar")] = ma.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        if hasattr(nm, "_frombuffer"):
            allowed[(mod, "_frombuffer")] = nm._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("_codecs", "encode")] = _latin1_encode
    for mod in ("builtins", "__builtin__"):
        for typ in (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, bool):
            allowed[(mod, typ.__name__)] = typ
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays and plain containers (CIFAR pickles)."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _SafeUnpickler._allowed is None:
            _SafeUnpickler._allowed = _safe_globals()
        try:
            return _SafeUnpickler._allowed[(module, name)]
        except KeyError:
            raise DataError(f"refusing to unpickle {module}.{name}: the file holds more than "
                            f"plain arrays (not a genuine CIFAR pickle?)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError("refusing to unpickle a persistent id")


def _safe_unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, struct.error, UnicodeDecodeError, MemoryError) as exc:
        raise DataError(f"{path} is not a readable CIFAR pickle ({_one_line(exc)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR pickle (expected a dict, got "
                        f"{type(obj).__name__})")
    return obj


def _get(d: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path} is not a CIFAR pickle: key {key!r} is missing")


def _decode_names(names: Any, path: Path) -> list[str]:
    try:
        return [n.decode("utf-8") if isinstance(n, (bytes, bytearray)) else str(n) for n in names]
    except (TypeError, UnicodeDecodeError):
        raise DataError(f"{path}: unreadable label names") from None


def _cifar_pickle_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _safe_unpickle(path)
    data = np.asarray(_get(d, "data", path))
    labels = np.asarray(_get(d, label_key, path), dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path} is malformed: expected uint8 data [N, 3072] and N labels, got "
                        f"{data.dtype} {list(data.shape)} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_binary_batch(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    rec = label_bytes + 3072
    if raw.size == 0 or raw.size % rec:
        raise DataError(f"{path} is malformed: size {raw.size} is not a multiple of {rec} bytes")
    raw = raw.reshape(-1, rec)
    labels = raw[:, label_bytes - 1].astype(np.int64)  # cifar100: (coarse, fine) -> fine
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def _read_text_names(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} ({_one_line(exc)})") from None


def _load_cifar(name: str, root: Path, split: str, image_size: int, download: bool,
                hold: float | None) -> ImageData:
    ten = name == "cifar10"
    official = _official_split(split, hold)
    if ten:
        py_dir, bin_dir = "cifar-10-batches-py", "cifar-10-batches-bin"
        py_files = ([f"data_batch_{i}" for i in range(1, 6)] if official == "train"
                    else ["test_batch"]) + ["batches.meta"]
        bin_files = ([f"data_batch_{i}.bin" for i in range(1, 6)] if official == "train"
                     else ["test_batch.bin"]) + ["batches.meta.txt"]
        hint = (f"Download the 'CIFAR-10 python version' from https://www.cs.toronto.edu/~kriz/"
                f"cifar.html and extract it into {root}")
    else:
        py_dir, bin_dir = "cifar-100-python", "cifar-100-binary"
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
            parts.append(_cifar_pickle_batch(base / f, "labels" if ten else "fine_labels"))
        meta = base / py_files[-1]
        classes = _decode_names(_get(_safe_unpickle(meta), "label_names" if ten
                                     else "fine_label_names", meta), meta)
    else:
        for f in bin_files[:-1]:
            parts.append(_cifar_binary_batch(base / f, 1 if ten else 2))
        classes = _read_text_names(base / bin_files[-1])
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    n_cls = 10 if ten else 100
    if len(classes) != n_cls:
        raise DataError(f"{base}: expected {n_cls} class names in the meta file, got {len(classes)}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_cls):
        raise DataError(f"{base}: labels out of range 0..{n_cls - 1}")
    images, labels, note = _requested_part(images, labels, name, split, official, hold)
    return ImageData(_to_tensor(images, image_size), torch.from_numpy(labels), classes,
                     _source(note, base, len(labels)), [])


# --------------------------------------------------------------------------------------------
# SVHN (.mat files, scipy)
# --------------------------------------------------------------------------------------------

def _loadmat(path: Path, names: list[str]) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"reading {path.name} needs scipy: pip install scipy") from None
    try:
        d = loadmat(str(path), variable_names=names)
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for broken files
        raise DataError(f"cannot read {path} ({_one_line(exc)})") from None
    missing = [k for k in names if k not in d]
    if missing:
        raise DataError(f"{path} has no variable(s) {', '.join(missing)}")
    return d


def _load_svhn(root: Path, split: str, image_size: int, download: bool, hold: float | None) -> ImageData:
    official = _official_split(split, hold)
    fname = f"{official}_32x32.mat"
    hint = (f"Download {fname} (format 2, cropped digits) from http://ufldl.stanford.edu/"
            f"housenumbers/ into {root}")

    def locate() -> Path | None:
        for base in (root, root / "svhn", root / "SVHN"):
            if (base / fname).is_file():
                return base / fname
        return None

    path = _find_or_download("svhn", root, official, download, locate, lambda: [root / fname], hint)
    d = _loadmat(path, ["X", "y"])
    x, y = np.asarray(d["X"]), np.asarray(d["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y) or x.dtype != np.uint8:
        raise DataError(f"{path} is malformed: expected X uint8 [32, 32, 3, N] and N labels, got "
                        f"{x.dtype} {list(x.shape)} and {len(y)} labels")
    y[y == 10] = 0
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path}: labels out of range 1..10")
    images, y, note = _requested_part(x.transpose(3, 2, 0, 1), y, "svhn", split, official, hold)
    return ImageData(_to_tensor(np.ascontiguousarray(images), image_size), torch.from_numpy(y),
                     [str(i) for i in range(10)], _source(note, path, len(y)), [])


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files, plain or gzipped)
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an idx file (MNIST format, optionally gzipped): magic, big-endian dims, data."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                buf = f.read()
        else:
            buf = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path} ({_one_line(exc)})") from None
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES or buf[3] == 0:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    ndim = buf[3]
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(f"{path} is truncated (incomplete header)")
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    dtype = np.dtype(_IDX_DTYPES[buf[2]])
    count = math.prod(dims)
    if len(buf) - header < count * dtype.itemsize:
        raise DataError(f"{path} is truncated: header says {list(dims)}, file too short")
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _load_fashion_mnist(root: Path, split: str, image_size: int, download: bool,
                        hold: float | None) -> ImageData:
    official = _official_split(split, hold)
    prefix = "train" if official == "train" else "t10k"
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    dirs = [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
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

    expected = lambda: [root / f"{s}(.gz)" for s in stems]  # noqa: E731
    img_path, lab_path = _find_or_download("fashion-mnist", root, official, download, locate,
                                           expected, hint + f" (or {dirs[1]}, {dirs[2]})")
    images, labels = read_idx(img_path), read_idx(lab_path).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != np.uint8:
        raise DataError(f"{img_path.parent}: expected uint8 images [N, H, W] and N labels, got "
                        f"{images.dtype} {list(images.shape)} and {list(labels.shape)} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{lab_path}: labels out of range 0..9")
    images, labels, note = _requested_part(images, labels, "fashion-mnist", split, official, hold)
    tensor = _to_tensor(images[:, None], image_size)
    return ImageData(tensor, torch.from_numpy(labels), list(FASHION_MNIST_CLASSES),
                     _source(note, img_path.parent, len(labels)), [])


# --------------------------------------------------------------------------------------------
# Image decoding (files): PIL, decoded once, optionally in a small process pool
# --------------------------------------------------------------------------------------------

_EXT_FORMATS: dict[str, str] | None = None


def _ext_formats() -> dict[str, str]:
    """File extension -> Pillow format, for the formats Pillow can open."""
    global _EXT_FORMATS
    if _EXT_FORMATS is None:
        from PIL import Image
        Image.init()
        _EXT_FORMATS = {ext.lower(): fmt for ext, fmt in Image.registered_extensions().items()
                        if fmt in Image.OPEN}
    return _EXT_FORMATS


def _open_image(path: str) -> Any:
    """Image.open, trying the format the extension names first (much faster than probing)."""
    from PIL import Image, UnidentifiedImageError
    fmt = _ext_formats().get(os.path.splitext(path)[1].lower())
    if fmt is not None:
        try:
            return Image.open(path, formats=(fmt,))
        except UnidentifiedImageError:
            pass  # wrong extension: let Pillow probe every format
    return Image.open(path)


def _is_image_candidate(path: str) -> bool:
    """Image extension, or any other file whose header Pillow recognises."""
    if os.path.splitext(path)[1].lower() in _ext_formats():
        return True
    try:
        with _open_image(path):
            return True
    except Exception:  # noqa: BLE001 - not an image
        return False


def _to_rgb(im: Any) -> Any:
    from PIL import Image
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        if a.size and a.max() > 255:
            a = a * (255.0 / 65535.0)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def _decode_one(path: str, size: int) -> np.ndarray | None:
    """One file -> uint8 [S, S, 3] (aspect-preserving resize + centre crop), None if undecodable."""
    from PIL import Image, ImageOps
    try:
        with _open_image(path) as im:
            if im.format == "JPEG" and min(im.size) >= 2 * size:
                im.draft(im.mode, (size, size))  # let libjpeg downscale big photos cheaply
            im.load()
            rgb = _to_rgb(im)
            if rgb.size != (size, size):
                rgb = ImageOps.fit(rgb, (size, size), method=Image.Resampling.BILINEAR)
            arr = np.asarray(rgb, dtype=np.uint8)
    except Exception:  # noqa: BLE001 - any decoding failure means "skip this file"
        return None
    if arr.shape != (size, size, 3):
        return None
    return arr


def _decode_chunk(args: tuple[list[str], int]) -> tuple[np.ndarray, np.ndarray]:
    paths, size = args
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    for i, p in enumerate(paths):
        arr = _decode_one(p, size)
        if arr is not None:
            out[i] = arr
            ok[i] = True
    return out, ok


def _decode_workers(n: int) -> int:
    env = os.environ.get("MMLIT_DECODE_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    if n < 4000 or multiprocessing.current_process().daemon:
        return 1
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _decode_files(paths: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode many files -> (uint8 [N, S, S, 3], ok mask [N]); big lists use a process pool."""
    workers = _decode_workers(len(paths))
    if workers > 1 and len(paths) > 1:
        import warnings
        from concurrent.futures import ProcessPoolExecutor
        chunk = max(16, min(2048, math.ceil(len(paths) / (workers * 4))))
        jobs = [(paths[i:i + chunk], size) for i in range(0, len(paths), chunk)]
        try:
            with warnings.catch_warnings():  # Python >= 3.12 warns about fork + threads
                warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
                ctx = multiprocessing.get_context("fork")
                with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
                    results = list(ex.map(_decode_chunk, jobs))
            return (np.concatenate([r[0] for r in results]),
                    np.concatenate([r[1] for r in results]))
        except (OSError, RuntimeError, ValueError):  # no pool here (e.g. sandbox): decode inline
            pass
    return _decode_chunk((paths, size))


def _decode_labelled(paths: list[str], labels: list[int], classes: list[str], size: int,
                     where: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode files; skip undecodable ones; fail if a class present in `labels` vanishes."""
    images, ok = _decode_files(paths, size)
    skipped = [p for p, good in zip(paths, ok) if not good]
    lab = np.asarray(labels, dtype=np.int64)
    if not ok.all():
        had = set(lab.tolist())
        images, lab = images[ok], lab[ok]
        lost = sorted(had - set(lab.tolist()))
        if lost and classes:
            names = ", ".join(repr(classes[c]) for c in lost[:5]) + (" ..." if len(lost) > 5 else "")
            raise DataError(f"{where}: no readable image left for class(es) {names} "
                            f"({len(skipped)} undecodable files, e.g. {skipped[0]})")
    if len(lab) == 0:
        raise DataError(f"{where}: none of the {len(paths)} image files could be decoded "
                        f"(e.g. {paths[0]})" if paths else f"{where}: no images")
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return tensor, torch.from_numpy(lab), skipped


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
        for base in (root / "flowers-102", root):
            if (base / "imagelabels.mat").is_file() and (base / "setid.mat").is_file() \
                    and (base / "jpg").is_dir():
                return base
        return None

    base = _find_or_download("flowers102", root, split, download, locate,
                             lambda: [root / "flowers-102" / n for n in need], hint)
    labels = np.asarray(_loadmat(base / "imagelabels.mat", ["labels"])["labels"]).reshape(-1)
    key = {"train": "trnid", "val": "valid", "test": "tstid"}[split]
    ids = np.asarray(_loadmat(base / "setid.mat", [key])[key]).reshape(-1).astype(np.int64)
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
    images, labels_t, skipped = _decode_labelled(paths, labs.tolist(), classes, image_size,
                                                 f"flowers102 {base}")
    return ImageData(images, labels_t, classes,
                     f"flowers102 '{split}' split, {base} ({len(labels_t)} images)", skipped)


def _tiny_names(base: Path, wnids: list[str]) -> list[str]:
    words = base / "words.txt"
    if not words.is_file():
        return list(wnids)
    wanted, found = set(wnids), {}
    try:
        with open(words, encoding="utf-8") as f:
            for line in f:
                wnid, _, text = line.rstrip("\n").partition("\t")
                if wnid in wanted and text.strip():
                    found[wnid] = text.strip()
    except (OSError, UnicodeDecodeError):
        return list(wnids)
    short = [found.get(w, w).split(",")[0].strip() or w for w in wnids]
    dup = {s for s in short if short.count(s) > 1}
    return [found.get(w, w) if s in dup else s for w, s in zip(wnids, short)]


def _list_dir_images(folder: Path) -> list[str]:
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except OSError:
        return []
    return [str(folder / n) for n in names if (folder / n).is_file()
            and _is_image_candidate(str(folder / n))]


def _load_tiny_imagenet(root: Path, split: str, image_size: int, download: bool) -> ImageData:
    hint = f"Download {TINY_IMAGENET_URL} and extract it into {root}"
    part = "train" if split == "train" else "val"
    need = ["wnids.txt", "train" if part == "train" else "val/val_annotations.txt"]

    def locate() -> Path | None:
        for base in (root / "tiny-imagenet-200", root):
            if all((base / n).exists() for n in need):
                return base
        return None

    base = _find_or_download("tiny-imagenet", root, split, download, locate,
                             lambda: [root / "tiny-imagenet-200" / n for n in need], hint)
    wnids = _read_text_names(base / "wnids.txt")
    if len(wnids) < 2:
        raise DataError(f"{base / 'wnids.txt'} lists {len(wnids)} class(es); expected 200")
    index = {w: i for i, w in enumerate(wnids)}
    classes = _tiny_names(base, wnids)
    paths: list[str] = []
    labels: list[int] = []
    if part == "train":
        for w in wnids:
            folder = base / "train" / w / "images"
            files = _list_dir_images(folder)
            if not files:
                raise DataError(f"tiny-imagenet: no images in {folder}")
            paths += files
            labels += [index[w]] * len(files)
    else:
        ann = base / "val" / "val_annotations.txt"
        try:
            lines = ann.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {ann} ({_one_line(exc)})") from None
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
    images, labels_t, skipped = _decode_labelled(paths, labels, classes, image_size,
                                                 f"tiny-imagenet {base}")
    note = _split_note("tiny-imagenet", split, part,
                       "tiny-imagenet has no labelled test split")
    return ImageData(images, labels_t, classes, f"{note}, {base} ({len(labels_t)} images)",
                     skipped)


# (root, split, image_size, download, held-out fraction or None) -> ImageData. Flowers102 and
# Tiny-ImageNet have a validation split of their own: nothing is ever held out of theirs.
_NAMED_LOADERS: dict[str, Callable[[Path, str, int, bool, float | None], ImageData]] = {
    "cifar10": lambda r, s, n, d, h: _load_cifar("cifar10", r, s, n, d, h),
    "cifar100": lambda r, s, n, d, h: _load_cifar("cifar100", r, s, n, d, h),
    "svhn": _load_svhn,
    "flowers102": lambda r, s, n, d, h: _load_flowers102(r, s, n, d),
    "fashion-mnist": _load_fashion_mnist,
    "tiny-imagenet": lambda r, s, n, d, h: _load_tiny_imagenet(r, s, n, d),
}


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------

_SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def _subdirs(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder)
                      if not e.name.startswith(".") and e.is_dir())
    except OSError as exc:
        raise DataError(f"cannot read folder {folder} ({_one_line(exc)})") from None


def _walk_images(folder: Path) -> list[str]:
    """All image files under `folder`, recursively, sorted by relative path, no hidden ones."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        for f in filenames:
            if not f.startswith("."):
                found.append((() if rel == "." else tuple(Path(rel).parts)) + (f,))
    found.sort()
    out = []
    for parts in found:
        p = os.path.join(folder, *parts)
        if _is_image_candidate(p):
            out.append(p)
    return out


def _scan_part(folder: Path, classes: list[str] | None,
               require_labels: bool) -> tuple[list[str], list[str], list[int]]:
    """Scan one folder -> (classes, files, labels); `classes` fixes the label order if given."""
    dirs = _subdirs(folder)
    is_train = classes is None
    if is_train:  # the train (or only) folder decides what the classes are
        if not dirs:
            files = _list_dir_images(folder)
            if not files:
                raise DataError(f"no images found in {folder}: expected one sub-folder per class "
                                f"({folder}/<class>/*.jpg)")
            if require_labels:
                raise DataError(f"{folder} has {len(files)} images but no class sub-folders; put "
                                f"them in {folder}/<class>/ (one folder per class, at least 2)")
            return [], files, [-1] * len(files)
        classes = dirs
        if require_labels and len(classes) < 2:
            raise DataError(f"{folder} has only one class folder ({classes[0]!r}); a classifier "
                            f"needs at least 2 class sub-folders")
    elif not classes:  # unlabeled train folder: its val/test folder is unlabeled too
        files = _list_dir_images(folder) or [f for d in dirs for f in _walk_images(folder / d)]
        if not files:
            raise DataError(f"no images found in {folder}")
        return [], files, [-1] * len(files)
    else:
        extra = [d for d in dirs if d not in classes]
        if extra:
            raise DataError(f"{folder} has class folder(s) not in the train folder: "
                            f"{', '.join(extra[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for d in dirs:
        found = _walk_images(folder / d)
        if not found and is_train:
            raise DataError(f"class folder {folder / d} has no images")
        files += found
        labels += [index[d]] * len(found)
    if not files:
        raise DataError(f"no images found in {folder}")
    return classes, files, labels


def _holdout(labels: list[int], val_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic stratified split of positions -> (train positions, held-out positions)."""
    by_class: dict[int, list[int]] = {}
    for pos, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(pos)  # positions are in sorted-file order
    train, held = [], []
    for lab in sorted(by_class):
        pos = by_class[lab]
        n = len(pos)
        k = 0 if n < 2 else min(n - 1, max(1, round(val_fraction * n)))
        perm = np.random.default_rng(0).permutation(n)
        out = set(perm[:k].tolist())
        held += [pos[i] for i in range(n) if i in out]
        train += [pos[i] for i in range(n) if i not in out]
    return sorted(train), sorted(held)


def _load_folder(root: Path, split: str, image_size: int, hold: float | None,
                 require_labels: bool) -> ImageData:
    """`hold`: the fraction of train held out for validation when there is no val/ folder
    (None: nothing held out, the paper protocol)."""
    dirs = _subdirs(root)
    split_names = {n for names in _SPLIT_DIRS.values() for n in names}
    # root/train/<class>/ (+ val/ or test/); other folders next to train/ and val/ are ignored
    split_layout = "train" in dirs and (set(dirs) <= split_names or len(set(dirs) & split_names) > 1)
    train_root = root / "train" if split_layout else root

    def find(which: str) -> Path | None:
        for n in _SPLIT_DIRS[which] if split_layout else ():
            if (root / n).is_dir():
                return root / n
        return None

    val_dir, test_dir = find("val"), find("test")
    classes, files, labels = _scan_part(train_root, None, require_labels)
    part_dir = train_root
    # Without a val/ folder, validation is held out of train; a test/ folder stays the test
    # split. A folder with neither uses its held-out part for "test" too.
    held = val_dir is None and hold is not None
    pct = f"{hold * 100:g}%" if hold is not None else ""
    if split == "train":
        use = "val/test" if test_dir is None else "val; test/ is the test split"
        note = f"'train' split (minus the held-out {pct} used for {use})" if held else "'train' split"
    elif held and (split == "val" or test_dir is None):
        untouched = "; test/ untouched" if test_dir is not None else ""
        note = f"'{split}' split = held-out {pct} of train (stratified, seed 0{untouched})"
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
        train_pos, held_pos = _holdout(labels, hold)
        keep = train_pos if split == "train" else held_pos
        if not keep:
            raise DataError(f"{train_root}: too few images to hold out a validation split "
                            f"(a class needs at least 2 images)")
        files = [files[i] for i in keep]
        labels = [labels[i] for i in keep]

    images, labels_t, skipped = _decode_labelled(files, labels, classes, image_size,
                                                 f"image folder {part_dir}")
    kind = f"{len(classes)} classes" if classes else "unlabeled"
    where = f", {part_dir.relative_to(root)}/" if part_dir != root else ""
    return ImageData(images, labels_t, list(classes),
                     f"image folder {root} {note}{where} ({len(labels_t)} images, {kind})",
                     skipped)


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

class RandomErasingUint8(torch.nn.Module):
    """RandomErasing for uint8 CHW images: the erased box is filled with uniform uint8 noise.

    (torchvision's `value="random"` draws Gaussian noise, which does not fit uint8.)
    """

    def __init__(self, p: float, scale: tuple[float, float] = (0.02, 1 / 3),
                 ratio: tuple[float, float] = (0.3, 3.3)) -> None:
        super().__init__()
        self.p, self.scale = p, scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or torch.rand(()).item() >= self.p:
            return img
        c, h, w = img.shape[-3:]
        area = h * w
        for _ in range(10):
            target = area * torch.empty(()).uniform_(*self.scale).item()
            aspect = math.exp(torch.empty(()).uniform_(*self.log_ratio).item())
            eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < eh < h and 0 < ew < w:
                i = int(torch.randint(0, h - eh + 1, ()).item())
                j = int(torch.randint(0, w - ew + 1, ()).item())
                out = img.clone()
                out[..., i:i + eh, j:j + ew] = torch.randint(0, 256, (*img.shape[:-2], eh, ew),
                                                             dtype=img.dtype)
                return out
        return img

    def extra_repr(self) -> str:
        return f"p={self.p}, scale={self.scale}, fill=uniform uint8 noise"


def build_train_transform(aug: AugmentConfig, image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-sample augmentation of one uint8 CHW image (torchvision transforms v2) -> uint8 CHW."""
    from torchvision.transforms import v2

    steps: list[Callable] = []
    if aug.crop_padding > 0:
        mode = "reflect" if aug.crop_padding < image_size else "constant"
        steps.append(v2.RandomCrop(image_size, padding=aug.crop_padding, padding_mode=mode))
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.auto_augment == "trivial":
        steps.append(v2.TrivialAugmentWide())
    elif aug.auto_augment == "rand":
        steps.append(v2.RandAugment(num_ops=aug.randaug_num_ops, magnitude=aug.randaug_magnitude))
    elif aug.auto_augment != "none":
        raise DataError(f"unknown auto_augment {aug.auto_augment!r}: use trivial, rand or none")
    if aug.random_erasing > 0:
        steps.append(RandomErasingUint8(aug.random_erasing))
    return v2.Compose(steps) if steps else v2.Identity()


class _BatchMix:
    """MixUp / CutMix on a normalized float batch, applied with probability `prob`."""

    def __init__(self, mix: Callable, prob: float, num_classes: int) -> None:
        self.mix, self.prob, self.num_classes = mix, prob, num_classes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = images.dtype if images.is_floating_point() else torch.float32
        if self.prob >= 1.0 or torch.rand(()).item() < self.prob:
            images, targets = self.mix(images, labels)
            return images, targets.to(dtype)
        return images, F.one_hot(labels.long(), self.num_classes).to(dtype)

    def __repr__(self) -> str:
        return f"BatchMix(prob={self.prob}, {self.mix})"


def build_batch_mix(aug: AugmentConfig, num_classes: int
                    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """Batch-level MixUp/CutMix returning soft targets [B, num_classes]; None when disabled."""
    from torchvision.transforms import v2

    if aug.mix_prob <= 0 or (aug.mixup_alpha <= 0 and aug.cutmix_alpha <= 0):
        return None
    if num_classes < 2:
        raise ValueError(f"batch mixing needs at least 2 classes, got {num_classes}")
    ops = []
    if aug.mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=aug.mixup_alpha, num_classes=num_classes))
    if aug.cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=aug.cutmix_alpha, num_classes=num_classes))
    mix = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
    return _BatchMix(mix, float(aug.mix_prob), num_classes)


class Normalize(torch.nn.Module):
    """uint8 [B, 3, S, S] (or [3, S, S]) -> float32 (x/255 - mean) / std.

    The mean/std tensors belong to this module and are made once, on `device`, by whoever
    normalises many batches (the trainer, an evaluation, the exported graph): no small
    host-to-device copies per step. There is deliberately no process-wide cache of them: a
    cache filled while `torch.export` (the ONNX exporter) traces would hand the tracer's
    tensors to every later eager call in the process.

    Floating-point input is taken to be already scaled to [0, 1].
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str | None = None):
        super().__init__()
        shape = (-1, 1, 1)
        self.register_buffer("mean", torch.tensor([float(m) for m in mean], dtype=torch.float32,
                                                  device=device).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std], dtype=torch.float32,
                                                 device=device).view(shape), persistent=False)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8
        x = x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
        return x.sub_(self.mean).div_(self.std)


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`Normalize(mean, std)` applied once, on the input's device. For one-off calls; a loop
    over many batches keeps one `Normalize` instead (see there)."""
    return Normalize(mean, std, images_uint8.device)(images_uint8)


# --------------------------------------------------------------------------------------------
# Dataset, samplers, loader
# --------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finalizer: a cheap, well-spread integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample in one epoch (independent of worker count)."""
    return _mix64(_mix64(_mix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64)) >> 1


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


class AugmentedImages(Dataset):
    """(uint8 image, label) pairs from an `ImageData`, with an optional per-sample transform.

    An index may be a plain int, or `(index, seed)` as yielded by the loader's sampler: the
    transform then runs with the CPU generator seeded to `seed`, so augmentations depend only on
    (loader seed, epoch, sample) and not on the number of workers.
    """

    def __init__(self, data: ImageData, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.images = data.images
        self.labels = data.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        img = self.images[index]
        if self.transform is not None:
            if seed is None:
                img = self.transform(img) if _in_worker() else self._single_threaded(img)
            elif _in_worker():
                torch.default_generator.manual_seed(seed)  # a worker's RNG is its own
                img = self.transform(img)
            else:  # main process: do not disturb the caller's RNG stream
                state = torch.get_rng_state()
                torch.default_generator.manual_seed(seed)
                try:
                    img = self._single_threaded(img)
                finally:
                    torch.set_rng_state(state)
        return img, self.labels[index]

    def _single_threaded(self, img: torch.Tensor) -> torch.Tensor:
        # Tiny per-image ops gain nothing from intra-op threads, and on a busy machine the
        # thread pool's spinning made them 10x slower (workers already run with 1 thread).
        threads = torch.get_num_threads()
        if threads == 1:
            return self.transform(img)
        torch.set_num_threads(1)
        try:
            return self.transform(img)
        finally:
            torch.set_num_threads(threads)


class _ShuffleSampler(Sampler[int]):
    """Random permutation fixed by (seed, epoch), like DistributedSampler with one replica."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class EpochSampler(Sampler):
    """Wraps the index sampler; yields `(index, sample seed)` when augmenting.

    `set_epoch(e)` fixes the epoch (shuffle order and augmentation seeds). If it is not called
    between two passes, the epoch advances by itself, so passes never silently repeat.
    """

    def __init__(self, base: Sampler, seed: int, with_seeds: bool) -> None:
        self.base, self.seed, self.with_seeds = base, seed, with_seeds
        self.epoch, self._used = 0, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._used = int(epoch), False
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(self.epoch)

    def __iter__(self):
        if self._used:
            self.set_epoch(self.epoch + 1)
        self._used = True
        epoch = self.epoch
        if self.with_seeds:
            return ((i, sample_seed(self.seed, epoch, i)) for i in self.base)
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def _worker_init(worker_id: int) -> None:
    import random
    seed = torch.initial_seed() % 2**32  # torch already gives each worker base_seed + id
    random.seed(seed)
    np.random.seed(seed)


def build_loader(data: ImageData, batch_size: int, transform: Callable | None = None,
                 shuffle: bool = False, workers: int = 0, drop_last: bool = False, seed: int = 0,
                 distributed: bool = False) -> DataLoader:
    """DataLoader of uint8 (images [B, 3, S, S], labels int64 [B]).

    Order and augmentation are a function of (seed, epoch) only, for any worker count; call
    `set_epoch(loader, e)` (or `loader.sampler.set_epoch(e)`) before each epoch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dataset = AugmentedImages(data, transform)
    base: Sampler
    if distributed:
        base = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        base = _ShuffleSampler(len(dataset), seed)
    else:
        base = torch.utils.data.SequentialSampler(range(len(dataset)))
    sampler = EpochSampler(base, seed, with_seeds=transform is not None)
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=drop_last, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init,
                      generator=g)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Fix the epoch of a loader from `build_loader` (shuffle order and augmentation seeds)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
