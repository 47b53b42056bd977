"""Pixels in: image files and arrays -> uint8 [N, 3, S, S] at the model's image size.

Files are decoded once, with Pillow, in a small process pool for long lists. Every mode
(grey, RGBA, palette, 16-bit) becomes RGB; non-square images are resized aspect-preserving
(shorter side to S, bilinear, then a centre crop), square ones are simply resized; nothing
is resized that already has the right size. `predict` decodes its files with these same
functions, so it sees exactly the pixels training and `eval` see.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..files import walk_files


# --------------------------------------------------------------------------------------------
# Arrays (the datasets stored as arrays: CIFAR, SVHN, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

def to_uint8_images(images: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------
# Files: Pillow, decoded once, optionally in a small process pool
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
    """Image.open, trying the format the extension names first (much faster than probing),
    without Pillow's decompression-bomb check: Pillow judges an image by its full size when it
    opens it, so a 200-megapixel phone photo would be refused (and a 108-megapixel one warned
    about) although a JPEG is decoded downscaled (`draft`); `decode_one` applies Pillow's
    limit to the pixels it will actually decode."""
    from PIL import Image, UnidentifiedImageError
    fmt = _ext_formats().get(os.path.splitext(path)[1].lower())
    with _PILLOW_LIMIT:  # two threads lifting it at once: the second would put back "no limit", for good
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            if fmt is not None:
                try:
                    return Image.open(path, formats=(fmt,))
                except UnidentifiedImageError:
                    pass  # wrong extension: let Pillow probe every format
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _pillow_limit() -> int | None:
    """Pillow's decompression-bomb limit, as the user's program has it (not lifted by `_open_image`
    in another thread)."""
    from PIL import Image
    with _PILLOW_LIMIT:
        return Image.MAX_IMAGE_PIXELS


def _new_pillow_lock() -> None:
    global _PILLOW_LIMIT
    _PILLOW_LIMIT = threading.Lock()  # a forked child: a thread of the parent's may have held it


_PILLOW_LIMIT = threading.Lock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_pillow_lock)


def is_image_candidate(path: str) -> bool:
    """Image extension, or any other file whose header Pillow recognises."""
    if os.path.splitext(path)[1].lower() in _ext_formats():
        return True
    try:
        with _open_image(path):
            return True
    except Exception:  # noqa: BLE001 - not an image
        return False


def to_rgb(im: Any) -> Any:
    from PIL import Image
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        # A 16-bit image (I;16, or a PNG's "I": Pillow < 10.3 opens 16-bit grey PNGs so) always
        # comes down to 8 bits; judged by its values, a dark one would decode 257x too bright.
        sixteen_bit = im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG")
        if im.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0  # a float image in [0, 1] (a scientific TIFF): it decoded black
        elif sixteen_bit or (a.size and a.max() > 255):
            a = a * (255.0 / 65535.0)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def decode_one(path: str, size: int) -> np.ndarray | None:
    """One file -> uint8 [S, S, 3] (aspect-preserving resize + centre crop), None if undecodable."""
    try:
        with _open_image(path) as im:
            if im.format == "JPEG" and min(im.size) >= 2 * size:
                im.draft(im.mode, (size, size))  # let libjpeg downscale big photos cheaply
            limit = _pillow_limit()  # (Pillow warns above it, refuses above twice it)
            if limit is not None and im.size[0] * im.size[1] > 2 * limit:
                return None  # too many pixels to decode, even downscaled: Pillow's limit
            im.load()
            arr = fit_image(im, size)
    except Exception:  # noqa: BLE001 - any decoding failure means "skip this file"
        return None
    if arr.shape != (size, size, 3):
        return None
    return arr


def orientation(im: Any) -> int:
    """The image's EXIF Orientation (1: as stored; 2-8: how a viewer turns or flips it). A camera
    stores a portrait photo sideways with this tag; without it a phone photo would be trained
    on and classified lying on its side (Ultralytics applies it too). Only images carrying
    EXIF are looked at: the many without (CIFAR's JPEGs) pay nothing."""
    if "exif" not in im.info and im.format != "TIFF":
        return 1
    try:
        value = im.getexif().get(0x0112, 1)  # 0x0112: Orientation
    except Exception:  # noqa: BLE001 - unreadable EXIF: the pixels as stored, as before
        return 1
    return value if value in range(2, 9) else 1


def _turn(rgb: Any, orientation: int) -> Any:
    """`rgb` as a viewer shows an image of that EXIF `orientation` (Pillow's own table, as in
    `ImageOps.exif_transpose`)."""
    from PIL import Image
    T = Image.Transpose
    return rgb.transpose({2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
                          6: T.ROTATE_270, 7: T.TRANSVERSE, 8: T.ROTATE_90}[orientation])


def fit_image(im: Any, size: int) -> np.ndarray:
    """A Pillow image -> uint8 [S, S, 3]: RGB, upright (its EXIF orientation applied, as to a
    Pillow image given to `preprocess`: one turned by hand should drop the tag, as
    `ImageOps.exif_transpose` does), the shorter side resized to S (bilinear), the centre
    cropped; how every file is read for training, `eval` and `predict`."""
    from PIL import Image, ImageOps
    im.load()  # first: Pillow turns a TIFF itself as it loads it, and drops its tag
    turn = orientation(im)
    rgb = to_rgb(im)  # first: it reads the image's format (a 16-bit PNG's scale), which a turned copy loses
    if turn != 1:
        rgb = _turn(rgb, turn)
    if rgb.size != (size, size):
        rgb = ImageOps.fit(rgb, (size, size), method=Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _decode_chunk(args: tuple[list[str], int]) -> tuple[np.ndarray, np.ndarray]:
    paths, size = args
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    for i, p in enumerate(paths):
        arr = decode_one(p, size)
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
    return min(usable_cpus(), 8)


def _leave_signals_to_the_parent() -> None:
    """A decode worker ignores Ctrl-C and SIGTERM, which a terminal or scheduler sends the whole
    process group: one killed while it wrote its result left the pool's reader waiting forever
    for the rest of the message. The parent, interrupted, ends the workers (`_kill_new_children`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_new_children(before: set) -> None:
    """SIGKILL the child processes started since `before` was taken (they ignore SIGTERM): a
    worker forked as the signal came, before the pool could hand it work or a stop, was joined
    by multiprocessing's exit handler forever."""
    for child in set(multiprocessing.active_children()) - before:
        child.kill()
        child.join(5)


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:
        return os.cpu_count() or 1


def decode_files(paths: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
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
                before = set(multiprocessing.active_children())
                with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_leave_signals_to_the_parent) as ex:
                    # not `ex.map`: interrupted, it cancels the futures, and Python 3.11's pool then
                    # fails on them ("InvalidStateError") when the killed workers break it
                    try:
                        futures = [ex.submit(_decode_chunk, job) for job in jobs]
                        results = [f.result() for f in futures]
                    except BaseException:  # Ctrl-C, SIGTERM (`cli.Terminated`): the pool ends now, not after its chunks
                        _kill_new_children(before)
                        raise
            return (np.concatenate([r[0] for r in results]),
                    np.concatenate([r[1] for r in results]))
        except (OSError, RuntimeError, ValueError):  # no pool here (e.g. sandbox): decode inline
            pass
    return _decode_chunk((paths, size))


def decode_labelled(paths: list[str], labels: list[int], classes: list[str], size: int,
                    where: str, every_class: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode files; skip undecodable ones; fail if a class present in `labels` vanishes, when
    `every_class` (a training split: a class with nothing to learn from). A validation or test
    split may lose one: with a few images a class, the part held out for validation can be just
    the one file that does not decode, and the class is then scored on none."""
    images, ok = decode_files(paths, size)
    skipped = [p for p, good in zip(paths, ok) if not good]
    lab = np.asarray(labels, dtype=np.int64)
    if not ok.all():
        had = set(lab.tolist())
        images, lab = images[ok], lab[ok]
        lost = sorted(had - set(lab.tolist()))
        if lost and classes and every_class:
            names = ", ".join(repr(classes[c]) for c in lost[:5]) + (" ..." if len(lost) > 5 else "")
            raise DataError(f"{where}: no readable image left for class(es) {names} "
                            f"({len(skipped)} undecodable files, e.g. {skipped[0]})")
    if len(lab) == 0:
        raise DataError(f"{where}: none of the {len(paths)} image files could be decoded "
                        f"(e.g. {paths[0]})" if paths else f"{where}: no images")
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return tensor, torch.from_numpy(lab), skipped


# --------------------------------------------------------------------------------------------
# Finding image files in folders
# --------------------------------------------------------------------------------------------

def list_images(folder: Path) -> list[str]:
    """The image files directly in `folder` (not below it), sorted by name, no hidden ones."""
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except OSError:
        return []
    return [str(folder / n) for n in names if (folder / n).is_file()
            and is_image_candidate(str(folder / n))]


def walk_images(folder: Path) -> list[str]:
    """All image files under `folder`, recursively, sorted by relative path, no hidden ones."""
    return [str(p) for p in walk_files(folder) if is_image_candidate(str(p))]
