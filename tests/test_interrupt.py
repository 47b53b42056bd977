"""Interruptions lose nothing: SIGKILL mid-epoch leaves a loadable checkpoint that --resume
finishes from; Ctrl-C (SIGINT) or SIGTERM saves a resumable checkpoint and exits cleanly.

Signals are sent when the run has reached a point the test can see (a checkpoint or a
finished epoch on disk), never after a fixed sleep, and the runs are far longer than the
test lets them go, so the signal always lands while they train."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from mmlit_cli.checkpoint import load_checkpoint
from helpers import TINY, write_folder

SLOWER = [o for o in TINY if not o.startswith("model.image_size")] + ["model.image_size=36"]
LONG = 200  # epochs: the run cannot finish before the signal arrives


def start(folder, out, *extra, group=False, env=None):
    cmd = [sys.executable, "-m", "mmlit_cli", "finetune", "--preset", "xxs", "--dataset", str(folder),
           "--out", str(out), "--epochs", str(LONG), "--batch-size", "4", "--save-every", "1", "--device", "cpu",
           *extra]
    for o in SLOWER:
        cmd += ["--set", o]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=group,
                            env=env)


def wait_for(proc, path, timeout=300):
    """Poll until `path` exists while the run is still going."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def assert_run_dir_loads(out):
    for name in ("last.safetensors", "best.safetensors"):
        load_file(str(out / name))
        load_checkpoint(out / name)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    yaml.safe_load((out / "config.yaml").read_text())
    (out / "metrics.csv").read_text().splitlines()
    return rows


def resume(out, epochs):
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "finetune", "--resume", str(out), "--device", "cpu",
                        "--epochs", str(epochs)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_sigkill_mid_epoch_then_resume_finishes(tmp_path):
    folder = write_folder(tmp_path / "data", per_class=40)
    out = tmp_path / "run"
    proc = start(folder, out)
    wait_for(proc, out / "last.safetensors")  # written every step from now on: the kill lands amid writes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(out / "last.safetensors", with_train_state=True).train_info  # intact after the kill
    assert state["epoch"] < LONG
    target = state["epoch"] + 2
    resume(out, target)
    rows = assert_run_dir_loads(out)
    assert [r["epoch"] for r in rows] == list(range(1, target + 1))
    assert load_checkpoint(out / "last.safetensors", with_train_state=True).train_info["epoch"] == target


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_or_sigterm_saves_a_resumable_checkpoint_and_exits_cleanly(tmp_path, signum, code):
    """Ctrl-C, or SIGTERM (what schedulers and preemption send): exit 128 + the signal."""
    folder = write_folder(tmp_path / "data", per_class=40)
    out = tmp_path / "run"
    proc = start(folder, out, "--save-every", "0")
    wait_for(proc, out / "metrics.jsonl")  # one epoch done: the handler is installed
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and f"interrupted ({signal.Signals(signum).name})" in stdout
    assert "--resume" in stdout
    state = load_checkpoint(out / "last.safetensors", with_train_state=True).train_info
    assert 1 <= state["epoch"] < LONG
    target = state["epoch"] + 1
    resume(out, target)
    rows = assert_run_dir_loads(out)
    assert [r["epoch"] for r in rows] == list(range(1, target + 1))


