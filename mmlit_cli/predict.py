"""`predict`: class probabilities for image files, with a checkpoint or an exported ONNX file.

Images are read and resized exactly as training and `eval` read an image folder: the same
decoder (`data.decode_one`: Pillow, grey/RGBA/palette/16-bit -> RGB, aspect-preserving
resize of the shorter side to the model's image size + centre crop, bilinear) and the same
`data.Normalize`. Files are decoded in chunks and run through the model in batches under
`torch.inference_mode()`, so large folders stay quick and memory stays bounded. An ONNX file
gets the same uint8 pixels (its graph normalises them itself) and runs with ONNX Runtime.

A file that cannot be decoded (not an image, truncated, unreadable) is a failure with a
one-line reason; the other files are still predicted.
"""

from __future__ import annotations

import csv
import glob
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import SAMPLE_DIR, Normalize, decode_files, to_rgb
from .errors import MmlitError, one_line
from .evaluate import load_classifier
from .files import atomic_write, file_in_the_way, walk_files
from .runtime import amp_dtype, forward_batch, maybe_compile, resolve_device

_GLOB_CHARS = ("*", "?", "[")
_DECODE_CHUNK = 4096  # files decoded at once (data.decode_files uses a process pool from 4000)
_DECODE_BYTES = 256 * 2**20  # ... unless the decoded chunk would exceed this many bytes


@dataclass
class PredictResult:
    """`predictions`: one dict per decoded file, in input order:
    `{"path": str, "top": [{"label": str, "prob": float}, ...]}` (top-k, most probable first).
    `failures`: `(path, one-line reason)` for every file or pattern that gave no prediction."""

    predictions: list[dict] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    top_k: int = 0
    seconds: float = 0.0
    repeated: int = 0  # names of files already named (`collect_images`): each file is predicted once

    def as_dict(self) -> dict:
        """JSON-ready: `{"predictions": [...], "failures": [{"path", "reason"}, ...]}`."""
        return {"predictions": self.predictions,
                "failures": [{"path": p, "reason": r} for p, r in self.failures]}

    @property
    def images_per_s(self) -> float:
        return len(self.predictions) / max(self.seconds, 1e-9)


# --------------------------------------------------------------------------------------------
# Collecting files
# --------------------------------------------------------------------------------------------

def collect_images(paths: list[str]) -> tuple[list[Path], list[tuple[str, str]], int]:
    """Expand PATH arguments into candidate files -> (files, [(path, reason), ...], repeated).

    A PATH is a file (taken as is), a folder (every non-hidden file below it, recursively,
    sorted) or a glob pattern (`*.jpg`, `photos/**/*.png`; `**` spans folders; matched folders
    are expanded like folders). Files are not opened here: a non-image file in a folder
    becomes a failure at prediction time. A PATH that yields no file is an error entry.
    A file named more than once (`photos/ photos/a.jpg`) is taken once, where first named;
    `repeated` counts the names dropped so, for the caller to say.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    errors: list[tuple[str, str]] = []
    seen: set[str] = set()
    repeated = 0

    def add(found: list[Path]) -> None:
        nonlocal repeated
        for f in found:
            key = os.path.normcase(os.path.abspath(f))
            if key not in seen:
                seen.add(key)
                files.append(f)
            else:
                repeated += 1

    for raw in paths:
        text = os.path.expanduser(str(raw))
        p = Path(text)
        if p.is_file():
            add([p])
        elif p.is_dir():
            found = walk_files(p)
            if found:
                add(found)
            else:
                errors.append((str(raw), "folder holds no files"))
        elif any(c in text for c in _GLOB_CHARS):
            matches = sorted(glob.glob(text, recursive=True))
            found = []
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    found += walk_files(mp)
                elif mp.is_file():
                    found.append(mp)
            if found:
                add(found)
            else:
                errors.append((str(raw), "no file matches this pattern"))
        elif p.exists():
            errors.append((str(raw), "not a regular file or folder"))
        else:
            errors.append((str(raw), "no such file or folder"))
    return files, errors, repeated


# --------------------------------------------------------------------------------------------
# Decoding and predicting
# --------------------------------------------------------------------------------------------

def failure_reason(path: Path) -> str:
    """Why `data.decode_one` refused a file: open it again the same way, keep the error."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # Pillow opens lazily: truncated data only fails here
            rgb = to_rgb(im)
            rgb.load()
    except FileNotFoundError:
        return "file not found"
    except PermissionError:
        return "permission denied"
    except Image.UnidentifiedImageError:
        return "not an image Pillow can read"
    except Exception as exc:  # noqa: BLE001 - any decoder error is reported, not raised
        return f"cannot decode image ({one_line(exc)})"
    return "cannot decode image"


