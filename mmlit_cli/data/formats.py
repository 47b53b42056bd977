"""File formats of the named datasets, read without trusting them.

* CIFAR pickles go through a restricted unpickler (`_SafeUnpickler`) that only rebuilds numpy
  arrays and plain containers; anything else in a pickle is refused with a `DataError`.
  CIFAR's binary version is read as raw records.
* SVHN and Flowers102 ship MATLAB `.mat` files (read with scipy).
* Fashion-MNIST ships idx files (MNIST's format), plain or gzipped.

Every broken file is one `DataError` line naming the file.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, one_line


# --------------------------------------------------------------------------------------------
# CIFAR: python pickles read with a restricted unpickler, or the binary version
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
        raise DataError(f"{path} is not a readable CIFAR pickle ({one_line(exc)})") from None
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


def cifar_pickle_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _safe_unpickle(path)
    data = np.asarray(_get(d, "data", path))
    try:
        labels = np.asarray(_get(d, label_key, path), dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError):  # None, ragged lists, text: not N integers
        raise DataError(f"{path} is malformed: its {label_key!r} are not a list of integer labels") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path} is malformed: expected uint8 data [N, 3072] and N labels, got "
                        f"{data.dtype} {list(data.shape)} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def cifar_binary_batch(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    rec = label_bytes + 3072
    if raw.size == 0 or raw.size % rec:
        raise DataError(f"{path} is malformed: size {raw.size} is not a multiple of {rec} bytes")
    raw = raw.reshape(-1, rec)
    labels = raw[:, label_bytes - 1].astype(np.int64)  # cifar100: (coarse, fine) -> fine
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def cifar_pickle_names(path: Path, key: str) -> list[str]:
    """The class names in a CIFAR python meta file (`batches.meta`, `meta`)."""
    return _decode_names(_get(_safe_unpickle(path), key, path), path)


# --------------------------------------------------------------------------------------------
# Text, .mat (SVHN, Flowers102) and idx (Fashion-MNIST) files
# --------------------------------------------------------------------------------------------

def read_text_names(path: Path) -> list[str]:
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first name
        return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} ({one_line(exc)})") from None


def read_mat(path: Path, names: list[str]) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"reading {path.name} needs scipy: pip install scipy") from None
    try:
        d = loadmat(str(path), variable_names=names)
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for broken files
        raise DataError(f"cannot read {path} ({one_line(exc)})") from None
    missing = [k for k in names if k not in d]
    if missing:
        raise DataError(f"{path} has no variable(s) {', '.join(missing)}")
    return d


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
        raise DataError(f"cannot read {path} ({one_line(exc)})") from None
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
