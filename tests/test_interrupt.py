"""Interruptions lose nothing: SIGKILL mid-epoch leaves a loadable checkpoint that --resume
finishes from; Ctrl-C (SIGINT) saves a resumable checkpoint and exits cleanly."""

import json
import signal
import subprocess
import sys
import time

import yaml
from safetensors.torch import load_file

from mmlit_cli.checkpoint import load_checkpoint
from helpers import TINY, write_folder

SLOWER = [o for o in TINY if not o.startswith("model.image_size")] + ["model.image_size=36"]


def start(folder, out, *extra):
    cmd = [sys.executable, "-m", "mmlit_cli", "finetune", "--preset", "xxs", "--dataset", str(folder),
           "--out", str(out), "--epochs", "3", "--batch-size", "4", "--save-every", "1", "--device", "cpu", *extra]
    for o in SLOWER:
        cmd += ["--set", o]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc, out, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "last.safetensors").exists() and proc.poll() is None:
            time.sleep(0.3)  # a few more steps, so the kill lands mid-write of some later checkpoint
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def assert_run_dir_loads(out):
    for name in ("last.safetensors", "best.safetensors"):
        load_file(str(out / name))
        load_checkpoint(out / name)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    yaml.safe_load((out / "config.yaml").read_text())
    (out / "metrics.csv").read_text().splitlines()
    return rows


def resume(out):
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "finetune", "--resume", str(out), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_sigkill_mid_epoch_then_resume_finishes(tmp_path):
    folder = write_folder(tmp_path / "data", per_class=40)
    out = tmp_path / "run"
    proc = start(folder, out)
    wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(out / "last.safetensors", with_train_state=True).train_info  # intact after the kill
    assert state["epoch"] < 3
    resume(out)
    rows = assert_run_dir_loads(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert load_checkpoint(out / "last.safetensors", with_train_state=True).train_info["epoch"] == 3


def test_sigint_saves_a_resumable_checkpoint_and_exits_cleanly(tmp_path):
    folder = write_folder(tmp_path / "data", per_class=40)
    out = tmp_path / "run"
    proc = start(folder, out, "--save-every", "0")
    deadline = time.time() + 120
    while "steps/epoch" not in (proc.stdout.readline() or "") and time.time() < deadline:
        pass
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stdout
    state = load_checkpoint(out / "last.safetensors", with_train_state=True).train_info
    assert state["epoch"] < 3
    resume(out)
    rows = assert_run_dir_loads(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
