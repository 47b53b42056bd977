"""`files`: the lock an --out is held by, and writes that survive a power cut."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mmlit_cli import files
from mmlit_cli.errors import MmlitError
from mmlit_cli.files import LOCK_NAME, atomic_write_text, claim_out, claim_run_dir, removed_if_left_empty

flock_only = pytest.mark.skipif(sys.platform == "win32", reason="the --out lock is flock's")

HOLDER = """
import os, sys, time
from pathlib import Path
from mmlit_cli.files import claim_out

claim_out(Path(sys.argv[1]))
child = os.fork()  # a decoding pool's worker, still busy when its parent is killed
if child == 0:
    os.write(1, b"worker\\n")  # a line in one write: the parent's may come at any time (PYTHONUNBUFFERED)
    time.sleep(120)
    os._exit(0)
os.write(1, f"{child}\\n".encode())
time.sleep(120)
"""


@flock_only
def test_a_killed_commands_lock_does_not_live_on_in_its_forked_workers(tmp_path):
    """A forked child holds a copy of its parent's locked file: SIGKILLed while decoding with a
    pool, a command left workers that kept its --out refused until they ended."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    lines = {holder.stdout.readline().strip() for _ in range(2)}  # the worker has started; its pid
    assert "worker" in lines, (lines, holder.stderr.read() if holder.poll() is not None else "")
    child = int((lines - {"worker"}).pop())
    try:
        with pytest.raises(MmlitError, match="is being written by another mmlit command"):
            claim_out(out)  # while the command runs, its --out is held
        holder.kill()
        holder.wait(timeout=30)
        os.kill(child, 0)  # the worker lives on
        made, lock = claim_out(out)
        with removed_if_left_empty(made, lock):
            pass
    finally:
        holder.kill()
        holder.stdout.close()
        holder.stderr.close()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


@flock_only
def test_a_lock_opened_as_its_holder_let_go_is_taken_again_by_name(tmp_path, monkeypatch):
    """A command that opened .mmlit.lock just before its holder removed it locked a file nobody
    else would open: a third command then locked a new .mmlit.lock, and two wrote one --out."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    flock, calls = fcntl.flock, []

    def holder_lets_go_first(fd, how):
        if not calls:  # this command has opened the file; its holder now removes it
            lock.unlink()
        calls.append(fd)
        return flock(fd, how)

    monkeypatch.setattr(fcntl, "flock", holder_lets_go_first)
    made, held = claim_out(out)
    fd = files._held_locks[held]
    assert len(calls) == 2 and os.fstat(fd).st_ino == os.stat(lock).st_ino
    with removed_if_left_empty(made, held):
        pass
    assert not lock.exists()


def test_a_renamed_file_is_made_durable_in_its_folder(tmp_path, monkeypatch):
    """The file is synced before it is renamed, and its folder after: a power cut after the
    "saved" line could otherwise bring back the file before."""
    synced, fsync = [], os.fsync

    def recorded(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    atomic_write_text(tmp_path / "a" / "config.yaml", "x: 1\n")
    assert (tmp_path / "a" / "config.yaml").read_text() == "x: 1\n"
    assert synced == [False, True]  # the file, then its folder


@flock_only
def test_a_signal_while_an_out_is_checked_leaves_nothing(tmp_path, monkeypatch):
    """SIGTERM (or Ctrl-C) just after an --out was made and locked, while it is probed for
    writing: the folders made and the lock are undone, as after an error."""
    def interrupted(path: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "check_writable", interrupted)
    with pytest.raises(KeyboardInterrupt):
        claim_run_dir(tmp_path / "a" / "b", "eval", "clf")
    assert list(tmp_path.iterdir()) == [] and not [lock for lock in files._held_locks if tmp_path in lock.parents]
