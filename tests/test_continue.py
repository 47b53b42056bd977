"""The same training command, run again with the same --out, continues its run; a finished
run says so and exits 0; a folder holding a different run is refused, naming the difference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from helpers import TINY, write_folder

from mmlit_cli.checkpoint import load_checkpoint, save_checkpoint
from mmlit_cli.engine import Trainer
from mmlit_cli.errors import MmlitError
from mmlit_cli.train import _differences, run_training

ROOT = Path(__file__).resolve().parent.parent


def command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmlit_cli", "finetune", "--preset", "xxs", "--dataset", str(data), "--epochs", "3",
            "--batch-size", "8", "--out", str(out), "--device", "cpu", *[x for o in TINY for x in ("--set", o)],
            *extra]


def run(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("continue") / "data", per_class=8)


def test_the_same_call_continues_a_stopped_run_and_ends_as_the_uninterrupted_one(data, tmp_path):
    kw = dict(overrides=TINY, epochs=3, batch_size=8, device="cpu")
    run_training("finetune", "xxs", str(data), out=tmp_path / "whole", console=Console(quiet=True), **kw)
    stopped = run_training("finetune", "xxs", str(data), out=tmp_path / "run", max_steps=3,
                           console=Console(quiet=True), **kw)
    assert stopped["stopped"] == "max_steps" and stopped["epoch"] == 1
    said = Console(record=True, width=300)
    result = run_training("finetune", "xxs", str(data), out=tmp_path / "run", console=said, **kw)
    assert f"{tmp_path / 'run'} holds this run's last.safetensors; the same command again: continuing " \
           f"{tmp_path / 'run'} at epoch 2, step 3" in said.export_text()
    assert result["stopped"] is None and result["epoch"] == 3
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    a = load_checkpoint(tmp_path / "run" / "last.safetensors").tensors
    b = load_checkpoint(tmp_path / "whole" / "last.safetensors").tensors
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_run_that_died_before_its_first_step_is_continued_from_its_start(data, tmp_path, monkeypatch):
    """last.safetensors is written at step 0: a job killed in its first --save-every steps is
    continued (from the start) by the same command, not refused as a non-empty folder."""
    kw = dict(overrides=TINY, epochs=2, batch_size=8, device="cpu", console=Console(quiet=True))
    run_training("finetune", "xxs", str(data), out=tmp_path / "whole", **kw)

    def killed(self, images, labels):
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_train_step", killed)
        with pytest.raises(RuntimeError, match="killed"):
            run_training("finetune", "xxs", str(data), out=tmp_path / "run", **kw)
    assert load_checkpoint(tmp_path / "run" / "last.safetensors", with_train_state=True).train_info["global_step"] == 0
    result = run_training("finetune", "xxs", str(data), out=tmp_path / "run", **kw)
    assert result["stopped"] is None and result["epoch"] == 2
    a = load_checkpoint(tmp_path / "run" / "last.safetensors").tensors
    b = load_checkpoint(tmp_path / "whole" / "last.safetensors").tensors
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_start_killed_before_its_first_checkpoint_leaves_a_folder_the_same_command_takes(data, tmp_path,
                                                                                           monkeypatch):
    """A process killed while the run starts (under torchrun: a peer that died before the step-0
    checkpoint) left config.yaml and an event file, and no last.safetensors: every restart was
    refused ("already exists and is not empty"). The step-0 checkpoint now comes first, and a
    hidden temporary file of a write that was killed does not make a folder taken."""
    from mmlit_cli import run_record

    kw = dict(overrides=TINY, epochs=1, batch_size=8, device="cpu", console=Console(quiet=True))
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(run_record, "ranks_agree", lambda *args: (_ for _ in ()).throw(RuntimeError("peer died")))
        with pytest.raises(RuntimeError, match="peer died"):
            run_training("finetune", "xxs", str(data), out=out, **kw)
    assert not out.exists()  # the failed start wrote nothing, and removed the --out it made
    out.mkdir()  # ... which a SIGKILL leaves
    (out / ".config.yaml.k2j4x_9q.tmp").write_text("")  # with a write killed half-way
    assert run_training("finetune", "xxs", str(data), out=out, **kw)["epoch"] == 1
    assert (out / "config.yaml").is_file()


def test_best_is_written_before_last(data, tmp_path, monkeypatch):
    """An epoch that improves writes best.safetensors, then last.safetensors: a kill between the
    two leaves last at the epoch before, which a restart trains again (writing both). The other
    order left best.safetensors an epoch older than the best that last recorded, for good."""
    from mmlit_cli import checkpoint

    written, write = [], checkpoint._write

    def recording(path, *args):
        write(path, *args)
        written.append((Path(path).name, load_checkpoint(path).info["epoch"]))

    monkeypatch.setattr(checkpoint, "_write", recording)
    run_training("finetune", "xxs", str(data), out=tmp_path / "run", overrides=TINY, epochs=2, batch_size=8,
                 device="cpu", console=Console(quiet=True), save_every=0)
    assert written[0] == ("last.safetensors", 0) and ("best.safetensors", 1) in written  # step 0, then the epochs
    assert all(written[i + 1] == ("last.safetensors", epoch) for i, (name, epoch) in enumerate(written)
               if name == "best.safetensors")  # the same epoch's last follows its best


def test_a_torchrun_restart_without_out_finds_its_own_jobs_folder(data, tmp_path, monkeypatch):
    """The newest folder of the name is not always the job's: an attempt killed before its step-0
    checkpoint left none (the newest is an older job's finished run, which the restart reported
    finished, exit 0, nothing trained), and a gap in the numbers puts a new run below the newest.
    The run records its torchrun job's id (TORCHELASTIC_RUN_ID): a restart continues that one."""
    monkeypatch.chdir(tmp_path)
    kw = dict(overrides=TINY, epochs=2, batch_size=8, device="cpu", console=Console(quiet=True))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    assert run_training("finetune", "xxs", str(data), **kw)["out_dir"] == str(Path("runs/finetune/xxs"))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_train_step", lambda self, images, labels: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError, match="killed"):
            run_training("finetune", "xxs", str(data), **kw)  # runs/finetune/xxs2, at step 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-c")  # its first attempt died before it saved anything
    fresh = run_training("finetune", "xxs", str(data), **kw)
    assert fresh["out_dir"] == str(Path("runs/finetune/xxs3")) and fresh["stopped"] is None and fresh["epoch"] == 2
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")  # xxs3 is newer, but job-b's run is xxs2
    again = run_training("finetune", "xxs", str(data), **kw)
    assert again["out_dir"] == str(Path("runs/finetune/xxs2")) and again["stopped"] is None and again["epoch"] == 2