def test_a_second_ctrl_c_stops_at_once_and_says_what_is_left(monkeypatch, capsys):
    """Ctrl-C twice, the second before the first one's save is done: the run gives up at once
    (`StopRequest` raises KeyboardInterrupt) and says so, with what is left, exit 130; it was
    exit 130 with nothing said. (Two signals sent back to back reach Python as one, so the
    command is driven here; the subprocess test below sends them apart.)"""
    from mmlit_cli import cli, train
    from mmlit_cli.report import SecondInterrupt

    def interrupted(exception):
        def run_training(*args, **kwargs):
            raise exception
        return run_training

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # leave pytest's own handler in place
    monkeypatch.setattr(sys, "argv", ["mmlit", "finetune", "--preset", "xxs"])
    said = {}
    for exception in (SecondInterrupt, KeyboardInterrupt):
        monkeypatch.setattr(train, "run_training", interrupted(exception))
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        said[exception] = err = capsys.readouterr().err
        assert exit_info.value.code == 130 and err.count("\n") == 1, err
    assert said[SecondInterrupt].startswith("interrupted again: stopped at once, without saving")
    assert "--resume" in said[SecondInterrupt]
    # the first Ctrl-C while the data is read (before the loop takes Ctrl-C over): nothing saved, not "again"
    assert said[KeyboardInterrupt].startswith("interrupted before training started: nothing was saved")


