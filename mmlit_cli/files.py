"""Files: written atomically, and found in folders in one fixed order.

Every file mmlit writes (checkpoints, metrics, config.yaml, figures, CSV, ONNX) goes through
`atomic_write`, so a reader or a SIGKILL never sees half of one. `walk_files` is the one way
a folder is listed (image folders for training and `eval`, folders given to `predict`), so
the same folder always gives the same files in the same order. `new_run_dir` is where a
command writes (training runs and `eval`); `claim_run_dir` makes it before the command's work,
and `removed_if_left_empty` takes it away again when the work fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
import threading
from pathlib import Path

from .errors import MmlitError, readable

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    # Reading the umask means setting it: the lock keeps two threads that write files (a
    # run's checkpoints are written on their own) from leaving it at 0.
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def file_in_the_way(path: Path) -> Path | None:
    """The file standing where a folder above `path` must be (`notes.txt` of `notes.txt/run`), if any."""
    return next((p for p in reversed(Path(path).parents) if p.exists() and not p.is_dir()), None)


def atomic_write(path: Path, write, replace: bool = True) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: a reader (or a SIGKILL) never
    sees a half-written file, and the previous file stays intact until the new one is whole.
    With `replace=False` an existing `path` is never touched: `FileExistsError`, even if the
    file appeared while `write` ran (the finished file is hard-linked to `path`, which fails
    if the name is taken)."""
    path = Path(path)
    made = tuple(p for p in path.parents if not p.exists())  # removed again if the write fails
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # not "already exists": a file stands where a folder must
        blocking = file_in_the_way(path)
        if blocking is None:  # the file has gone since (a race): the error as it was
            raise
        raise NotADirectoryError(f"{blocking} is a file, not a folder") from None
    with removed_if_left_empty(made):
        _write_then_rename(path, write, replace)


def _write_then_rename(path: Path, write, replace: bool) -> None:
    """`atomic_write`'s work, its folder made: the temporary file, written, synced, renamed."""
    tmp = None
    try:
        # the name cut to 200 bytes (whole characters): a name of up to 255 bytes, the limit, still
        # gets a temporary one
        stem = path.name
        while len(os.fsencode(stem)) > 200:
            stem = stem[:-1]
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        if not replace and path.exists():
            raise FileExistsError(f"{path} already exists")
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _claim(tmp, path)
        _sync_folder(path.parent)
    except OSError as e:
        # the hidden temporary file is ours, not the user's: an error names the file they asked for
        if e.errno is not None and (tmp is None or e.filename == tmp):
            raise type(e)(e.errno, e.strerror, str(path)) from None  # (a new one: str() keeps a filename2)
        raise
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    """The folder's entry for a renamed file made durable: without it, a power cut after the
    "saved" line could bring back the checkpoint before. (Where a folder cannot be opened or
    synced, Windows and some network filesystems, the rename stands as the filesystem keeps it.)"""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# what a filesystem without hard links (vfat, exFAT, some FUSE and SMB mounts) says to os.link
_NO_HARD_LINKS = {getattr(errno, name) for name in ("EPERM", "EOPNOTSUPP", "ENOTSUP", "ENOSYS") if hasattr(errno, name)}


