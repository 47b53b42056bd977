"""Writers of tiny datasets in their real on-disk formats (for tests; no network needed).

Every writer takes a root folder, writes the files exactly where the official archive (or
torchvision's downloader) puts them, and returns what was written so tests can compare.
Images are numpy uint8 arrays in [N, C, H, W] unless said otherwise.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
CIFAR100_CLASSES = [f"fine_{i:02d}" for i in range(100)]


def rand_images(n: int, h: int, w: int | None = None, c: int = 3, seed: int = 0) -> np.ndarray:
    """Deterministic random uint8 images [n, c, h, w]."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, c, h, w or h), dtype=np.uint8)


def cycle_labels(n: int, num_classes: int, offset: int = 0) -> np.ndarray:
    return (np.arange(n) + offset) % num_classes


# ---------------------------------------------------------------------------------- CIFAR

def _dump(obj, path: Path, protocol: int, legacy_numpy: bool = False) -> None:
    raw = pickle.dumps(obj, protocol=protocol)
    if legacy_numpy:  # the official (Python 2 era) files name numpy.core, not numpy._core
        assert protocol <= 3, "the GLOBAL opcode holds module names as plain text up to protocol 3"
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    Path(path).write_bytes(raw)


def write_cifar10_python(root: str | os.PathLike, n_per_batch: int = 4, n_test: int = 6,
                         protocol: int = 2, legacy_numpy: bool = False) -> dict:
    """`root/cifar-10-batches-py/`: data_batch_1..5, test_batch, batches.meta (pickled dicts
    with bytes keys, as in the official archive; `legacy_numpy` names numpy.core.multiarray
    like the official files do)."""
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    train_x, train_y = [], []
    for b in range(1, 6):
        x = rand_images(n_per_batch, 32, seed=b)
        y = cycle_labels(n_per_batch, 10, offset=b)
        _dump({b"batch_label": f"training batch {b} of 5".encode(), b"labels": y.tolist(),
               b"data": x.reshape(n_per_batch, -1),
               b"filenames": [f"img_{b}_{i}.png".encode() for i in range(n_per_batch)]},
              d / f"data_batch_{b}", protocol, legacy_numpy)
        train_x.append(x)
        train_y.append(y)
    tx, ty = rand_images(n_test, 32, seed=99), cycle_labels(n_test, 10)
    _dump({b"batch_label": b"testing batch 1 of 1", b"labels": ty.tolist(),
           b"data": tx.reshape(n_test, 3072), b"filenames": [b"t.png"] * n_test},
          d / "test_batch", protocol, legacy_numpy)
    _dump({b"num_cases_per_batch": n_per_batch, b"num_vis": 3072,
           b"label_names": [n.encode() for n in CIFAR10_CLASSES]}, d / "batches.meta", protocol)
    return {"dir": d, "train": (np.concatenate(train_x), np.concatenate(train_y)),
            "test": (tx, ty), "classes": CIFAR10_CLASSES}


def write_cifar10_binary(root: str | os.PathLike, n_per_batch: int = 4, n_test: int = 6) -> dict:
    """`root/cifar-10-batches-bin/`: data_batch_1..5.bin, test_batch.bin (records of
    <1 label byte><3072 pixel bytes>), batches.meta.txt."""
    d = Path(root) / "cifar-10-batches-bin"
    d.mkdir(parents=True, exist_ok=True)

    def write(path: Path, x: np.ndarray, y: np.ndarray) -> None:
        rec = np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(x), -1)], axis=1)
        rec.tofile(path)

    train_x, train_y = [], []
    for b in range(1, 6):
        x, y = rand_images(n_per_batch, 32, seed=10 + b), cycle_labels(n_per_batch, 10, b)
        write(d / f"data_batch_{b}.bin", x, y)
        train_x.append(x)
        train_y.append(y)
    tx, ty = rand_images(n_test, 32, seed=77), cycle_labels(n_test, 10, 3)
    write(d / "test_batch.bin", tx, ty)
    (d / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n\n")
    return {"dir": d, "train": (np.concatenate(train_x), np.concatenate(train_y)),
            "test": (tx, ty), "classes": CIFAR10_CLASSES}


def write_cifar100_python(root: str | os.PathLike, n_train: int = 8, n_test: int = 5,
                          protocol: int = 2) -> dict:
    """`root/cifar-100-python/`: train, test (b"fine_labels", b"coarse_labels", b"data"), meta."""
    d = Path(root) / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    out = {"dir": d, "classes": CIFAR100_CLASSES}
    for part, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        x, y = rand_images(n, 32, seed=seed), (np.arange(n) * 13 + seed) % 100
        _dump({b"filenames": [b"f.png"] * n, b"batch_label": part.encode(),
               b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist(),
               b"data": x.reshape(n, -1)}, d / part, protocol)
        out[part] = (x, y)
    _dump({b"fine_label_names": [c.encode() for c in CIFAR100_CLASSES],
           b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]}, d / "meta", protocol)
    return out


