"""`--patience N`: a run stops when its monitored validation figure has not improved for N
epochs, keeps the best epoch, records why, and a resumed stopped run says it is finished."""

from __future__ import annotations

import json

import pytest
from rich.console import Console
from safetensors import safe_open

from helpers import TINY, write_folder

from mmlit_cli import tasks
from mmlit_cli.train import run_training


def scripted(monkeypatch, task_cls, key: str, values: list[float]) -> None:
    """The task's validation returns `values`, one per epoch, in order."""
    real, calls = task_cls.validate, []

    def validate(self, model, loader, device, amp_dtype):
        row = real(self, model, loader, device, amp_dtype)
        row[key] = values[len(calls)]
        calls.append(1)
        return row

    monkeypatch.setattr(task_cls, "validate", validate)


def epoch_of(path) -> int:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["info"])["epoch"]


@pytest.mark.parametrize("kind,task_cls,key,values,stop_after,best", [
    ("finetune", tasks.ClassifyTask, "val_top1", [10, 30, 20, 25, 40, 50, 60, 70], 4, 2),  # top-1: higher is better
    ("pretrain", tasks.MAETask, "val_loss", [1.0, 0.9, 0.8, 0.85, 0.81, 0.7, 0.6, 0.5], 5, 3),  # loss: lower
])
def test_patience_stops_at_the_right_epoch_and_a_resume_says_it_is_finished(tmp_path, monkeypatch, kind, task_cls,
                                                                            key, values, stop_after, best):
    data = write_folder(tmp_path / "data", per_class=8)
    scripted(monkeypatch, task_cls, key, values)
    out = Console(record=True, width=300)
    result = run_training(kind, "xxs", str(data), out=tmp_path / "run", overrides=TINY, epochs=8, batch_size=8,
                          patience=2, console=out)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result["stopped"] == "patience" and [r["epoch"] for r in rows] == list(range(1, stop_after + 1))
    assert [r[key] for r in rows] == values[:stop_after]
    assert rows[-1]["stopped"].startswith(f"{key} has not improved for 2 epochs (best {values[best - 1]:.4g} at "
                                          f"epoch {best}")
    assert all("stopped" not in r for r in rows[:-1])
    assert epoch_of(tmp_path / "run" / "best.safetensors") == best
    assert epoch_of(tmp_path / "run" / "last.safetensors") == stop_after
    assert f"stopped early after epoch {stop_after}" in out.export_text()

    again = Console(record=True, width=300)
    resumed = run_training(kind, None, None, resume=tmp_path / "run", console=again)
    assert resumed["stopped"] == "finished" and resumed["epoch"] == stop_after
    assert f"the run is finished (stopped early after epoch {stop_after}: {key} has not improved" in again.export_text()
    assert "data:" not in again.export_text()  # said without reading the data
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == stop_after  # nothing trained


def test_without_patience_a_run_goes_on(tmp_path, monkeypatch):
    data = write_folder(tmp_path / "data", per_class=8)
    scripted(monkeypatch, tasks.ClassifyTask, "val_top1", [10, 30, 20, 25])
    result = run_training("finetune", "xxs", str(data), out=tmp_path / "run", overrides=TINY, epochs=4,
                          batch_size=8, quiet=True)
    assert result["stopped"] is None and result["epoch"] == 4