def _chunk_size(image_size: int) -> int:
    return max(1, min(_DECODE_CHUNK, _DECODE_BYTES // (3 * image_size * image_size)))


def is_onnx(path: str | os.PathLike) -> bool:
    """`predict` runs a file ending in .onnx with ONNX Runtime, anything else as a checkpoint."""
    return str(path).lower().endswith(".onnx")


def _torch_runner(ckpt_path, device: str, compile: bool, compile_mode: str | None):
    """(class names, image size, uint8 batch -> probabilities) for a checkpoint."""
    dev = resolve_device(device)
    model, ckpt = load_classifier(ckpt_path, dev)
    model = maybe_compile(model, compile, compile_mode)
    amp = amp_dtype(dev)
    normalize = Normalize(ckpt.mean, ckpt.std, dev)

    def probs(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return forward_batch(model, batch, normalize, dev, amp).float().softmax(dim=1)

    return ckpt.class_names, ckpt.image_size, probs


def _onnx_runner(path, device: str, compile: bool, compile_mode: str | None):
    """The same for an ONNX file written by `mmlit export` (fp32 or int8), on the CPU with
    ONNX Runtime; class names and image size come from the file's metadata."""
    from .onnx_classifier import OnnxClassifier

    if compile or compile_mode:
        raise MmlitError("--compile applies to checkpoints; an ONNX file runs with ONNX Runtime as it is")
    if device not in ("auto", "cpu"):
        raise MmlitError(f"an ONNX file runs on the CPU with ONNX Runtime: drop --device {device}")
    onnx_model = OnnxClassifier.open(path, threads=0)  # 0: ONNX Runtime's default, every core

    def probs(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(onnx_model.logits(batch.numpy())).softmax(dim=1)

    return onnx_model.classes, onnx_model.image_size, probs


def sample_images() -> list[str]:
    """What `predict` runs on when it is given no image (as Ultralytics predicts its bundled
    assets): the first test image of each class of the bundled sample."""
    test = SAMPLE_DIR / "test"
    if not test.is_dir():
        raise MmlitError(f"no image given, and the bundled sample is missing ({test}): pass image files, "
                         f"folders or glob patterns")
    return [str(min(d.glob("*.jpg"))) for d in sorted(test.iterdir()) if d.is_dir() and any(d.glob("*.jpg"))]


def predict_paths(ckpt_path: str | Path, paths: list[str], top_k: int = 5, batch_size: int = 256,
                  device: str | torch.device | None = "auto", compile: bool = False, compile_mode: str | None = None) -> PredictResult:
    """Top-k class probabilities (softmax) for every image among `paths` (see `collect_images`).

    `ckpt_path` is a checkpoint, or an ONNX file written by `mmlit export` (`*.onnx`, run with
    ONNX Runtime; class names and preprocessing from its metadata). `top_k` is capped at the
    number of classes. Files that cannot be decoded, and PATHs that match nothing, end up in
    `.failures`; raises `MmlitError` for a bad checkpoint or ONNX file (including an MAE
    checkpoint), bad arguments, or when no PATH yields any file at all.
    `compile` / `compile_mode`: `torch.compile` the model first (worth it for many images).
    """
    if not isinstance(ckpt_path, (str, os.PathLike)):  # a model from load_model: it was a raw TypeError
        raise MmlitError(f"predict_paths takes the path of a checkpoint or ONNX file, not a "
                         f"{type(ckpt_path).__name__}; for a loaded model, model(preprocess(images, model)) gives "
                         f"its logits")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise MmlitError(f"--top-k must be a positive integer, got {top_k!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise MmlitError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    device = "auto" if device is None else str(device)  # as load_model: None, "cuda:1", torch.device(...)
    if not paths:
        raise MmlitError("no image given: pass image files, folders or glob patterns")
    runner = _onnx_runner if is_onnx(ckpt_path) else _torch_runner
    classes, size, probs_of = runner(ckpt_path, device, compile, compile_mode)
    k = min(top_k, len(classes))

    files, failures, repeated = collect_images(paths)
    if not files:
        shown = "; ".join(f"{p}: {r}" for p, r in failures[:3])
        raise MmlitError(f"no file to predict ({shown})")

    start = time.perf_counter()
    result = PredictResult(classes=classes, top_k=k, repeated=repeated)
    step = _chunk_size(size)
    for c0 in range(0, len(files), step):
        chunk = files[c0:c0 + step]
        arrays, ok = decode_files([str(f) for f in chunk], size)
        for f, good in zip(chunk, ok):
            if not good:
                failures.append((str(f), failure_reason(f)))
        good_files = [f for f, good in zip(chunk, ok) if good]
        if not good_files:
            continue
        images = torch.from_numpy(arrays[ok]).permute(0, 3, 1, 2)
        for b0 in range(0, len(good_files), batch_size):
            top_p, top_i = probs_of(images[b0:b0 + batch_size].contiguous()).topk(k, dim=1)
            for f, ps, idx in zip(good_files[b0:b0 + batch_size], top_p.tolist(), top_i.tolist()):
                result.predictions.append(
                    {"path": str(f), "top": [{"label": classes[i], "prob": p} for p, i in zip(ps, idx)]})
    result.failures = failures
    result.seconds = time.perf_counter() - start
    return result


def csv_rows(result: PredictResult) -> list[list[str]]:
    """The predictions as CSV rows, header first.

    Columns: `path,label,prob` (the top-1 class and its probability), then
    `label_2,prob_2, ..., label_k,prob_k` for the rest of the top-k. Probabilities have 6
    decimals. One row per predicted file, in input order; failures are not written.
    """
    k = max((len(p["top"]) for p in result.predictions), default=result.top_k or 1)
    header = ["path", "label", "prob"]
    for j in range(2, k + 1):
        header += [f"label_{j}", f"prob_{j}"]
    rows = [header]
    for p in result.predictions:
        row = [p["path"]]
        for t in p["top"]:
            row += [t["label"], f"{t['prob']:.6f}"]
        rows.append(row)
    return rows


def check_csv_target(path: str) -> None:
    """Refuse, before any prediction, a `--csv` file that is there already (a link too, even
    one to nothing), a folder, or a path under a file."""
    p = Path(path)
    if path.endswith(("/", os.sep)) or p.is_dir():
        raise MmlitError(f"{path} is a folder: --csv takes a file name (e.g. {p / 'predictions.csv'})")
    if p.exists() or p.is_symlink():
        raise MmlitError(f"{path} already exists: choose another --csv file")
    blocking = file_in_the_way(p)
    if blocking is not None:
        raise MmlitError(f"{blocking} is a file, not a folder: choose another --csv file")
    folder = next(f for f in (p.absolute().parent, *p.absolute().parent.parents) if f.exists())
    try:  # a place that takes no file (a read-only mount, /proc) is found before the predictions, not after
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise MmlitError(f"cannot write {path}: {folder} takes no new file ({e.strerror or one_line(e)})") from None


def write_csv(result: PredictResult, path: str | Path) -> Path:
    """Write the predictions as CSV (`csv_rows`), atomically, never over an existing file (one
    that appeared while predicting included); returns the path."""
    path = Path(path)

    def write(tmp: str) -> None:
        # surrogateescape: a file name that is not UTF-8 is written as the bytes it has on disk
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            csv.writer(f).writerows(csv_rows(result))

    try:
        atomic_write(path, write, replace=False)
    except FileExistsError:
        raise MmlitError(f"{path} already exists (it was not there when predicting began?): not overwritten; "
                         f"choose another --csv file") from None
    except OSError as exc:
        raise MmlitError(f"cannot write {path} ({one_line(exc)})") from None
    return path
