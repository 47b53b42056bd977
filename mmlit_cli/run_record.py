"""A run's bookkeeping: where it stands, what it writes, and how it continues.

The engine's loop (`engine.Trainer`) moves the counters forward; `RunRecord` turns them into
the run directory's files and back:

    config.yaml                       at the start (the fitted recipe atop, as comments)
    metrics.jsonl / metrics.csv       a row per epoch
    last.safetensors                  weights + training state (optimizer, EMA, every rank's
                                      generators, the counters), at the start, at epoch ends
                                      and every --save-every steps; what --resume reads
    best.safetensors                  weights (EMA's when on) of the best validated epoch
    events.out.tfevents.*             the same rows and the epoch's figures for TensorBoard,
                                      when it is installed (`events.py`)

Every rank calls `save_last` (the generators are gathered, a collective); rank 0 writes, on a
background thread (`checkpoint.CheckpointWriter`: the state is copied at once, the file lands
a little later; `Trainer.fit` waits for it before it returns or reports a save).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import Checkpoint, CheckpointWriter
from .config import Config, dump_config
from .errors import MmlitError
from .events import EventLog, open_event_log
from .files import atomic_write_text
from .report import as_started
from .runtime import Dist, all_reduce_mean, ranks_agree
from .train_state import (gather_rng_states, optimizer_from_tensors,
                          optimizer_to_tensors, rank_rng_state, set_rng_state)


def diverged(loss_value: float, model: torch.nn.Module) -> bool:
    """A non-finite loss or weight: such a state is never checkpointed."""
    if not math.isfinite(loss_value):
        return True
    return not bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def moved_to_world(epoch: int, step_in_epoch: int, loss_sum: float, batch: int, saved_world: int, world: int,
                   steps_per_epoch: int) -> tuple[int, int, float]:
    """(step in the epoch, global step, the epoch's loss sum so far) of a run saved by
    `saved_world` processes, resumed by `world`: the images of the epoch already trained on are
    kept (whole batches of the new global batch); the global step follows the new steps per
    epoch; the loss sum is that of as many step means."""
    done = step_in_epoch * batch * saved_world
    new_step = min(done // (batch * world), steps_per_epoch - 1) if done else 0
    if step_in_epoch:
        loss_sum *= new_step / step_in_epoch
    return new_step, epoch * steps_per_epoch + new_step, loss_sum


def write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.jsonl and metrics.csv, each epoch's row of `history` (rewritten atomically)."""
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    # every row's columns, in order of first use: rows of a resumed run can differ (ranks_in_sync
    # on several processes, stopped on the row --patience ended)
    columns = list(dict.fromkeys(k for h in history for k, v in h.items() if not isinstance(v, (list, dict))))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def check_history(out: Path, epochs_done: int) -> None:
    """A run resumed after `epochs_done` epochs needs their metrics.jsonl: the next epoch
    rewrites metrics.csv (and curves.png) from it, so without it the epochs done would be lost."""
    history = out / "metrics.jsonl"
    if epochs_done > 0 and not history.exists():
        done = "epoch 1" if epochs_done == 1 else f"epochs 1-{epochs_done}"
        raise MmlitError(f"{history} is missing: it holds the run's {done}, which metrics.csv and curves.png are "
                         f"rewritten from; put it back, or create it empty to go on without them")


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows, for a resumed run to go on with (and rewrite): one that is not a row
    mmlit writes (a JSON object with an integer epoch; an edit gone wrong) is an error naming its
    line, not dropped, as the file is rewritten at the next epoch."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MmlitError(f"cannot read {path} ({exc})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool)):
            raise MmlitError(f"{path}, line {number}: not a row of a run's metrics ({line[:40]!r}); mend or "
                             f"delete that line to resume")
        rows.append(row)
    return rows


@dataclass
class RunFacts:
    """What a run records about itself besides its counters (the part of `engine.RunOptions`
    that goes into its files)."""

    out_dir: Path
    dataset: dict[str, Any]  # how to load the data again on --resume
    # The same with absolute paths, recorded in every checkpoint: what `eval` and `benchmark`
    # score on when no --dataset is given.
    data_source: dict[str, Any] | None = None
    # `ImageData.held_out` of the training data: which files of a folder or label file were held
    # out for validation, recorded in every checkpoint (`eval --split val`, --resume check it)
    held_out: str | None = None
    # Layer-wise lr decay of the param groups: the recipe's when the run started from a
    # pre-trained encoder (--init), else 1. Kept in the training state: --resume must rebuild
    # the very groups the saved optimizer state belongs to.
    layer_decay: float = 1.0
    recipe_note: str | None = None  # the fitted recipe in words: printed, and atop config.yaml
    # False when validation is the test split (the paper protocol): a checkpoint picked on it
    # would be selected on the test set, so only last.safetensors is kept.
    save_best: bool = True
    # What makes the run this run (config before fitting, data, --init): the same command run
    # again with this --out continues it (`train._continued_run`).
    invocation: dict[str, Any] | None = None