def test_without_out_a_torchrun_restart_continues_the_newest_run_of_its_name(data, tmp_path, monkeypatch):
    """torchrun restarts its workers with the same command: without --out they find the
    folder the first attempt chose (runs/finetune/xxs2 here), not a new one."""
    monkeypatch.chdir(tmp_path)
    kw = dict(overrides=TINY, epochs=2, batch_size=8, device="cpu", console=Console(quiet=True))
    run_training("finetune", "xxs", str(data), **{**kw, "overrides": TINY + ["finetune.seed=4"]})  # another run
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_train_step", lambda self, images, labels: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError, match="killed"):
            run_training("finetune", "xxs", str(data), **kw)
    assert sorted(p.name for p in (tmp_path / "runs" / "finetune").iterdir()) == ["xxs", "xxs2"]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    result = run_training("finetune", "xxs", str(data), **kw)
    assert result["out_dir"] == str(Path("runs") / "finetune" / "xxs2") and result["epoch"] == 2
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    assert run_training("finetune", "xxs", str(data), **kw)["out_dir"] == str(Path("runs") / "finetune" / "xxs3")


def test_a_finished_run_says_so_and_exits_0_and_another_run_is_refused(data, tmp_path):
    out = tmp_path / "run"
    assert run(command(data, out)).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run(command(data, out))
    assert again.returncode == 0, again.stderr
    assert f"{out}: the run is finished (3 epochs); nothing to do" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten
    (out / "curves.png").unlink()  # a run killed after its last save, before it drew them
    drawn = run(command(data, out))
    assert drawn.returncode == 0 and f"curves: {out}/curves.png" in drawn.stdout, drawn.stdout + drawn.stderr
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert after.keys() == before.keys() and after["curves.png"] > before["curves.png"]
    assert {k: v for k, v in after.items() if k != "curves.png"} == {k: v for k, v in before.items()
                                                                     if k != "curves.png"}  # nothing else
    before = after

    other = run(command(data, out, "--lr", "0.01", "--seed", "5"))
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.strip() == (f"error: {out} holds another run (finetune.lr: not set there, 0.01 here; "
                                    f"finetune.seed: 0 there, 5 here): choose another --out, or continue that run "
                                    f"with --resume {out}")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_folder_whose_checkpoint_does_not_say_how_it_was_started_is_refused(data, tmp_path):
    """A last.safetensors from before runs recorded their command (or not a run's at all):
    the folder is refused as any non-empty one, never trained over."""
    out = tmp_path / "run"
    run_training("finetune", "xxs", str(data), out=out, overrides=TINY, epochs=1, batch_size=8, device="cpu",
                 console=Console(quiet=True))
    ckpt = load_checkpoint(out / "last.safetensors", with_train_state=True)
    del ckpt.train_info["invocation"]
    save_checkpoint(out / "last.safetensors", ckpt)
    with pytest.raises(MmlitError, match="already exists and is not empty"):
        run_training("finetune", "xxs", str(data), out=out, overrides=TINY, epochs=1, batch_size=8, device="cpu",
                     console=Console(quiet=True))


