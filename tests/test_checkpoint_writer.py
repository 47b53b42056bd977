"""Checkpoints are written off the training's path (`checkpoint.CheckpointWriter`): the file
holds the state of the moment it was saved, writes land in order, a failed write is raised in
the training thread, and the loop trains on while a write is still under way."""

from __future__ import annotations

import io
import os
import signal
import threading

import pytest
import torch
from rich.console import Console

from helpers import TINY, write_folder

import mmlit_cli.checkpoint as checkpoint
from mmlit_cli.checkpoint import Checkpoint, CheckpointWriter, load_checkpoint
from mmlit_cli.config import load_config
from mmlit_cli.engine import Trainer
from mmlit_cli.report import RunInterrupted
from mmlit_cli.train import run_training
from mmlit_cli.train_state import optimizer_to_tensors


def tiny_checkpoint(value: float) -> Checkpoint:
    cfg = load_config("xxs")
    return Checkpoint({"w": torch.full((4, 4), value)}, cfg, "classify", ["a", "b"], {"epoch": int(value)})


def held_writes(monkeypatch) -> threading.Event:
    """Writes wait until the returned event is set."""
    release, write = threading.Event(), checkpoint._write

    def held(*args):
        assert release.wait(30), "the write was never released"
        write(*args)

    monkeypatch.setattr(checkpoint, "_write", held)
    return release


def test_the_file_holds_the_state_when_saved_not_when_written(tmp_path, monkeypatch):
    """Weights, optimizer moments and their step counts, as the run saves them: the steps
    taken while the file is being written (in place, on the same tensors) are not in it."""
    release = held_writes(monkeypatch)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step():
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()

    step()
    ckpt = Checkpoint(model.state_dict(), load_config("xxs"), "classify", ["a", "b"], {"epoch": 1})
    ckpt.train_tensors, ckpt.train_info = optimizer_to_tensors(optimizer)
    at_save = {k: v.clone() for k, v in {**ckpt.tensors, **ckpt.train_tensors}.items()}
    with CheckpointWriter() as writer:
        writer.save(tmp_path / "last.safetensors", ckpt)
        for _ in range(3):  # the next steps, while the file is being written
            step()
        ckpt.info["epoch"] = 2
        assert not torch.equal(model.weight, at_save["weight"])
        release.set()
        writer.wait()
    saved = load_checkpoint(tmp_path / "last.safetensors", with_train_state=True)
    assert saved.info["epoch"] == 1
    in_file = {**saved.tensors, **saved.train_tensors}
    assert set(at_save) <= set(in_file)
    for key, value in at_save.items():
        assert torch.equal(in_file[key], value), key