def write_run_files(out: Path, cfg: Config, recipe_note: str | None, epoch: int, global_step: int):
    """config.yaml, with the fitted recipe in words atop it, and the run's event log (returned,
    None without TensorBoard); a new run's config goes into the log too."""
    note = "".join(f"# {line}\n" for line in (recipe_note or "").splitlines())
    # the values below are the fitted ones: fitting them again (--recipe auto) would treat the
    # run's length as a preset's and change them
    again = "# to train with exactly this recipe again: --preset config.yaml --recipe paper\n"
    atomic_write_text(out / "config.yaml", note + again + dump_config(cfg))
    # a resumed run hides what an attempt logged after its checkpoint (an epoch logged, then
    # killed before it was saved): that epoch is logged again
    events = open_event_log(out, purge_step=epoch + 1 if global_step else None)
    if events is not None and global_step == 0:
        events.text("config", note + dump_config(cfg))
    return events


def patience_is_spent(epoch: int, best_epoch: int, patience: int) -> bool:
    """Whether `patience` epochs (0: never) have passed since the best one: --patience's rule."""
    return patience > 0 and epoch - best_epoch >= patience


def stopped_early(info: dict, patience: int) -> bool:
    """Whether a checkpoint's run (its `train_info`) stopped early and stays stopped under
    `patience`: a run resumed with a larger --patience goes on, as the new patience is not spent."""
    epoch = int(info["epoch"])
    return bool(info.get("early_stop")) and patience_is_spent(epoch, int(info.get("best_epoch", epoch)), patience)


def patience_stop(monitor: str, best: float, best_epoch: int, epoch: int, patience: int) -> str | None:
    """Why the run stops early, when `patience` epochs have passed since its best (0: never)."""
    if not patience_is_spent(epoch, best_epoch, patience):
        return None
    epochs = "1 epoch" if patience == 1 else f"{patience} epochs"
    return f"{monitor} has not improved for {epochs} (best {best:.4g} at epoch {best_epoch}; --patience {patience})"


def restore_weights(ckpt: Checkpoint, model: torch.nn.Module, ema, device: torch.device) -> None:
    """A last.safetensors' trained weights into `model` and its EMA into `ema` (when the run keeps
    one). With an EMA, the checkpoint's weights are the EMA's (the ones scored and shipped) and
    the trained ones are in its training state as model/...; older checkpoints had it the other
    way round (the EMA as ema/...), and still resume."""
    trained = {k[len("model/"):]: v for k, v in ckpt.train_tensors.items() if k.startswith("model/")}
    averaged = ckpt.tensors if trained else \
        {k[len("ema/"):]: v for k, v in ckpt.train_tensors.items() if k.startswith("ema/")}
    model.load_state_dict(trained or ckpt.tensors)
    if ema is not None:
        if averaged:
            ema.module.load_state_dict({k: v.to(device) for k, v in averaged.items()})
        # Runs saved before the warm-up existed: the EMA was updated once per step.
        ema.updates = int(ckpt.train_info.get("ema_updates", ckpt.train_info["global_step"]))