def test_a_run_resumed_with_more_epochs_is_that_command_now(data, tmp_path):
    """--resume --epochs 3 of a 2-epoch run: the same command is now the one with --epochs 3."""
    kw = dict(overrides=TINY, batch_size=8, device="cpu", console=Console(quiet=True))
    out = tmp_path / "run"
    run_training("finetune", "xxs", str(data), out=out, epochs=2, **kw)
    run_training("finetune", None, None, resume=out, epochs=3, device="cpu", console=Console(quiet=True))
    config = (out / "config.yaml").read_text()  # 3 epochs, under the recipe fitted to 2 as the run started
    assert config.startswith("# as the run started: recipe auto, fitted to 2 of ")
    assert "\nfinetune:\n  epochs: 3\n" in config
    # the command's own run, not "another run" (it said so): the message says how to go on
    with pytest.raises(MmlitError, match=r"holds this command's run, since continued with --epochs 3 \(finetune.epochs: "
                                         r"3 there, 2 here\): continue it with --resume .*, or add --epochs 3 to this"):
        run_training("finetune", "xxs", str(data), out=out, epochs=2, **kw)
    with pytest.raises(MmlitError, match=r"holds another run \(finetune.epochs: 3 there, 2 here; finetune.lr"):
        run_training("finetune", "xxs", str(data), out=out, epochs=2, lr=0.5, **kw)  # and something else
    assert run_training("finetune", "xxs", str(data), out=out, epochs=3, **kw)["stopped"] == "finished"


def test_differences_name_the_keys_both_sides_have():
    there = {"config": {"finetune": {"lr": None, "epochs": 3}, "old": 1}, "dataset": {"dataset": "/d"}}
    here = {"config": {"finetune": {"lr": 0.01, "epochs": 3, "new": 2}}, "dataset": {"dataset": "/e"}}
    assert _differences(there, here) == "finetune.lr: not set there, 0.01 here; dataset.dataset: /d there, /e here"
    assert _differences(there, there) == ""


