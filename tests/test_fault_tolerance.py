"""Fault-tolerant training under torchrun (2 CPU processes, gloo), with the README's own
command lines ("Long and multi-machine runs"): a worker killed with SIGKILL under
`--max-restarts 1`, SIGTERM to the whole group then the same command again, SIGTERM to one
worker only, and two agents on one rendezvous with one worker killed. Every run must end
(each test is bounded), log each epoch once, and end with the weights of an uninterrupted
run: the continued run restores every rank's generators from the checkpoint, so with the same
number of processes it is the same run.

The tests wait on events (a checkpoint file appears, a process exits), never on fixed sleeps.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY, write_folder

from mmlit_cli.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent

DDP = ("torchrun --standalone --nproc-per-node 2 --max-restarts 1 -m mmlit_cli finetune --preset xxs --dataset "
       "./my-images --epochs 30 --out runs/ddp --save-every 20")
TWO_NODES = ("torchrun --nnodes 2 --nproc-per-node 1 --max-restarts 1 --rdzv-backend c10d --rdzv-endpoint "
             "127.0.0.1:29533 --rdzv-id two-nodes -m mmlit_cli finetune --preset xxs --dataset ./my-images --epochs 30 "
             "--out runs/two-nodes --save-every 20")
README_TORCHRUN = [DDP, TWO_NODES]  # tests/test_journeys.py checks that the README has exactly these
SMALL = [x for o in TINY for x in ("--set", o)]
EPOCHS = 30
BOUND_S = 300  # no scenario may take longer


def argv(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "torchrun"
    return [sys.executable, "-m", "torch.distributed.run", *words[1:], *SMALL]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MMLIT_", "PET_"))}
    e.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p), OMP_NUM_THREADS="1",
             CUDA_VISIBLE_DEVICES="", COLUMNS="200")
    return e


class Job:
    """One torchrun command in `home`, its output in a file (no pipe to fill)."""

    def __init__(self, home: Path, command: str, name: str):
        self.log = home / f"{name}.log"
        self.proc = subprocess.Popen(argv(command), cwd=home, env=env(), stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()

    def wait_for(self, path: Path) -> None:
        """Until `path` exists (the job must still be running)."""
        while not path.exists():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() - self.started < BOUND_S, f"{path} never appeared\n{self.output()}"
            time.sleep(0.01)

    def workers(self) -> list[int]:
        """The agent's child processes: the training workers."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                children.append(int(stat.parent.name))
        return sorted(children)

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=max(BOUND_S - (time.monotonic() - self.started), 1))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"the job did not end within {BOUND_S} s\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def new_home(tmp_path_factory, name: str) -> Path:
    home = tmp_path_factory.mktemp(name)
    write_folder(home / "my-images", size=12)
    return home


def epochs_logged(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(run: Path, reference: Path) -> None:
    a, b = load_checkpoint(run / "last.safetensors").tensors, load_checkpoint(reference / "last.safetensors").tensors
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def assert_continued_to_the_end(job: Job, run: Path, reference: Path) -> None:
    assert job.finish() == 0, job.output()
    said = job.output()
    assert f"{run.relative_to(job.log.parent)} holds this run's last.safetensors; the same command again: continuing" \
        in said, said
    assert epochs_logged(run) == list(range(1, EPOCHS + 1))  # each epoch once
    assert load_checkpoint(run / "last.safetensors", with_train_state=True).train_info["epoch"] == EPOCHS
    assert_same_weights(run, reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run of the single-machine command."""
    home = new_home(tmp_path_factory, "reference")
    job = Job(home, DDP, "reference")
    assert job.finish() == 0, job.output()
    assert epochs_logged(home / "runs" / "ddp") == list(range(1, EPOCHS + 1))
    return home / "runs" / "ddp"


def test_a_worker_killed_with_sigkill_is_restarted_and_the_run_continues(tmp_path_factory, reference):
    home = new_home(tmp_path_factory, "sigkill")
    run = home / "runs" / "ddp"
    job = Job(home, DDP, "sigkill")
    job.wait_for(run / "metrics.jsonl")  # an epoch done (last.safetensors exists from step 0)
    workers = job.workers()
    assert len(workers) == 2, job.output()
    os.kill(workers[-1], signal.SIGKILL)
    assert_continued_to_the_end(job, run, reference)


def test_sigterm_to_the_group_saves_and_the_same_command_finishes_the_run(tmp_path_factory, reference):
    home = new_home(tmp_path_factory, "sigterm")
    run = home / "runs" / "ddp"
    job = Job(home, DDP, "sigterm")
    job.wait_for(run / "metrics.jsonl")
    os.killpg(job.proc.pid, signal.SIGTERM)  # the agent and both workers, as a scheduler does
    assert job.finish() != 0  # torchrun reports a stopped job as failed: a scheduler requeues it
    assert "interrupted (SIGTERM): saved a resumable checkpoint" in job.output()
    stopped = load_checkpoint(run / "last.safetensors", with_train_state=True).train_info
    assert stopped["epoch"] < EPOCHS, "the run ended before the signal: nothing was tested"
    assert_continued_to_the_end(Job(home, DDP, "again"), run, reference)


def test_sigterm_to_one_worker_stops_both_and_the_restart_continues(tmp_path_factory, reference):
    """Only one rank is signalled: the ranks agree to stop at the same step and save together
    (a save that only the signalled rank entered would hang); torchrun then restarts both."""
    home = new_home(tmp_path_factory, "one-rank")
    run = home / "runs" / "ddp"
    job = Job(home, DDP, "one-rank")
    job.wait_for(run / "metrics.jsonl")
    workers = job.workers()
    assert len(workers) == 2, job.output()
    os.kill(workers[-1], signal.SIGTERM)
    assert_continued_to_the_end(job, run, reference)
    assert job.output().count("interrupted (SIGTERM)") == 1  # rank 0 said it, for both


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_two_agents_on_one_rendezvous_survive_a_killed_worker(tmp_path_factory, reference):
    assert _port_free(29533), "port 29533 (the README's --rdzv-endpoint) is taken on this machine"
    home = new_home(tmp_path_factory, "two-nodes")
    run = home / "runs" / "two-nodes"
    first, second = Job(home, TWO_NODES, "node-a"), Job(home, TWO_NODES, "node-b")
    first.wait_for(run / "metrics.jsonl")
    workers = second.workers()
    assert len(workers) == 1, second.output()
    os.kill(workers[0], signal.SIGKILL)
    assert first.finish() == 0 and second.finish() == 0, first.output() + second.output()
    said = first.output() + second.output()  # whichever agent's worker is rank 0 prints
    assert "holds this run's last.safetensors; the same command again: continuing" in said, said
    assert epochs_logged(run) == list(range(1, EPOCHS + 1))
    assert_same_weights(run, reference)  # two machines of one process each are two processes