def _claim(tmp: str, path: Path) -> None:
    """Put the finished `tmp` at `path` only if no file has that name (FileExistsError if one
    has): a hard link is atomic and refuses a taken name; where the filesystem has none, the
    name is claimed by creating it exclusively, then replaced by the whole file."""
    try:
        os.link(tmp, path)
        return
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # FileExistsError if taken
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _special(path: str) -> bool:
    """A FIFO, socket or device: reading one can block for ever, and it holds no image. (A
    broken link is not special: it stays listed, to be reported as unreadable.)"""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def walk_files(folder: Path) -> list[Path]:
    """Every non-hidden file under `folder` (FIFOs, sockets and devices left out), recursively
    (hidden folders skipped), sorted by the parts of its path relative to `folder`. Linked
    folders are followed, as torchvision's ImageFolder follows them (a class folder may be a
    link), each real folder once; a link to `folder` or above it is not followed (it would
    loop, and list the folders beside `folder` as if inside it). The folders are walked in
    sorted order, so which of two paths to one folder lists it is fixed."""
    found, seen = [], set()
    top = os.path.realpath(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        above = dirpath != str(folder) and (top + os.sep).startswith(real.rstrip(os.sep) + os.sep)
        if real in seen or above:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(folder).parts
        found += [rel + (f,) for f in filenames if not f.startswith(".") and not _special(os.path.join(dirpath, f))]
    found.sort()
    return [Path(folder).joinpath(*parts) for parts in found]


def _unfinished_write(path: Path) -> bool:
    """A hidden temporary file of an `atomic_write` its process was killed in (`.name.XXXXXXXX.tmp`),
    or the lock file of an --out (`claim_out`, whose lock decides): nothing of a run, so it does
    not make a folder taken."""
    return (re.fullmatch(r"\..+\.[a-z0-9_]{8}\.tmp", path.name) is not None or path.name == LOCK_NAME) \
        and path.is_file()


def check_utf8(path: str | Path, what: str) -> None:
    """Refuse an output name with bytes that are not UTF-8 (`--out $'run\\xff'`), before the
    work: TensorBoard's event files and ONNX's checker cannot take it, and crashed after a run's
    first files were written."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise MmlitError(f"{what} {readable(str(path))}: the name holds bytes that are not UTF-8 (shown as �), "
                         f"which TensorBoard and ONNX cannot take: choose another") from None


def new_run_dir(out: str | Path | None, kind: str, name: str, resumable: bool = False, claim: bool = False) -> Path:
    """The folder a command writes into: `--out DIR` (`~` expanded), which must not hold files
    already (a `resumable` command's error says how to continue the run there, when it holds
    one), or without it
    `runs/<kind>/<name>`, `<name>2`, ... (the first that does not exist; with `claim`, created
    here, atomically: two commands started at once get two folders)."""
    if out is not None:
        path = Path(out).expanduser()  # `--out=~/runs/x`: the shell leaves that ~ to us
        check_utf8(path, "--out")
        if path.is_symlink() and not path.exists():
            raise MmlitError(f"--out {path} is a link to {os.readlink(path)}, which does not exist: choose another "
                             f"--out")
        if path.exists() and not path.is_dir():
            raise MmlitError(f"--out {path} is a file: --out names a folder; choose another")
        blocking = file_in_the_way(path)
        if blocking is not None:  # it was "[Errno 20] Not a directory" once the work was done
            raise MmlitError(f"--out {path} cannot be created: {blocking} is a file, not a folder")
        if path.exists() and any(not _unfinished_write(p) for p in path.iterdir()):
            has_run = resumable and (path / "last.safetensors").is_file()
            resume = f", or continue that run with --resume {path}" if has_run else ""
            raise MmlitError(f"output directory {path} already exists and is not empty: choose another --out{resume}")
        return path
    base = Path("runs") / kind
    blocking = file_in_the_way(base / name)
    if blocking is not None:
        raise MmlitError(f"cannot create {base / name}: {blocking} is a file, not a folder; pass --out")
    for i in range(1, 10_000):
        path = base / (name if i == 1 else f"{name}{i}")
        if not claim and not path.exists():
            return path
        if claim:
            try:
                base.mkdir(parents=True, exist_ok=True)
                path.mkdir()
                return path
            except FileExistsError:  # taken, maybe a moment ago by a run started beside this one
                continue
            except OSError as e:  # a read-only working folder
                raise MmlitError(f"cannot create {path}: {e.strerror}; pass --out") from None
    raise MmlitError(f"too many runs in {base}")


def check_writable(path: Path) -> None:
    """A file can be written in `path`, or in its nearest folder that exists: said before a
    command's work, not after it."""
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    probe = parent / f".mmlit-write-test-{os.getpid()}"  # one per process: torchrun's ranks probe at once
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise MmlitError(f"cannot write to {parent}: {e.strerror}") from None


# An --out being written holds this file, locked (flock) by the command writing there for as
# long as it runs: a lock the kernel ends with the process, however it ends (SIGKILL included).
LOCK_NAME = ".mmlit.lock"
_held_locks: dict[Path, int] = {}


def claim_out(path: Path, busy: str = "--out {path} is being written by another mmlit command: choose another --out"
              ) -> tuple[tuple[Path, ...], Path | None]:
    """Make the `--out` folder `path` that `new_run_dir` found free (when it is not there) and
    lock it for this command: two commands given one --out both found it free (or empty, the
    first still reading its data) and wrote into it, one's best.safetensors beside the other's
    last. Returns (the folders made here, deepest first, for `removed_if_left_empty`; the lock,
    which it releases). Where there is no flock (Windows) the folder is made, not locked. `busy`:
    the refusal when another command holds the lock."""
    made = tuple(p for p in (path, *path.parents) if not p.exists())
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MmlitError(f"cannot create --out {path}: {e.strerror}") from None
    try:
        import fcntl
    except ImportError:
        return made, None
    lock = path / LOCK_NAME
    for _ in range(5):  # (a lock file that keeps changing: refused, below)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666 & ~_umask())
        except OSError as e:
            raise MmlitError(f"cannot write to {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            break
        if _still_named(fd, lock):
            _held_locks[lock] = fd
            return made, lock
        os.close(fd)  # opened just before its holder let go of it and removed it (`_release`): once more
    raise MmlitError(busy.format(path=path))


def _still_named(fd: int, lock: Path) -> bool:
    """Whether the locked file `fd` is still the one named `lock`: a command opening it just before
    its holder removed it locks a file no other command will open."""
    try:
        named, held = os.stat(lock), os.fstat(fd)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _let_go_in_child() -> None:
    """A forked child (a decoding pool's worker, a loader's) inherits the held locks, which
    would then outlive a parent killed before it: the child closes its copies (the parent's
    hold stands: flock holds while any copy is open)."""
    for fd in _held_locks.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_let_go_in_child)


def _release(lock: Path | None) -> None:
    fd = _held_locks.pop(lock, None) if lock is not None else None
    if fd is not None:
        Path(lock).unlink(missing_ok=True)  # while still held: no other command has taken it
        os.close(fd)


def claim_run_dir(out: str | Path | None, kind: str, name: str,
                  resumable: bool = False) -> tuple[Path, tuple[Path, ...], Path | None]:
    """`new_run_dir(out, kind, name)`, made now (an --out made and locked, `claim_out`) and
    checked writable, before the command's work (two `eval`s started at once get two folders,
    and an `--out` that cannot be made is said before an evaluation, not after it): (the folder,
    the folders made here, deepest first, and the lock, for `removed_if_left_empty`)."""
    lock = None
    if out is None:
        parents = [p for p in (Path("runs") / kind, Path("runs")) if not p.exists()]
        path = new_run_dir(out, kind, name, resumable, claim=True)
        made: tuple[Path, ...] = (path, *parents)
    else:
        path = new_run_dir(out, kind, name, resumable)
        made, lock = claim_out(path)
    try:
        check_writable(path)
    except BaseException:  # (SIGTERM's too)
        with removed_if_left_empty(made, lock):  # made and locked for nothing: undone
            raise
    return path, made, lock


@contextlib.contextmanager
def removed_if_left_empty(folders: tuple[Path, ...], lock: Path | None = None):
    """The folders a command made for its output (a training run's `RunPlan.created`, an eval's
    `claim_run_dir`), deepest first, are removed when the command fails before writing anything
    into them: a bad dataset leaves no empty runs/<kind>/<name> behind. `lock` (`claim_out`'s)
    is released when the block ends, however it ends."""
    try:
        yield
    except BaseException:
        _release(lock)
        for folder in folders:
            with contextlib.suppress(OSError):  # not empty (the command wrote there), or gone
                folder.rmdir()
        raise
    _release(lock)
