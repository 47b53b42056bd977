"""TensorBoard event files: what a run and `eval` log, read back with TensorBoard's own reader;
a resumed run's charts hold each epoch once; without the package nothing is written."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from helpers import TINY, tensorboard_events, write_folder

from mmlit_cli.engine import FigureBudget
from mmlit_cli.evaluate import evaluate_checkpoint, write_eval_files
from mmlit_cli.events import scalars_of
from mmlit_cli.train import run_training

ROOT = Path(__file__).resolve().parent.parent


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_metrics_row_becomes_tags_grouped_by_split():
    row = {"epoch": 2, "step": 8, "train_loss": 1.5, "lr": 1e-3, "val_top1": 50.0, "epoch_time_s": 0.5,
           "world_size": 1, "ranks_in_sync": True, "stopped": "why", "expert_usage": [[0.25, 0.75], [1.0]]}
    assert scalars_of(row) == {"train/loss": 1.5, "lr": 1e-3, "val/top1": 50.0, "train/epoch_time_s": 0.5,
                               "expert_usage/layer_0/expert_0": 0.25, "expert_usage/layer_0/expert_1": 0.75,
                               "expert_usage/layer_1/expert_0": 1.0}
    assert scalars_of({"all_top1": 50.0, "test_loss": 1.0}) == {"all/top1": 50.0, "test/loss": 1.0}  # eval --split all


def test_pretrain_logs_its_losses_and_reconstructions(tmp_path):
    data = write_folder(tmp_path / "data", per_class=8)
    run_training("pretrain", "xxs", str(data), out=tmp_path / "mae", overrides=TINY, epochs=2, batch_size=8,
                 console=Console(quiet=True))
    scalars, images, _ = tensorboard_events(tmp_path / "mae")
    logged = rows(tmp_path / "mae")
    assert [step for step, _ in scalars["val/loss"]] == [r["epoch"] for r in logged]
    assert [v for _, v in scalars["val/loss"]] == pytest.approx([r["val_loss"] for r in logged], rel=1e-6)
    assert "val/reconstruction" in images and "val/top1" not in scalars


def test_figures_are_drawn_while_they_cost_little_of_the_run(tmp_path, monkeypatch):
    """A confusion matrix that takes longer to draw than an epoch takes to train (as on a GPU)
    is drawn at the first and the last epoch, and between them only as the budget allows; the
    scalars are logged at every epoch. The budget's clock is the test's: drawing a figure
    moves it 10 s on, so the run would need minutes of steps to earn a second figure."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import mmlit_cli.engine as engine
    import mmlit_cli.plots as plots

    real, drawn_for = plots.confusion_image, [0.0]

    def slow(*args, **kwargs):
        drawn_for[0] += 10.0
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "confusion_image", slow)
    monkeypatch.setattr(engine, "FigureBudget",
                        functools.partial(FigureBudget, clock=lambda: time.perf_counter() + drawn_for[0]))
    data = write_folder(tmp_path / "data", per_class=8)

    def drawn(run):
        acc = EventAccumulator(str(run), size_guidance={"images": 0})
        acc.Reload()
        return [e.step for e in acc.Images("val/confusion")]

    run_training("finetune", "xxs", str(data), out=tmp_path / "run", overrides=TINY, epochs=8, batch_size=8,
                 console=Console(quiet=True))
    steps = drawn(tmp_path / "run")
    assert steps[0] == 1 and steps[-1] == 8 and len(steps) < 8, steps
    scalars, _, _ = tensorboard_events(tmp_path / "run")
    assert [step for step, _ in scalars["val/top1"]] == list(range(1, 9))
    # a run stopped at an epoch's end (here by max_steps: 2 steps per epoch) draws that epoch
    run_training("finetune", "xxs", str(data), out=tmp_path / "stopped", overrides=TINY, epochs=8, batch_size=8,
                 max_steps=10, console=Console(quiet=True))
    assert drawn(tmp_path / "stopped")[-1] == 5


def test_the_figure_budget_is_a_share_of_the_run_so_far():
    now = [100.0]
    budget = FigureBudget(share=0.1, clock=lambda: now[0])
    assert budget.due()  # the first epoch's figures
    now[0] += 10.0  # 10 s into the run: 1 s of figures is the budget
    budget.charge(0.9)
    assert budget.due()
    budget.charge(0.2)
    assert not budget.due()
    now[0] += 2.0  # 12 s: 1.2 s
    assert budget.due()