def test_writes_land_in_the_order_saved(tmp_path):
    with CheckpointWriter(pending=1) as writer:
        for value in range(5):
            writer.save(tmp_path / "last.safetensors", tiny_checkpoint(float(value)))
    assert load_checkpoint(tmp_path / "last.safetensors").info["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]  # no temporary file left


def test_a_failed_write_is_raised_in_the_training_thread_and_drops_the_writes_behind_it(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    release = held_writes(monkeypatch)
    writer = CheckpointWriter()
    writer.save(tmp_path / "file" / "last.safetensors", tiny_checkpoint(1.0))
    writer.save(tmp_path / "best.safetensors", tiny_checkpoint(2.0))  # queued behind the failing one
    release.set()
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        writer.wait()
    assert not (tmp_path / "best.safetensors").exists()
    writer.wait()  # raised once
    writer.save(tmp_path / "best.safetensors", tiny_checkpoint(3.0))  # and the writer goes on
    writer.close()
    assert load_checkpoint(tmp_path / "best.safetensors").info["epoch"] == 3
    with pytest.raises(NotADirectoryError):  # leaving a block that raised nothing raises the write's error
        with CheckpointWriter() as writer:
            writer.save(tmp_path / "file" / "x.safetensors", tiny_checkpoint(1.0))
    with pytest.raises(KeyError):  # ... but never hides the block's own error
        with CheckpointWriter() as writer:
            writer.save(tmp_path / "file" / "x.safetensors", tiny_checkpoint(1.0))
            raise KeyError("the block's")


def test_a_full_disk_is_an_os_error_naming_the_checkpoint_and_a_one_line_error(tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as its own SafetensorError ("I/O error: No space left on
    device (os error 28)"), which the command line took for a bug: "internal error", exit 1."""
    import sys

    from safetensors import SafetensorError

    from mmlit_cli import cli

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError) as e:
        checkpoint.save_checkpoint(tmp_path / "last.safetensors", tiny_checkpoint(1.0))
    assert e.value.errno == 28 and e.value.filename == str(tmp_path / "last.safetensors")
    assert list(tmp_path.iterdir()) == []  # no temporary file left
    data = write_folder(tmp_path / "data")
    monkeypatch.setattr(sys, "argv", ["mmlit", "finetune", "--preset", "xxs", "--dataset", str(data), "--epochs", "1",
                                      "--out", str(tmp_path / "run"), *[a for o in TINY for a in ("--set", o)]])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: [Errno 28] No space left on device: ") and \
        "last.safetensors" in err and err.count("\n") == 1, err


def test_training_goes_on_while_a_checkpoint_is_written(tmp_path, monkeypatch):
    """The first epoch's checkpoints are held until the loop has made two steps of the second:
    a loop that waited for its checkpoints would never get there. (The step-0 checkpoint is
    waited for: a run's start writes it before config.yaml.)"""
    release, write, written, steps = threading.Event(), checkpoint._write, [], []

    def held_after_step_0(*args):
        if written:
            assert release.wait(30), "the write was never released"
        write(*args)
        written.append(args[0])

    monkeypatch.setattr(checkpoint, "_write", held_after_step_0)
    step = Trainer._train_step

    def counted(self, images, labels):
        loss = step(self, images, labels)
        steps.append((self.epoch, self.global_step))
        if len([s for e, s in steps if e == 1]) == 2:
            release.set()
        return loss

    monkeypatch.setattr(Trainer, "_train_step", counted)
    data = write_folder(tmp_path / "data", per_class=8)
    result = run_training("finetune", "xxs", str(data), out=tmp_path / "run", overrides=TINY, epochs=2,
                          batch_size=4, console=Console(quiet=True))
    assert release.is_set() and steps[-1][1] == result["global_step"]
    state = load_checkpoint(tmp_path / "run" / "last.safetensors", with_train_state=True).train_info
    assert state["epoch"] == 2 and state["global_step"] == result["global_step"]  # fit waited for the last one


def test_the_stop_message_is_printed_once_its_checkpoint_is_on_disk(tmp_path, monkeypatch):
    """Ctrl-C at step 2, every write held until the run waits for its checkpoints: when "saved
    a resumable checkpoint" is printed, the file holds step 2 (a user may kill the process as
    soon as they read it)."""
    release, wait = held_writes(monkeypatch), CheckpointWriter.wait

    def waited(self):
        release.set()
        wait(self)

    monkeypatch.setattr(CheckpointWriter, "wait", waited)
    step = Trainer._train_step

    def interrupted(self, images, labels):
        loss = step(self, images, labels)
        if self.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    last, on_disk = tmp_path / "run" / "last.safetensors", []

    class Screen(io.StringIO):
        def write(self, text):
            if "saved a resumable checkpoint" in text:
                on_disk.append(load_checkpoint(last, with_train_state=True).train_info["global_step"])
            return super().write(text)

    data = write_folder(tmp_path / "data", per_class=8)
    with pytest.raises(RunInterrupted) as stop:
        run_training("finetune", "xxs", str(data), out=tmp_path / "run", overrides=TINY, epochs=2,
                     batch_size=4, console=Console(file=Screen(), width=200))
    assert stop.value.result["stopped"] == "interrupt" and stop.value.result["global_step"] == 2
    assert on_disk == [2]
