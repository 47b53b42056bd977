"""Files: written atomically, and found in folders in one fixed order.

Every file mmlit writes (checkpoints, metrics, config.yaml, figures, CSV, ONNX) goes through
`atomic_write`, so a reader or a SIGKILL never sees half of one. `walk_files` is the one way
a folder is listed (image folders for training and `eval`, folders given to `predict`), so
the same folder always gives the same files in the same order.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: a reader (or a SIGKILL) never
    sees a half-written file, and the previous file stays intact until the new one is whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def walk_files(folder: Path) -> list[Path]:
    """Every non-hidden file under `folder`, recursively (hidden folders skipped), sorted by
    the parts of its path relative to `folder`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder).parts
        found += [rel + (f,) for f in filenames if not f.startswith(".")]
    found.sort()
    return [Path(folder).joinpath(*parts) for parts in found]