@pytest.mark.parametrize("bad_line", ['{"epoch": 2, "ste', '[1, 2]', '{"epoch": "x"}'])
def test_a_metrics_file_with_a_line_that_is_no_row_is_named_and_left_as_it_is(data, tmp_path, bad_line):
    """A resumed run rewrites metrics.jsonl: a line that is not a row (an edit gone wrong) is a
    one-line error naming it, not an internal error, and not silently dropped."""
    stopped = run_training("finetune", "xxs", str(data), out=tmp_path / "run", max_steps=3, overrides=TINY,
                           epochs=3, batch_size=8, device="cpu", quiet=True)
    assert stopped["stopped"] == "max_steps"
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + bad_line + "\n")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    r = run(command(data, tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"metrics.jsonl, line 2: not a row of a run's metrics" in r.stderr and "mend or delete" in r.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


def test_a_run_without_its_metrics_jsonl_is_not_resumed_over_its_history(data, tmp_path):
    """metrics.jsonl deleted: the resumed run rewrote metrics.csv with its new epochs alone, the
    earlier ones lost without a word. Now a one-line error says so, and nothing changes; an
    empty metrics.jsonl is the user's way to go on without them."""
    out = tmp_path / "run"
    kw = dict(overrides=TINY, batch_size=8, device="cpu", quiet=True)
    run_training("finetune", "xxs", str(data), out=out, epochs=2, **kw)
    (out / "metrics.jsonl").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = run([sys.executable, "-m", "mmlit_cli", "finetune", "--resume", str(out), "--epochs", "3"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "metrics.jsonl is missing: it holds the run's epochs 1-2" in r.stderr and "create it empty" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "metrics.jsonl").write_text("")
    assert run_training("finetune", None, None, resume=out, epochs=3, device="cpu", quiet=True)["epoch"] == 3
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [3]


def test_metrics_csv_has_every_rows_columns(tmp_path):
    """A column only some rows have (ranks_in_sync before a resume on one process, stopped on
    the row --patience ended) stays in metrics.csv, as in metrics.jsonl."""
    import csv

    from mmlit_cli.run_record import write_metrics

    write_metrics(tmp_path, [{"epoch": 1, "loss": 1.0, "ranks_in_sync": True}, {"epoch": 2, "loss": 0.5},
                             {"epoch": 3, "loss": 0.4, "stopped": "patience", "expert_usage": [[0.5, 0.5]]}])
    rows = list(csv.reader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert rows[0] == ["epoch", "loss", "ranks_in_sync", "stopped"]
    assert rows[1] == ["1", "1.0", "True", ""] and rows[3] == ["3", "0.4", "", "patience"]


def test_runs_started_at_once_without_out_get_a_folder_each(data, tmp_path, monkeypatch):
    """A run without --out creates its numbered folder when it picks it: two started at once
    both printed `-> runs/finetune/xxs` and wrote into one folder. One that fails before
    writing anything (a dataset that is not there) leaves no empty folder behind."""
    from mmlit_cli.files import new_run_dir

    monkeypatch.chdir(tmp_path)
    first, second = (new_run_dir(None, "finetune", "xxs", resumable=True, claim=True) for _ in range(2))
    assert (first, second) == (Path("runs/finetune/xxs"), Path("runs/finetune/xxs2")) and second.is_dir()
    kw = dict(overrides=TINY, epochs=1, batch_size=8, device="cpu", console=Console(quiet=True))
    with pytest.raises(MmlitError):
        run_training("finetune", "xxs", str(tmp_path / "no-such-folder"), **kw)
    assert sorted(p.name for p in Path("runs/finetune").iterdir()) == ["xxs", "xxs2"]
    with pytest.raises(MmlitError):  # nor the runs/ folders it made
        run_training("pretrain", "xxs", str(tmp_path / "no-such-folder"), **kw)
    assert sorted(p.name for p in Path("runs").iterdir()) == ["finetune"]
    assert run_training("finetune", "xxs", str(data), **kw)["out_dir"] == str(Path("runs/finetune/xxs3"))
