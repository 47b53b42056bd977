"""`--patience N`: a run stops when its monitored validation figure has not improved for N
epochs, keeps the best epoch, records why, and a resumed stopped run says it is finished (unless
a larger --patience lets it go on)."""

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


@pytest.mark.parametrize("patience,goes_on", [(4, True), (0, True), (2, False), (1, False)])
def test_a_stopped_run_resumed_with_a_patience_it_has_not_spent_goes_on(tmp_path, monkeypatch, patience, goes_on):
    """`--patience` may change on --resume: a larger one (or 0, never stop) that the run has not
    spent lets it train on from where it stopped; one it has spent leaves it finished."""
    data = write_folder(tmp_path / "data", per_class=8)
    scripted(monkeypatch, tasks.ClassifyTask, "val_top1", [10, 30, 20, 25, 40, 50, 60, 70])
    first = run_training("finetune", "xxs", str(data), out=tmp_path / "run", overrides=TINY, epochs=8, batch_size=8,
                         patience=2, quiet=True)
    assert first["stopped"] == "patience" and first["epoch"] == 4
    said = Console(record=True, width=300)
    resumed = run_training("finetune", None, None, resume=tmp_path / "run", patience=patience, console=said)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if goes_on:
        assert resumed["stopped"] is None and resumed["epoch"] == 8, said.export_text()
        assert [r["epoch"] for r in rows] == list(range(1, 9)) and [r["val_top1"] for r in rows][4:] == [40, 50, 60, 70]
        assert f"had stopped early (val_top1 has not improved for 2 epochs" in said.export_text()
        assert epoch_of(tmp_path / "run" / "best.safetensors") == 8
    else:
        assert resumed["stopped"] == "finished" and len(rows) == 4


def test_an_early_stop_names_best_safetensors_only_where_the_run_keeps_one():
    """With --val test no best.safetensors is kept: the stop line said "(best.safetensors is
    epoch 1)", then the run's last line said there is none."""
    from mmlit_cli.report import stop_line

    kept = stop_line("patience", 3, "val_top1 has not improved", 1, None, "runs/x")
    assert kept.endswith("the run is finished (best.safetensors is epoch 1)")
    none = stop_line("patience", 3, "val_top1 has not improved", 1, None, "runs/x", best_saved=False)
    assert none.endswith("the run is finished") and "best.safetensors" not in none
