"""One training engine for `finetune` (classification) and `pretrain` (MAE).

    fit(): for epoch:
               train_one_epoch(): for batch: forward (bf16 autocast on CUDA) -> backward ->
                   clip -> AdamW step (lr: linear warm-up, then cosine) -> EMA
               end of epoch: validate -> metrics.jsonl/.csv -> last/best.safetensors

A task (`tasks.py`) says what the model is, what its loss is and how it is validated;
everything else - devices, DDP, checkpoints, resume, signals, logging - lives here once. The
hot loop keeps losses on the device and syncs with the host only when it prints
(`report.py`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from . import __version__
from .checkpoint import Checkpoint, save_checkpoint
from .config import Config, TrainConfig, dump_config
from .data import DeviceLoader, ImageData, Normalize, build_loaders, resolve_loader, set_epoch
from .errors import MmlitError
from .files import atomic_write_text
from .optim import ModelEMA, build_adamw, lr_at, one_cycle_at, param_groups
from .recipe import peak_lr
from .report import StopRequest, TrainingProgress, epoch_line, router_warning
from .runtime import all_reduce_mean, amp_dtype, forward_batch, maybe_compile, rng_devices, setup_distributed
from .train_state import (check_resume_world_size, gather_rng_states, optimizer_from_tensors,
                          optimizer_to_tensors, rank_rng_state, set_rng_state)


# torch.compile of the s training step on an H200 took ~80 s and saved ~25 ms per step at batch
# 512 (6,562 -> 9,636 img/s, docs/BENCHMARKS.md "GPU: first measurements"): repaid after
# ~3,200 steps. On CPU it brought no gain at these sizes, so it is never on by default there.
COMPILE_PAYS_AFTER_STEPS = 3200


def compile_pays(device: torch.device, total_steps: int) -> bool:
    """Whether `--compile` is on by default: on a CUDA GPU, for runs long enough to repay it."""
    return device.type == "cuda" and total_steps >= COMPILE_PAYS_AFTER_STEPS


@dataclass
class RunOptions:
    out_dir: Path
    dataset: dict[str, Any]  # how to load the data again on --resume
    # The same with absolute paths, recorded in every checkpoint: what `eval` and `benchmark`
    # score on when no --dataset is given.
    data_source: dict[str, Any] | None = None
    device: str = "auto"
    compile: bool | None = False  # None: compile when it pays (`compile_pays`)
    compile_mode: str | None = None  # torch.compile mode: None/"default", "reduce-overhead", "max-autotune"
    save_every: int = 200  # steps between in-epoch checkpoints (0 = only at epoch ends)
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests, benchmarks)
    log_every: int = 10
    # Layer-wise lr decay of the param groups: the recipe's when the run started from a
    # pre-trained encoder (--init), else 1. Kept in the training state: --resume must rebuild
    # the very groups the saved optimizer state belongs to.
    layer_decay: float = 1.0
    recipe_note: str | None = None  # the fitted recipe in words: printed, and atop config.yaml
    quiet: bool = False
    # False when validation is the test split (the paper protocol): a checkpoint picked on it
    # would be selected on the test set, so only last.safetensors is kept.
    save_best: bool = True


class Trainer:
    def __init__(self, task, cfg: Config, train_data: ImageData, val_data: ImageData | None, opts: RunOptions,
                 console: Console | None = None):
        self.task, self.cfg, self.opts = task, cfg, opts
        self.recipe: TrainConfig = task.recipe
        self.console = console or Console()
        self.dist, self.device = setup_distributed(opts.device)
        self.amp_dtype = amp_dtype(self.device)
        torch.manual_seed(self.recipe.seed + self.dist.rank)

        self.model = task.model.to(self.device)
        self.normalize = Normalize(cfg.data.mean, cfg.data.std, self.device)  # made once: no per-step copies
        # the config records what `loader: auto` chose, so a resumed run replays the same batches
        loader, self.loader_note = resolve_loader(self.recipe.loader, self.recipe.workers, self.device,
                                                  train_data, val_data)
        self.recipe = dataclasses.replace(self.recipe, loader=loader)
        self.cfg = dataclasses.replace(self.cfg, **{task.command: self.recipe})
        self.train_loader, self.val_loader = build_loaders(self.recipe, cfg.model.image_size, train_data, val_data,
                                                           self.device, self.dist.rank, self.dist.world_size,
                                                           self.dist.enabled)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise MmlitError("the training split is empty")
        self.total_steps = self.steps_per_epoch * self.recipe.epochs
        self.warmup_steps = min(int(self.recipe.warmup_epochs * self.steps_per_epoch), self.total_steps // 2)

        self.layer_decay = opts.layer_decay
        self.peak_lr = peak_lr(self.recipe, self.dist.world_size)
        groups = param_groups(self.model, self.recipe.weight_decay, self.layer_decay, self.recipe.decay_all)
        self.optimizer = build_adamw(groups, self.peak_lr, self.recipe.betas, self.device)
        self.ema = ModelEMA(self.model, self.recipe.ema_decay) if self.recipe.ema else None
        self.train_model = self.model
        if self.dist.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.compiled = compile_pays(self.device, self.total_steps) if opts.compile is None and not opts.compile_mode \
            else bool(opts.compile or opts.compile_mode)
        self.train_model = maybe_compile(self.train_model, self.compiled, opts.compile_mode)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best: float | None = None
        self.history: list[dict] = []
        self.elapsed = 0.0
        self.stop = StopRequest()
        self.partial_loss_sum = 0.0  # sum of this epoch's step losses at the last in-epoch checkpoint
        self._resume_loss_sum = 0.0
        self._resume_rng: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to the last epoch, or until stopped: by Ctrl-C or `max_steps` (a resumable
        checkpoint is saved), or by a non-finite loss (an error; the last good checkpoint stays)."""
        with self.stop:
            self._start_run()
            self.progress = TrainingProgress(self.console, self.device, self.opts.log_every, self.dist.world_size,
                                             disable=not self.dist.is_main or self.opts.quiet)
            self.bad_loss, stopped = float("nan"), None
            with self.progress:
                while self.epoch < self.recipe.epochs and stopped is None:
                    stopped = self._run_epoch()
            return self._finish(stopped)

    def _run_epoch(self) -> str | None:
        """An epoch (what is left of it, after a resume) and its end-of-epoch work; returns why
        the run stops ("nan", "interrupt", "max_steps"), or None to go on."""
        start = time.perf_counter()
        loss_sum, seen, stopped = self.train_one_epoch()
        if stopped == "nan":
            return stopped
        if stopped is not None and self.step_in_epoch < self.steps_per_epoch:  # stopped within the epoch
            return stopped if self._save_within_epoch(loss_sum) else "nan"
        return self._end_epoch(loss_sum, seen, time.perf_counter() - start) or stopped

    def train_one_epoch(self) -> tuple[torch.Tensor, int, str | None]:
        """The steps of one epoch: (the epoch's loss sum on the device, images seen, why it
        stopped early or None)."""
        set_epoch(self.train_loader, self.epoch)
        self._elapsed_mark = time.perf_counter()  # `elapsed` (total training time) is banked at every checkpoint
        self.progress.start_epoch(self.epoch, self.recipe.epochs, self.steps_per_epoch)
        batches, skip = self._epoch_batches()
        # A resumed epoch starts from the loss sum saved with its checkpoint, so the epoch's
        # train_loss is the same as in an uninterrupted run.
        loss_sum = torch.full((), self._resume_loss_sum, device=self.device)
        self._resume_loss_sum = 0.0
        seen, stopped = 0, None
        if skip == 0:  # resumed at an epoch boundary, or at the batch a DeviceLoader starts from
            self._restore_resumed_rng()
        for i, (images, labels) in batches:
            if i < skip:
                if i == skip - 1:  # where the RNG was saved: after batch skip-1, before batch skip is drawn
                    self._restore_resumed_rng()
                self.progress.skip()
                continue
            loss = self._train_step(images, labels)
            loss_sum += loss
            seen += images.shape[0]
            stopped = self._after_step(loss, images.shape[0], loss_sum)
            if stopped is not None:
                break
        self.progress.end_epoch()
        self._bank_elapsed()
        return loss_sum, seen, stopped

    def _epoch_batches(self):
        """(enumerated batches of this epoch, how many of them to skip). Resuming mid-epoch, a
        DeviceLoader starts at the next batch; a DataLoader replays the epoch's order and the
        loop skips the batches already done."""
        done = self.step_in_epoch
        if isinstance(self.train_loader, DeviceLoader):
            for _ in range(done):
                self.progress.skip()
            return enumerate(self.train_loader.batches(done), start=done), 0
        return enumerate(self.train_loader), done

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch of uint8 images; returns its loss, on the device."""
        if self.recipe.schedule == "one-cycle":
            warmup_fraction = min(self.recipe.warmup_epochs / self.recipe.epochs, 0.5)
            lr, beta1 = one_cycle_at(self.global_step, self.total_steps, warmup_fraction, self.peak_lr)
            for group in self.optimizer.param_groups:
                group["betas"] = (beta1, self.recipe.betas[1])
        else:
            lr = lr_at(self.global_step, self.total_steps, self.warmup_steps, self.peak_lr, self.recipe.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        labels = labels.to(self.device, non_blocking=True)
        loss = forward_batch(lambda x: self.task.loss(self.train_model, x, labels), images, self.normalize,
                             self.device, self.amp_dtype)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.global_step += 1
        self.step_in_epoch += 1
        return loss.detach()

    def _after_step(self, loss: torch.Tensor, batch_size: int, loss_sum: torch.Tensor) -> str | None:
        """The progress bar (and the NaN check on the loss it reads), the stops and the in-epoch
        checkpoints after a step; returns why to stop, or None."""
        at_end = self.step_in_epoch == self.steps_per_epoch
        shown = self.progress.step(loss, batch_size, self.optimizer.param_groups[-1]["lr"],
                                   flush=at_end or self.stop.requested)
        if shown is not None and not math.isfinite(shown):
            self.bad_loss = shown
            return "nan"
        if self.opts.max_steps is not None and self.global_step >= self.opts.max_steps:
            return "max_steps"
        if self.stop.requested:
            return "interrupt"
        if self.opts.save_every and self.global_step % self.opts.save_every == 0 and not at_end:
            if not self._save_within_epoch(loss_sum):
                return "nan"
        return None

    def _end_epoch(self, loss_sum: torch.Tensor, seen: int, epoch_time: float) -> str | None:
        """Validate, log and save after the last step of an epoch; "nan" (and nothing saved)
        when the epoch's loss or the weights are not finite."""
        train_loss = all_reduce_mean(loss_sum / max(self.step_in_epoch, 1), self.dist).item()
        if self._diverged(train_loss):
            return "nan"
        self.partial_loss_sum = 0.0
        val = self.task.validate(self.ema_or_model(), self.val_loader, self.device, self.amp_dtype) \
            if self.val_loader is not None else {}
        self.epoch += 1
        self.step_in_epoch = 0
        world = self.dist.world_size
        row = {"epoch": self.epoch, "step": self.global_step, "train_loss": train_loss,
               "lr": self.optimizer.param_groups[-1]["lr"], **val,
               "epoch_time_s": round(epoch_time, 3), "train_img_per_s": round(seen * world / max(epoch_time, 1e-9), 1),
               "world_size": world}
        if self.dist.enabled:
            row["ranks_in_sync"] = self._ranks_in_sync()
        self._write_metrics(row)
        self._save_epoch(row, train_loss)
        self._print(epoch_line(row, self.recipe.epochs))
        warning = router_warning(row.get("expert_usage"))
        if warning:
            self._print(warning)
        if self.dist.is_main:
            with torch.random.fork_rng(devices=rng_devices(self.device)):  # keep the training RNG stream as saved
                note = self.task.after_epoch(self.model, self.val_loader or self.train_loader, self.device,
                                             self.opts.out_dir)
            if note:
                self._print(escape(note))
        return None

    def _finish(self, stopped: str | None) -> dict:
        out = self.opts.out_dir
        if stopped == "nan":
            raise MmlitError(f"the loss became {self.bad_loss} at step {self.global_step}; stopped. The last good "
                             f"checkpoint is {out / 'last.safetensors'} (try a lower --lr or --set "
                             f"{self.task.command}.grad_clip=1.0)")
        if stopped == "interrupt":
            self._print(f"[yellow]interrupted[/yellow]: saved a resumable checkpoint; continue with "
                        f"--resume {escape(str(out))}")
        return {"stopped": stopped, "epoch": self.epoch, "global_step": self.global_step,
                "history": self.history, "best": self.best, "best_saved": self.opts.save_best}

    def _diverged(self, loss_value: float) -> bool:
        """A non-finite loss or weight: the state must not be checkpointed."""
        if not math.isfinite(loss_value):
            return True
        return not bool(torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all())

    def ema_or_model(self):
        return self.model if self.ema is None else self.ema.module

    def _is_better(self, row: dict) -> bool:
        value = row.get(self.task.monitor)
        if value is None or self.best is None:
            return True  # no validation split: the latest is the best we know
        return value > self.best if self.task.higher_is_better else value < self.best

    def _ranks_in_sync(self) -> bool:
        flat = torch.cat([p.detach().float().flatten() for p in self.model.parameters()])
        checksum = torch.stack([flat.sum(), flat.abs().sum()]).double()
        gathered = [torch.zeros_like(checksum) for _ in range(self.dist.world_size)]
        torch.distributed.all_gather(gathered, checksum)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    # ------------------------------------------------------------------ checkpoints

    def _bank_elapsed(self) -> None:
        now = time.perf_counter()
        self.elapsed += now - self._elapsed_mark
        self._elapsed_mark = now

    def _bank_partial_loss(self, loss_sum: torch.Tensor) -> None:
        """This epoch's loss sum so far, for an in-epoch checkpoint: the mean over ranks (a
        collective), which each rank resumes from, so the epoch's all-reduced mean comes out
        as in an uninterrupted run."""
        self.partial_loss_sum = all_reduce_mean(loss_sum.detach().clone(), self.dist).item()

    def _save_within_epoch(self, loss_sum: torch.Tensor) -> bool:
        """last.safetensors within an epoch, with the epoch's loss sum so far; False, and
        nothing saved, when the state has diverged (a diverged model is never checkpointed)."""
        self._bank_partial_loss(loss_sum)
        if self._diverged(self.partial_loss_sum):
            return False
        self._bank_elapsed()
        self.save_last()
        return True

    def _save_epoch(self, row: dict, train_loss: float) -> None:
        """last.safetensors, and best.safetensors when the monitored figure improved."""
        improved = self._is_better(row)
        if improved:
            self.best = row.get(self.task.monitor, train_loss)
        self.save_last(row)
        if improved and self.opts.save_best and self.dist.is_main:
            weights = self.ema.shadow if self.ema is not None else self.model.state_dict()
            save_checkpoint(self.opts.out_dir / "best.safetensors", self._checkpoint(weights, row))

    def _train_state(self, rng: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, opt_info = optimizer_to_tensors(self.optimizer)
        tensors.update(rng)
        info: dict[str, Any] = {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best": self.best, "elapsed": self.elapsed, "optimizer": opt_info,
            "epoch_loss_sum": self.partial_loss_sum if self.step_in_epoch else 0.0, "dataset": self.opts.dataset,
            "world_size": self.dist.world_size, "layer_decay": self.layer_decay,
            "recipe_note": self.opts.recipe_note}
        if self.ema is not None:
            tensors.update({f"ema/{k}": v for k, v in self.ema.shadow.items()})
            info["ema_updates"] = self.ema.updates
        return tensors, info

    def _checkpoint(self, weights: dict[str, torch.Tensor], metrics: dict | None,
                    rng: dict[str, torch.Tensor] | None = None) -> Checkpoint:
        """A checkpoint; with the training state when given every rank's generators (`rng`)."""
        info = {"epoch": self.epoch, "global_step": self.global_step, "metrics": metrics or {},
                "mmlit_version": __version__}
        if self.opts.data_source is not None:
            info["dataset"] = self.opts.data_source
        ckpt = Checkpoint(weights, self.cfg, self.task.kind, list(self.task.classes), info)
        if rng is not None:
            ckpt.train_tensors, ckpt.train_info = self._train_state(rng)
        return ckpt

    def save_last(self, metrics: dict | None = None) -> None:
        """last.safetensors, with the training state. Every rank calls it (the generators are
        gathered); rank 0 writes."""
        rng = gather_rng_states(self.device, self.dist)
        if self.dist.is_main:
            save_checkpoint(self.opts.out_dir / "last.safetensors",
                            self._checkpoint(self.model.state_dict(), metrics, rng))

    def resume_from(self, ckpt: Checkpoint) -> None:
        if ckpt.train_info is None:
            raise MmlitError("the checkpoint has no training state to resume from")
        info = ckpt.train_info
        self.model.load_state_dict(ckpt.tensors)
        optimizer_from_tensors(self.optimizer, ckpt.train_tensors, info["optimizer"])
        if self.ema is not None:
            ema = {k[4:]: v.to(self.device) for k, v in ckpt.train_tensors.items() if k.startswith("ema/")}
            if ema:
                self.ema.module.load_state_dict(ema)
            # Runs saved before the warm-up existed: the EMA was updated once per step.
            self.ema.updates = int(info.get("ema_updates", info["global_step"]))
        self.epoch, self.step_in_epoch = int(info["epoch"]), int(info["step_in_epoch"])
        self.global_step, self.best, self.elapsed = int(info["global_step"]), info["best"], float(info["elapsed"])
        self._resume_loss_sum = float(info.get("epoch_loss_sum", 0.0))
        check_resume_world_size(int(info.get("world_size", 1)))
        self._resume_rng = rank_rng_state(ckpt.train_tensors, self.dist.rank, self.device)
        history = self.opts.out_dir / "metrics.jsonl"
        if history.exists():
            self.history = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
            self.history = [h for h in self.history if h["epoch"] <= self.epoch]

    def _restore_resumed_rng(self) -> None:
        """Put the generators back where the checkpoint resumed from saved them (once)."""
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng, self.device)
            self._resume_rng = None

    # ------------------------------------------------------------------ logging

    def _start_run(self) -> None:
        """config.yaml, and the run in a line (two with the fitted recipe)."""
        recipe, out = self.recipe, self.opts.out_dir
        if self.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            note = "".join(f"# {line}\n" for line in (self.opts.recipe_note or "").splitlines())
            atomic_write_text(out / "config.yaml", note + dump_config(self.cfg))
        self._print(f"[bold]{self.task.kind}[/bold] {self.cfg.name}: {self.steps_per_epoch} steps/epoch x "
                    f"{recipe.epochs} epochs, batch {recipe.batch_size} x {self.dist.world_size} process(es), "
                    f"device {self.device}{', bf16' if self.amp_dtype else ''}{', compiled' if self.compiled else ''}"
                    f", {escape(self.loader_note)} -> {escape(str(out))}")
        if self.opts.recipe_note:
            self._print(escape(self.opts.recipe_note))

    def _write_metrics(self, row: dict) -> None:
        self.history.append(row)
        if not self.dist.is_main:
            return
        out = self.opts.out_dir
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))
        columns = [k for k in self.history[-1] if not isinstance(self.history[-1][k], (list, dict))]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(out / "metrics.csv", buf.getvalue())

    def _print(self, msg: str) -> None:
        if self.dist.is_main and not self.opts.quiet:
            self.console.print(msg, highlight=False)