class RunRecord:
    """The counters of a run (epoch, step, best, training time), its files, and --resume."""

    def __init__(self, facts: RunFacts, cfg: Config, task, model: torch.nn.Module, optimizer, ema,
                 dist: Dist, device: torch.device):
        self.facts, self.cfg, self.task = facts, cfg, task
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.dist, self.device = dist, device
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best: float | None = None
        self.best_epoch = 0  # the epoch that set `best`
        self.early_stop: str | None = None  # why --patience ended the run, once it has
        self.history: list[dict] = []
        self.elapsed = 0.0  # seconds of training, banked at every checkpoint
        self._clock = time.perf_counter()
        self.partial_loss_sum = 0.0  # this epoch's loss sum at its last in-epoch checkpoint
        self.resume_loss_sum = 0.0  # where a resumed epoch's loss sum starts (taken once)
        self._resume_rng: dict[str, torch.Tensor] | None = None
        self.events: EventLog | None = None  # TensorBoard's event file (rank 0, when installed), from `start`
        self.writer = CheckpointWriter()  # last/best.safetensors, written off the training's path

    # ------------------------------------------------------------------ the run directory

    def start(self) -> None:
        """A new run's last.safetensors at step 0, so that a run killed before its first
        checkpoint is continued like any other (`train._continued_run`), from the start; then
        config.yaml (rank 0), with the fitted recipe in words atop it, and the event log. In
        that order: a folder a killed start left holds that checkpoint, or nothing of the run."""
        out = self.facts.out_dir
        if self.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
        if not ranks_agree(self.global_step, self.dist, self.device):
            raise MmlitError(f"the processes do not start at the same step: each reads {out / 'last.safetensors'}, "
                             f"so on several machines --out must be a folder they all see")
        if self.global_step == 0 and self._resume_rng is None:  # every rank: the generators are gathered
            self.save_last()
            self.writer.wait()
        if self.dist.is_main:
            self.events = write_run_files(out, self.cfg, self.recipe_note, self.epoch, self.global_step)

    @property
    def recipe_note(self) -> str | None:
        """The recipe in words, as printed and atop config.yaml: a resumed run's is the one fitted at
        its start (`as_started`), whose config may now say other epochs (--resume --epochs)."""
        return as_started(self.facts.recipe_note) if self.global_step else self.facts.recipe_note

    def close_events(self, curves: Path | None = None) -> None:
        """The training curves (when drawn) into the event file, which is then closed."""
        if self.events is not None:
            if curves is not None:
                self.events.png("curves", Path(curves), self.epoch)
            self.events.close()
            self.events = None

    def close_epoch(self, row: dict, train_loss: float, patience: int, last: bool) -> bool:
        """An epoch's `row` recorded, before its checkpoint (so a resumed run never lacks an epoch
        it had saved): the best so far, an early stop (`patience`; none after the `last` epoch),
        metrics.jsonl/.csv and TensorBoard's scalars. Returns whether the epoch improved."""
        improved = self.update_best(row, train_loss)
        if not last:
            self.early_stop = row["stopped"] = patience_stop(self.task.monitor, self.best, self.best_epoch, self.epoch,
                                                             patience)
        self.history.append({k: v for k, v in row.items() if v is not None})
        if self.dist.is_main:
            write_metrics(self.facts.out_dir, self.history)
        if self.events is not None:  # at the epoch: the axis a resume on another process count keeps
            self.events.scalars(row, self.epoch)
        return improved

    # ------------------------------------------------------------------ counters

    def restart_clock(self) -> None:
        self._clock = time.perf_counter()

    def bank_elapsed(self) -> None:
        now = time.perf_counter()
        self.elapsed += now - self._clock
        self._clock = now

    def update_best(self, row: dict, train_loss: float) -> bool:
        """Whether the epoch of `row` improved the monitored figure (then it is the best)."""
        value = row.get(self.task.monitor)  # (finite: an epoch whose validation is not stops the run first)
        improved = value is None or self.best is None or (  # no validation split: the latest is the best we know
            value > self.best if self.task.higher_is_better else value < self.best)
        if improved:
            self.best, self.best_epoch = row.get(self.task.monitor, train_loss), self.epoch
        return improved

    # ------------------------------------------------------------------ checkpoints

    def save_last(self, metrics: dict | None = None) -> None:
        """last.safetensors, with the training state. Every rank calls it; rank 0 writes. Its
        weights are the ones the run scores: the EMA's when there is one (what eval, export and
        predict then read: with --val test it is the run's only model); the weights being trained
        are then in the training state (`_train_state`)."""
        rng = gather_rng_states(self.device, self.dist)
        if self.dist.is_main:
            self.writer.save(self.facts.out_dir / "last.safetensors", self._checkpoint(self._scored(), metrics, rng))

    def _scored(self) -> dict[str, torch.Tensor]:
        """The weights validation scores: the EMA's when the run keeps one."""
        return self.ema.shadow if self.ema is not None else self.model.state_dict()

    def save_within_epoch(self, loss_sum: torch.Tensor) -> bool:
        """last.safetensors within an epoch, with the epoch's loss sum so far: its mean over
        ranks (a collective), which each rank resumes from, so the epoch's all-reduced mean
        comes out as in an uninterrupted run. False, and nothing saved, when the state has
        diverged."""
        self.partial_loss_sum = all_reduce_mean(loss_sum.detach().clone(), self.dist).item()
        if diverged(self.partial_loss_sum, self.model):
            return False
        self.bank_elapsed()
        self.save_last()
        return True

    def save_epoch(self, row: dict, improved: bool) -> None:
        """best.safetensors when the monitored figure improved, then last.safetensors. In that
        order: a process killed between the two writes leaves a last.safetensors of the epoch
        before, which a restart trains on from, so it writes both again; the other way round,
        last recorded this epoch as the best while best.safetensors held an older one, for good."""
        if improved and self.facts.save_best and self.dist.is_main:
            self.writer.save(self.facts.out_dir / "best.safetensors", self._checkpoint(self._scored(), row))
        self.save_last(row)

    def _checkpoint(self, weights: dict[str, torch.Tensor], metrics: dict | None,
                    rng: dict[str, torch.Tensor] | None = None) -> Checkpoint:
        """A checkpoint; with the training state when given every rank's generators (`rng`)."""
        info = {"epoch": self.epoch, "global_step": self.global_step, "metrics": metrics or {},
                "mmlit_version": __version__}
        if self.facts.data_source is not None:
            info["dataset"] = self.facts.data_source
        if self.facts.held_out is not None:
            info["held_out"] = self.facts.held_out
        ckpt = Checkpoint(weights, self.cfg, self.task.kind, list(self.task.classes), info)
        if rng is not None:
            ckpt.train_tensors, ckpt.train_info = self._train_state(rng)
        return ckpt

    def _train_state(self, rng: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, opt_info = optimizer_to_tensors(self.optimizer)
        tensors.update(rng)
        info: dict[str, Any] = {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best": self.best, "best_epoch": self.best_epoch, "early_stop": self.early_stop,
            "elapsed": self.elapsed, "optimizer": opt_info,
            "epoch_loss_sum": self.partial_loss_sum if self.step_in_epoch else 0.0,
            "dataset": self.facts.dataset, "world_size": self.dist.world_size,
            "layer_decay": self.facts.layer_decay, "recipe_note": self.facts.recipe_note,
            "invocation": self.facts.invocation,
            # which torchrun job trains it: its restarts find the folder by it, without --out
            "torchrun_run_id": os.environ.get("TORCHELASTIC_RUN_ID")}
        if self.ema is not None:  # the checkpoint's weights are the EMA's: the trained ones go here
            tensors.update({f"model/{k}": v for k, v in self.model.state_dict().items()})
            info["ema_updates"] = self.ema.updates
        return tensors, info

    # ------------------------------------------------------------------ --resume

    def resume_from(self, ckpt: Checkpoint, steps_per_epoch: int) -> None:
        """Weights, optimizer, EMA and counters from a last.safetensors; this rank's generators
        are put back by `restore_rng` when the loop reaches the batch they were saved at. On
        another number of processes (torchrun can come back smaller) the position in the epoch
        is carried over in images and the generators start afresh (`moved_to_world`)."""
        if ckpt.train_info is None:
            raise MmlitError("the checkpoint has no training state to resume from")
        info = ckpt.train_info
        restore_weights(ckpt, self.model, self.ema, self.device)
        optimizer_from_tensors(self.optimizer, ckpt.train_tensors, info["optimizer"])
        self.epoch, self.step_in_epoch = int(info["epoch"]), int(info["step_in_epoch"])
        self.global_step, self.best, self.elapsed = int(info["global_step"]), info["best"], float(info["elapsed"])
        self.best_epoch, self.early_stop = int(info.get("best_epoch", self.epoch)), info.get("early_stop")
        if not stopped_early(info, getattr(self.cfg, self.task.command).patience):
            self.early_stop = None  # resumed with a --patience the run has not spent: it goes on
        self.resume_loss_sum = float(info.get("epoch_loss_sum", 0.0))
        saved_world = int(info.get("world_size", 1))
        if saved_world == self.dist.world_size:
            self._resume_rng = rank_rng_state(ckpt.train_tensors, self.dist.rank, self.device)
        else:
            batch, seed = getattr(self.cfg, self.task.command).batch_size, getattr(self.cfg, self.task.command).seed
            self.step_in_epoch, self.global_step, self.resume_loss_sum = moved_to_world(
                self.epoch, self.step_in_epoch, self.resume_loss_sum, batch, saved_world, self.dist.world_size,
                steps_per_epoch)
            torch.manual_seed(seed + 1_000_003 * self.global_step + self.dist.rank)  # the old streams: other ranks'
        history = self.facts.out_dir / "metrics.jsonl"  # there when epochs are done (`check_history`)
        if history.exists():
            self.history = [h for h in read_metrics(history) if h["epoch"] <= self.epoch]

    def take_resume_loss_sum(self) -> float:
        """Where this epoch's loss sum starts: the saved partial sum once after a resume, else 0."""
        value, self.resume_loss_sum = self.resume_loss_sum, 0.0
        return value

    def restore_rng(self) -> None:
        """Put the generators back where the checkpoint resumed from saved them (once)."""
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng, self.device)
            self._resume_rng = None