def test_a_resumed_run_shows_each_epoch_once(tmp_path):
    """A run killed after logging epoch 3 but before saving it resumes from epoch 2 and logs
    epoch 3 again: TensorBoard shows the second one only."""
    data = write_folder(tmp_path / "data", per_class=8)
    run = tmp_path / "run"
    run_training("finetune", "xxs", str(data), out=run, overrides=TINY, epochs=3, batch_size=8, max_steps=4,
                 console=Console(quiet=True))  # 2 steps per epoch: stops after epoch 2
    saved = tmp_path / "at-epoch-2.safetensors"
    shutil.copy(run / "last.safetensors", saved)
    run_training("finetune", None, None, resume=run, console=Console(quiet=True))  # epoch 3, logged and saved
    shutil.copy(saved, run / "last.safetensors")  # as if killed before epoch 3 was saved
    run_training("finetune", None, None, resume=run, console=Console(quiet=True))
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]
    scalars, _, _ = tensorboard_events(run)
    assert len(list(run.glob("events.out.tfevents.*"))) == 3  # one per process
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["train_loss"] for r in rows(run)], rel=1e-6)


def test_eval_logs_its_figures_at_the_checkpoints_step(tmp_path):
    data = write_folder(tmp_path / "data", per_class=8)
    run_training("finetune", "xxs", str(data), out=tmp_path / "run", overrides=TINY, epochs=2, batch_size=8,
                 console=Console(quiet=True))
    report = evaluate_checkpoint(tmp_path / "run" / "last.safetensors", str(data), split="val")
    confusion, note = write_eval_files(report, tmp_path / "eval")
    assert confusion == tmp_path / "eval" / "confusion.png" and note is None
    scalars, images, texts = tensorboard_events(tmp_path / "eval")
    assert [step for step, _ in scalars["val/top1"]] == [2]  # the checkpoint's epoch
    assert scalars["val/top1"][0][1] == pytest.approx(report.result.top1)
    assert scalars["val/balanced_accuracy"][0][1] == pytest.approx(report.result.balanced_accuracy)
    assert images == {"val/confusion"} and "source/text_summary" in texts


@pytest.mark.skipif(sys.platform != "linux", reason="names that are not UTF-8: a Linux file system keeps the bytes")
def test_a_folder_and_a_class_named_with_bytes_that_are_not_utf8_train_and_evaluate(tmp_path):
    """A dataset from a legacy archive: the run's confusion matrix (matplotlib) and eval's
    source line (TensorBoard text) crashed on the names Python reads from such bytes."""
    data = write_folder(tmp_path / os.fsdecode(b"donn\xe9es"), classes=("red", os.fsdecode(b"gr\xfcn"), "blue"),
                        per_class=8)
    run_training("finetune", "xxs", str(data), out=tmp_path / "run", overrides=TINY, epochs=1, batch_size=8,
                 console=Console(quiet=True))
    report = evaluate_checkpoint(tmp_path / "run" / "last.safetensors", str(data), split="val")
    write_eval_files(report, tmp_path / "eval")
    _, images, texts = tensorboard_events(tmp_path / "eval")
    assert report.classes == ["blue", "gr\ufffdn", "red"] and "source/text_summary" in texts
    assert "val/confusion" in tensorboard_events(tmp_path / "run")[1]


def test_without_tensorboard_a_run_writes_no_event_file(tmp_path):
    """A `tensorboard` that cannot be imported stands for the package not being installed."""
    blocker = tmp_path / "blocker" / "tensorboard"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no tensorboard here')\n")
    data = write_folder(tmp_path / "data", per_class=8)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), str(ROOT)]), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "mmlit_cli", "finetune", "--preset", "xxs", "--dataset", str(data), "--epochs", "1",
            "--batch-size", "8", "--out", str(tmp_path / "run"), *[x for o in TINY for x in ("--set", o)]]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert written == ["best.safetensors", "config.yaml", "curves.png", "last.safetensors", "metrics.csv",
                       "metrics.jsonl"]