def write_cifar100_binary(root: str | os.PathLike, n_train: int = 8, n_test: int = 5) -> dict:
    """`root/cifar-100-binary/`: train.bin, test.bin (<coarse><fine><3072 bytes>),
    fine_label_names.txt, coarse_label_names.txt."""
    d = Path(root) / "cifar-100-binary"
    d.mkdir(parents=True, exist_ok=True)
    out = {"dir": d, "classes": CIFAR100_CLASSES}
    for part, n, seed in (("train", n_train, 5), ("test", n_test, 6)):
        x, y = rand_images(n, 32, seed=seed), (np.arange(n) * 7 + seed) % 100
        rec = np.concatenate([(y // 5).astype(np.uint8)[:, None], y.astype(np.uint8)[:, None],
                              x.reshape(n, -1)], axis=1)
        rec.tofile(d / f"{part}.bin")
        out[part] = (x, y)
    (d / "fine_label_names.txt").write_text("\n".join(CIFAR100_CLASSES) + "\n")
    (d / "coarse_label_names.txt").write_text("\n".join(f"coarse_{i}" for i in range(20)) + "\n")
    return out


class _Evil:
    """Pickles to `func(arg)`: what a malicious 'CIFAR batch' would contain."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def write_malicious_pickle(path: str | os.PathLike, command: str, use_eval: bool = False) -> None:
    """A pickle that runs `os.system(command)` (or `eval(...)`) when loaded with plain pickle."""
    payload = (_Evil(eval, f"__import__('os').system({command!r})") if use_eval
               else _Evil(os.system, command))
    with open(path, "wb") as f:
        pickle.dump({b"data": payload, b"labels": [0]}, f, protocol=2)


# ---------------------------------------------------------------------------------- SVHN

def write_svhn(root: str | os.PathLike, n_train: int = 7, n_test: int = 5) -> dict:
    """`root/train_32x32.mat`, `root/test_32x32.mat` with X [32, 32, 3, N], y [N, 1] in 1..10."""
    from scipy.io import savemat

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for part, n, seed in (("train", n_train, 3), ("test", n_test, 4)):
        x = rand_images(n, 32, seed=seed)
        digits = np.arange(n) % 10  # 0..9
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
        savemat(root / f"{part}_32x32.mat", {"X": np.ascontiguousarray(x.transpose(2, 3, 1, 0)),
                                              "y": y})
        out[part] = (x, digits)
    return out


# ---------------------------------------------------------------------------------- Flowers102

def write_flowers102(root: str | os.PathLike, n_train: int = 4, n_val: int = 3,
                     n_test: int = 5) -> dict:
    """`root/flowers-102/` with jpg/image_00001.jpg..., imagelabels.mat (labels 1..102, shape
    [1, N]) and setid.mat (trnid, valid, tstid: 1-based image ids)."""
    from scipy.io import savemat

    d = Path(root) / "flowers-102"
    (d / "jpg").mkdir(parents=True, exist_ok=True)
    n = n_train + n_val + n_test
    rng = np.random.default_rng(0)
    labels = (np.arange(n) * 37) % 102 + 1  # 1-based
    for i in range(1, n + 1):
        h, w = int(rng.integers(40, 60)), int(rng.integers(50, 80))  # non-square photos
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / "jpg" / f"image_{i:05d}.jpg", quality=90)
    ids = rng.permutation(np.arange(1, n + 1))
    split = {"trnid": np.sort(ids[:n_train]), "valid": np.sort(ids[n_train:n_train + n_val]),
             "tstid": np.sort(ids[n_train + n_val:])}
    savemat(d / "imagelabels.mat", {"labels": labels[None, :].astype(np.uint8)})
    savemat(d / "setid.mat", {k: v[None, :].astype(np.uint16) for k, v in split.items()})
    return {"dir": d, "labels": labels - 1, "ids": split}


# ---------------------------------------------------------------------------------- Fashion-MNIST

def write_idx(path: str | os.PathLike, arr: np.ndarray) -> None:
    """idx format: 2 zero bytes, type code (0x08 = ubyte), ndim, big-endian dims, data."""
    arr = np.asarray(arr, dtype=np.uint8)
    data = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data += arr.tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_fashion_mnist(root: str | os.PathLike, n_train: int = 12, n_test: int = 6,
                        gz: bool = True, layout: str = "flat") -> dict:
    """The four idx files; layout "flat" (root/), "torchvision" (root/FashionMNIST/raw/) or
    "named" (root/fashion-mnist/)."""
    sub = {"flat": ".", "torchvision": "FashionMNIST/raw", "named": "fashion-mnist"}[layout]
    d = Path(root) / sub
    d.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    out = {"dir": d.resolve()}
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x = rand_images(n, 28, c=1, seed=seed)[:, 0]
        y = cycle_labels(n, 10, seed)
        write_idx(d / f"{prefix}-images-idx3-ubyte{ext}", x)
        write_idx(d / f"{prefix}-labels-idx1-ubyte{ext}", y)
        out["train" if prefix == "train" else "test"] = (x, y)
    return out


# ---------------------------------------------------------------------------------- Tiny-ImageNet

def write_tiny_imagenet(root: str | os.PathLike, wnids=("n01443537", "n01629819", "n02123045"),
                        n_train: int = 3, n_val: int = 2, words: bool = True) -> dict:
    """`root/tiny-imagenet-200/`: wnids.txt, words.txt, train/<wnid>/images/*.JPEG (+ boxes),
    val/images/*.JPEG + val/val_annotations.txt, test/images/*.JPEG (unlabelled)."""
    d = Path(root) / "tiny-imagenet-200"
    d.mkdir(parents=True, exist_ok=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    if words:
        names = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander",
                 "n02123045": "tabby, tabby cat", "n09999999": "not in this dataset"}
        (d / "words.txt").write_text("".join(f"{w}\t{names.get(w, w + ' thing')}\n"
                                             for w in (*wnids, "n09999999")))
    rng = np.random.default_rng(1)

    def jpeg(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, "JPEG")

    for w in wnids:
        for i in range(n_train):
            jpeg(d / "train" / w / "images" / f"{w}_{i}.JPEG")
        (d / "train" / w / f"{w}_boxes.txt").write_text(
            "".join(f"{w}_{i}.JPEG\t0\t0\t10\t10\n" for i in range(n_train)))
    lines, val_labels = [], []
    for k in range(n_val * len(wnids)):
        w = wnids[k % len(wnids)]
        jpeg(d / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{w}\t1\t2\t30\t40\n")
        val_labels.append(k % len(wnids))
    (d / "val" / "val_annotations.txt").write_text("".join(lines))
    jpeg(d / "test" / "images" / "test_0.JPEG")
    return {"dir": d, "wnids": list(wnids), "val_labels": val_labels}


# ---------------------------------------------------------------------------------- image folders

def save_image(path: str | os.PathLike, arr_hwc: np.ndarray, mode: str | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr_hwc, mode=mode).save(path)


def write_image_folder(root: str | os.PathLike, counts: dict[str, int], size: int = 20,
                       ext: str = "png", seed: int = 0) -> dict[str, np.ndarray]:
    """`root/<class>/<i>.<ext>` RGB images; returns {path: HWC array} (exact for png)."""
    rng = np.random.default_rng(seed)
    written = {}
    for cls, n in counts.items():
        for i in range(n):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            p = Path(root) / cls / f"{i:03d}.{ext}"
            save_image(p, arr)
            written[str(p.resolve())] = arr
    return written


def write_unlabeled_folder(root: str | os.PathLike, n: int = 5, size: int = 20) -> list[Path]:
    """Images directly in `root`, no class sub-folders (MAE pre-training data)."""
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        p = Path(root) / f"img_{i}.png"
        save_image(p, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        paths.append(p)
    return paths


def write_grey_png(path: str | os.PathLike, size: int = 20, value: int | None = None) -> np.ndarray:
    arr = (np.full((size, size), value, np.uint8) if value is not None
           else np.random.default_rng(5).integers(0, 256, (size, size), dtype=np.uint8))
    save_image(path, arr)
    return arr


def write_rgba_png(path: str | os.PathLike, size: int = 20) -> np.ndarray:
    arr = np.random.default_rng(6).integers(0, 256, (size, size, 4), dtype=np.uint8)
    save_image(path, arr)
    return arr


def write_palette_png(path: str | os.PathLike, size: int = 20) -> np.ndarray:
    """A palette ("P") PNG; returns its RGB rendering."""
    rgb = np.random.default_rng(7).integers(0, 256, (size, size, 3), dtype=np.uint8)
    im = Image.fromarray(rgb).quantize(colors=16)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return np.asarray(im.convert("RGB"))


def write_corrupt_jpeg(path: str | os.PathLike) -> None:
    """A .jpg with a valid JPEG start but garbage after it (and truncated)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x13\x37" * 50)