def test_ctrl_c_in_any_other_command_says_interrupted(monkeypatch, capsys):
    """Ctrl-C in eval, predict, plot or count-params: Typer turns it into exit 130 before it
    reaches mmlit's handler, which printed nothing; a training run's own lines are not doubled."""
    from mmlit_cli import cli, summary, train

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(summary, "count_macs", ctrl_c)
    monkeypatch.setattr(sys, "argv", ["mmlit", "count-params", "--preset", "xxs"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setattr(train, "run_training", ctrl_c)
    monkeypatch.setattr(sys, "argv", ["mmlit", "finetune", "--preset", "xxs"])
    with pytest.raises(SystemExit):
        cli.main()
    err = capsys.readouterr().err
    assert err.startswith("interrupted before training started") and err.count("\n") == 1, err


def test_sigterm_outside_training_cleans_up_what_the_command_was_writing(tmp_path):
    """SIGTERM during `export`, `eval`, `plot`...: Python's default ended the process at once,
    leaving the hidden temporary file (`.t.onnx.3yj9ujpq.tmp`, 943 KB) and temporary folders.
    Here `plot` is sent SIGTERM while its PNG is being written (in a subprocess: the signal
    ends the process if the handling is gone)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0, "val_loss": 1.1}) + "\n")
    script = f"""
import os, signal, sys
from mmlit_cli import cli, plots
write = plots.atomic_write
def terminated_while_writing(path, fill, **kw):
    def fill_then_sigterm(tmp):
        fill(tmp)
        os.kill(os.getpid(), signal.SIGTERM)
    return write(path, fill_then_sigterm, **kw)
plots.atomic_write = terminated_while_writing
sys.argv = ["mmlit", "plot", {str(run)!r}]
cli.main()
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (143, "terminated\n")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_the_second_ctrl_c_is_told_from_the_first(monkeypatch):
    """`StopRequest`: the first Ctrl-C asks for a stop; the second raises `SecondInterrupt`."""
    from mmlit_cli.report import SecondInterrupt, StopRequest

    stop = StopRequest()
    stop._handler(signal.SIGINT, None)
    assert stop.signal == signal.SIGINT
    with pytest.raises(SecondInterrupt):
        stop._handler(signal.SIGINT, None)


def test_an_interrupted_fit_closes_its_event_log(tmp_path, monkeypatch):
    """A second Ctrl-C (KeyboardInterrupt out of `fit`) still ends TensorBoard's writer before the
    process ends: left running, its thread can be inside protobuf's C code at exit, which
    aborts the process ("terminate called without an active exception", SIGABRT)."""
    pytest.importorskip("torch.utils.tensorboard")
    from mmlit_cli import engine
    from mmlit_cli.train import run_training

    seen = {}

    def interrupted_fit(self):
        self.record.start()
        seen["events"] = self.record.events
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.Trainer, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        run_training("finetune", "xxs", str(write_folder(tmp_path / "data", per_class=4)), out=tmp_path / "run",
                     overrides=TINY, epochs=2, batch_size=4, quiet=True)
    events = seen["events"]
    assert events is not None and events.writer.all_writers is None  # SummaryWriter.close() ran


def test_ctrl_c_twice_never_ends_in_a_traceback(tmp_path):
    """A second Ctrl-C as the run says its first one's save, while it waits for its checkpoint
    writes and winds down: a line (exit 130) or the process ended at once (killed by SIGINT, as
    the shell reports 130), never a traceback or an abort. Sent when the "interrupted" line is
    read, not after a sleep."""
    folder = write_folder(tmp_path / "data", per_class=40)
    out = tmp_path / "run"
    proc = start(folder, out, "--save-every", "0", env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for(proc, out / "metrics.jsonl")
    proc.send_signal(signal.SIGINT)
    said = []
    for line in proc.stdout:  # unbuffered: each line as the run prints it
        said.append(line)
        if "interrupted (SIGINT)" in line:
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    stdout = "".join(said) + stdout
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in stderr, stderr
    assert "interrupted again" in stderr or "interrupted (SIGINT): saved" in stdout, (stdout[-300:], stderr)
    load_checkpoint(out / "last.safetensors", with_train_state=True)


def test_sigterm_to_the_process_group_with_loader_workers_still_saves(tmp_path):
    """Schedulers and torchrun signal the whole group: the DataLoader's worker processes get
    SIGTERM too, and must leave the stop to the training process."""
    folder = write_folder(tmp_path / "data", per_class=40)
    out = tmp_path / "run"
    proc = start(folder, out, "--save-every", "0", "--loader", "workers", "--set", "finetune.workers=2", group=True)
    wait_for(proc, out / "metrics.jsonl")
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "interrupted (SIGTERM)" in stdout and "Traceback" not in stderr
    state = load_checkpoint(out / "last.safetensors", with_train_state=True).train_info
    assert 1 <= state["epoch"] < LONG


GC_OFF = "import gc, runpy, sys; gc.disable(); sys.argv[0] = 'mmlit'; runpy.run_module('mmlit_cli', run_name='__main__')"


@pytest.mark.parametrize("epochs", [1, LONG])
def test_a_run_with_loader_workers_exits_when_it_ends_whenever_the_collector_runs(tmp_path, epochs):
    """The loader's workers ignore SIGTERM (the test above), which multiprocessing's exit handler
    sends them before it joins them: a worker loader not yet freed by the garbage collector when
    the process ended held it forever after "done:". The collector off makes that every time;
    a run that ends by SIGTERM ends too."""
    folder = write_folder(tmp_path / "data", per_class=4 if epochs == 1 else 40)
    cmd = [sys.executable, "-c", GC_OFF, "finetune", "--preset", "xxs", "--dataset", str(folder), "--out",
           str(tmp_path / "run"), "--epochs", str(epochs), "--batch-size", "4", "--device", "cpu", "--loader",
           "workers", *(f"--set={o}" for o in TINY if "workers=" not in o), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if epochs == LONG:
        wait_for(proc, tmp_path / "run" / "metrics.jsonl")
        proc.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"still running 120 s after it was started or stopped:\n{stdout[-2000:]}")
    assert proc.returncode == (0 if epochs == 1 else 143), stderr
    assert ("done: " if epochs == 1 else "interrupted (SIGTERM)") in stdout and "Traceback" not in stderr


SWEEP = """
import sys
from mmlit_cli.report import RunInterrupted
from mmlit_cli.train import run_training

data, overrides = sys.argv[1], sys.argv[2].split()
try:
    for out in sys.argv[3:]:  # a sweep, as a user's script runs one
        run_training("finetune", "xxs", data, out=out, overrides=overrides, epochs={long}, batch_size=4,
                     save_every=0, device="cpu", quiet=True)
except RunInterrupted as stop:
    print("stopped", stop.signal, stop.result["out_dir"], stop.result["stopped"], flush=True)
    raise
"""


def test_a_signal_stops_a_script_that_trains_not_only_its_run(tmp_path):
    """From Python, SIGTERM (or Ctrl-C) saves the run, then `run_training` raises `RunInterrupted`
    (a KeyboardInterrupt): a script's sweep stops there. It returned, and the sweep's next run
    started, so a scheduler's SIGTERM before it kills did not stop the script."""
    folder = write_folder(tmp_path / "data", per_class=40)
    first, second = tmp_path / "first", tmp_path / "second"
    proc = subprocess.Popen([sys.executable, "-c", SWEEP.format(long=LONG), str(folder), " ".join(SLOWER),
                             str(first), str(second)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(proc, first / "metrics.jsonl")
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 120
    while proc.poll() is None and not second.exists() and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    stdout, stderr = proc.communicate()
    assert not second.exists(), "the sweep went on to its next run"
    assert proc.returncode != 0 and f"stopped {int(signal.SIGTERM)} {first} interrupt" in stdout, stderr
    assert "RunInterrupted: SIGTERM: the run stopped after saving a resumable checkpoint" in stderr
    state = load_checkpoint(first / "last.safetensors", with_train_state=True).train_info
    assert 1 <= state["epoch"] < LONG


LAST_SAVE_SIGNALLED = """
import os, signal, sys
from mmlit_cli import cli
from mmlit_cli.run_record import RunRecord

close_epoch = RunRecord.close_epoch

def signalled(self, row, train_loss, patience, last):
    if last:  # a scheduler's SIGTERM as the last epoch is saved
        os.kill(os.getpid(), signal.SIGTERM)
    return close_epoch(self, row, train_loss, patience, last)

RunRecord.close_epoch = signalled
sys.argv = ["mmlit", *sys.argv[1:]]
cli.main()
"""


def test_sigterm_as_the_run_ends_says_done_skips_the_curves_and_exits_143(tmp_path):
    """SIGTERM during the last epoch's save: the run is whole, so it says done, but the process
    ends now (no curves drawn) with 143, as the scheduler that sent it expects; it drew the curves
    and exited 0, and from Python the next run of a sweep started."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", LAST_SAVE_SIGNALLED, "finetune", "--preset", "xxs", "--dataset",
           str(write_folder(tmp_path / "data", per_class=4)), "--out", str(out), "--epochs", "2", "--batch-size", "4"]
    r = subprocess.run(cmd + [a for o in TINY for a in ("--set", o)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 143 and "Traceback" not in r.stderr, r.stderr
    assert f"done: {out}/last.safetensors" in r.stdout
    assert f"note: no curves.png (SIGTERM as the run ended; mmlit plot {out} draws it)" in r.stdout, r.stdout
    assert not (out / "curves.png").exists()
    assert load_checkpoint(out / "last.safetensors", with_train_state=True).train_info["epoch"] == 2


def test_once_the_run_is_saved_a_full_disk_or_ctrl_c_costs_only_its_curves(tmp_path, monkeypatch):
    """curves.png that cannot be written (a full disk) is a note, not an error: the run was
    whole and said "error", exit 2. Ctrl-C while it is drawn stops the caller (`RunInterrupted`)
    with the same note, and the event log is closed either way."""
    from mmlit_cli import plots
    from mmlit_cli.errors import MmlitError
    from mmlit_cli.report import RunInterrupted
    from mmlit_cli.run_record import RunRecord
    from mmlit_cli.train import run_training

    closed = []
    close_events = RunRecord.close_events
    monkeypatch.setattr(RunRecord, "close_events", lambda self, curves=None: closed.append(close_events(self, curves)))
    folder = write_folder(tmp_path / "data", per_class=4)
    full = MmlitError(f"cannot write {tmp_path}/full/curves.png (No space left on device)")
    for stop in (full, KeyboardInterrupt()):
        def fails(run_dir, stop=stop):
            raise stop
        monkeypatch.setattr(plots, "plot_curves", fails)
        out = tmp_path / type(stop).__name__
        if isinstance(stop, MmlitError):
            result = run_training("finetune", "xxs", str(folder), out=out, overrides=TINY, epochs=1, batch_size=4,
                                  quiet=True)
            assert result["curves_note"] == f"{full}; mmlit plot {out} draws it"
        else:
            with pytest.raises(RunInterrupted) as interrupted:
                run_training("finetune", "xxs", str(folder), out=out, overrides=TINY, epochs=1, batch_size=4,
                             quiet=True)
            assert interrupted.value.signal == signal.SIGINT and interrupted.value.result["stopped"] is None
            assert interrupted.value.result["curves_note"] == f"interrupted while drawing it; mmlit plot {out} draws it"
        assert (out / "last.safetensors").is_file() and len(closed) == 1
        closed.clear()


DECODE_INTERRUPTED = """
import multiprocessing, os, signal, sys, tempfile, threading, time
from mmlit_cli.data import decode

started = tempfile.mkdtemp()

def slow_chunk(args):  # a worker: signals are the parent's (else it would die with the group's SIGTERM)
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        os._exit(3)
    open(os.path.join(started, str(os.getpid())), "w").close()  # at work on a chunk
    time.sleep(300)

decode._decode_chunk = slow_chunk
os.environ["MMLIT_DECODE_WORKERS"] = "2"

def interrupt():
    while len(os.listdir(started)) < 2:  # both workers at work
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=interrupt, daemon=True).start()
start = time.time()
try:
    decode.decode_files(["/nonexistent.png"] * 64, 8)
except KeyboardInterrupt:
    print(f"interrupted {time.time() - start:.1f} {len(multiprocessing.active_children())}", flush=True)
"""


def test_ctrl_c_while_the_decode_pool_works_ends_its_workers_at_once():
    """The decode pool's workers leave Ctrl-C and SIGTERM to the parent (killed by the group's
    SIGTERM mid-write, one left the pool's reader waiting forever), and the parent, interrupted,
    kills them: it waited for every chunk handed out, and a worker forked as the signal came,
    given no work and no stop, held the process's exit forever."""
    r = subprocess.run([sys.executable, "-c", DECODE_INTERRUPTED], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert r.returncode == 0, r.stderr
    word, seconds, children = r.stdout.split()
    assert word == "interrupted" and float(seconds) < 30 and children == "0", r.stdout
    assert "Traceback" not in r.stderr and "Exception" not in r.stderr, r.stderr


def test_loader_workers_start_with_the_stop_signals_blocked_until_they_ignore_them(tmp_path, monkeypatch):
    """torch's worker loop sets a SIGTERM handler of its own before `worker_init_fn` runs: a
    signal to the group in that window killed a worker as the first epoch began, and the run
    ended unsaved. The workers start with SIGINT and SIGTERM blocked, `_worker_init` ignores
    then unblocks them, and the training process's mask is as it was."""
    import torch

    from mmlit_cli.data import loader as L
    from mmlit_cli.data.splits import ImageData

    seen, worker_init = tmp_path / "mask", L._worker_init

    def init(worker_id):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the mask, as the worker started
        worker_init(worker_id)
        after = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        seen.write_text(json.dumps([sorted(int(s) for s in blocked), sorted(int(s) for s in after),
                                    signal.getsignal(signal.SIGTERM) is signal.SIG_IGN]))

    monkeypatch.setattr(L, "_worker_init", init)
    data = ImageData(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), ["a"], "zeros")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    loader = L.build_loader(data, 2, shuffle=True, workers=1)
    assert len(list(loader)) == 2
    L.shut_down_workers(loader)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask  # the training process's mask, as it was
    blocked, after, ignored = json.loads(seen.read_text())
    stop = {int(signal.SIGINT), int(signal.SIGTERM)}
    assert stop <= set(blocked) and not stop & set(after) and ignored
