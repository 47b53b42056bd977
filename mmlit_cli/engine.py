"""One training engine for `finetune` (classification) and `pretrain` (MAE).

    fit(): for epoch:
               train_one_epoch(): for batch: forward (bf16 autocast on CUDA) -> backward ->
                   clip (when grad_clip > 0) -> AdamW step (lr: the recipe's blend of
                   one-cycle and linear warm-up then cosine, `optim`) -> EMA
               end of epoch: validate -> metrics.jsonl/.csv -> figures (within a 2 % time
                   budget) -> last/best.safetensors (written on a background thread)

A task (`tasks.py`) says what the model is, what its loss is and how it is validated;
everything else - devices, DDP, checkpoints, resume, signals, logging - lives here once. The
hot loop keeps losses on the device and syncs with the host only when it prints
(`report.py`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from .config import Config, TrainConfig
from .data import DeviceLoader, ImageData, Normalize, build_loaders, resolve_loader, set_epoch
from .errors import MmlitError
from .optim import ModelEMA, build_adamw, param_groups, set_schedule
from .recipe import decay_share, one_cycle_share, peak_lr, warmup_steps
from .report import StopRequest, TrainingProgress, epoch_line, router_warning, run_header, stop_line
from .run_record import RunFacts, RunRecord, diverged
from .runtime import (all_reduce_mean, amp_dtype, choose_attention_layouts, compile_failure, forward_batch,
                      is_compile_failure, maybe_compile, ranks_agree, ranks_in_sync, rng_devices, setup_distributed,
                      wait_for_device, wrap_ddp)
from .train_state import rng_state, set_rng_state


# torch.compile of the s training step on an H200 took ~80 s and saved ~25 ms per step at batch
# 512 (6,562 -> 9,636 img/s, docs/BENCHMARKS.md "GPU: first measurements"): repaid after
# ~3,200 steps. On CPU it brought no gain at these sizes, so it is never on by default there.
COMPILE_PAYS_AFTER_STEPS = 3200


def compile_pays(device: torch.device, total_steps: int) -> bool:
    """Whether `--compile` is on by default: on a CUDA GPU, for runs long enough to repay it."""
    return device.type == "cuda" and total_steps >= COMPILE_PAYS_AFTER_STEPS


def first_compiled_step(step: Callable[[], torch.Tensor], train_eagerly: Callable[[], None], device: torch.device,
                        dist) -> tuple[torch.Tensor, str]:
    """`step()` (forward and backward) at the compiled model's first step, and the note for the
    run ("" when all went well). torch.compile compiles the forward at the first call and the
    backward at the first backward, and that can fail where the model is fine: no C compiler
    (slim containers), a Triton or inductor bug. A single process then calls `train_eagerly()`
    and takes the step again with the RNG rewound: the run is the one `--no-compile` gives.
    Under torchrun one rank cannot take a step again alone (its backward may have joined the
    others' gradient all-reduce), so the run stops, saying what to do. (The RNG rewound is the
    CPU's and CUDA's; on MPS the step taken again draws new numbers.)"""
    rng = rng_state(device)
    try:
        return step(), ""
    except MmlitError:  # the user's to fix (a label out of range...), compiled or not
        raise
    except Exception as e:
        if dist.enabled and is_compile_failure(e):
            raise MmlitError(f"the first training step failed under torch.compile ({compile_failure(e)}); "
                             f"--no-compile runs without it") from e
        if dist.enabled:
            raise
        failure = compile_failure(e)
    # out of the `except` block: the failed step's graph and activations, held by the
    # exception's traceback, are freed before the step is taken again
    set_rng_state(rng, device)
    train_eagerly()
    loss = step()  # an error here is the model's, and is raised as it is
    return loss, f"torch.compile failed at the first step ({failure}): training without it " \
                 f"(--no-compile skips the attempt)"


class StepModel:
    """The model a training step calls: the model under DDP (torchrun) and torch.compile, as the
    run asks (`compile` None: when it pays, `compile_pays`). torch.compile compiles at the first
    step and may fail there; the step then goes on with the model itself (`first_compiled_step`)."""

    def __init__(self, model: torch.nn.Module, dist, device: torch.device, compile: bool | None,
                 mode: str | None, total_steps: int):
        self.model, self.dist, self.device = model, dist, device
        self.compiled = bool(compile or mode) if compile is not None or mode else compile_pays(device, total_steps)
        self.module = maybe_compile(wrap_ddp(model, dist, device), self.compiled, mode)
        self.untried = self.compiled  # torch.compile does its work, and may fail, at the first step

    def run(self, step: Callable[[torch.nn.Module], torch.Tensor]) -> tuple[torch.Tensor, str]:
        """`step(module)` (forward and backward) and a note for the run ("" unless compile failed)."""
        if not self.untried:
            return step(self.module), ""
        self.untried = False
        return first_compiled_step(lambda: step(self.module), self.train_eagerly, self.device, self.dist)

    def train_eagerly(self) -> None:
        self.module, self.compiled = self.model, False


def agreed_loader(recipe: TrainConfig, device: torch.device, dist, train_data: ImageData,
                  val_data: ImageData | None) -> tuple[str, str]:
    """`recipe.loader` resolved for this run (`data.resolve_loader`) and the choice in words;
    under torchrun the ranks agree: each asked its own GPU for room, and one without it makes
    every rank use loader workers."""
    loader, note = resolve_loader(recipe.loader, recipe.workers, device, train_data, val_data)
    if not ranks_agree(int(loader == "device"), dist, device):
        return "workers", f"{recipe.workers} loader workers (the data fits on some processes' devices only)"
    return loader, note


def run_loaders(recipe: TrainConfig, image_size: int, device: torch.device, dist, train_data: ImageData,
                val_data: ImageData | None) -> tuple[TrainConfig, str, object, object | None]:
    """(`recipe` with the loader this run uses, that choice in words, the training loader, the
    validation loader or None): `loader: auto` resolved as the ranks agree (`agreed_loader`)."""
    loader, note = agreed_loader(recipe, device, dist, train_data, val_data)
    recipe = dataclasses.replace(recipe, loader=loader)
    return (recipe, note, *build_loaders(recipe, image_size, train_data, val_data, device, dist.rank,
                                         dist.world_size, dist.enabled))


def epoch_row(epoch: int, step: int, train_loss: float, lr: float, val: dict, epoch_time: float, seen: int,
              world: int) -> dict:
    """An epoch's row of metrics.jsonl (`seen`: the images this process trained on)."""
    return {"epoch": epoch, "step": step, "train_loss": train_loss, "lr": lr, **val,
            "epoch_time_s": round(epoch_time, 3), "train_img_per_s": round(seen * world / max(epoch_time, 1e-9), 1),
            "world_size": world}


def run_attention_layouts(model: torch.nn.Module, cfg: Config, batch_size: int, device: torch.device,
                          amp_dtype: torch.dtype | None, dist, asked: bool | None) -> str:
    """The attention's kernel layouts timed for this run's batch (`runtime.choose_attention_layouts`)
    when `asked`, or, when None, on a CUDA GPU; the note for the run's header ("" when not timed)."""
    if not (asked if asked is not None else device.type == "cuda"):
        return ""
    m = cfg.model
    example = torch.zeros(batch_size, m.in_chans, m.image_size, m.image_size, device=device)
    return choose_attention_layouts(model, example, amp_dtype, dist)


@dataclass
class RunOptions(RunFacts):
    """How to run: the device, compilation, checkpoint cadence, logging (and, from `RunFacts`,
    what the run records about itself)."""

    device: str = "auto"
    compile: bool | None = False  # None: compile when it pays (`compile_pays`)
    compile_mode: str | None = None  # torch.compile mode: None/"default", "reduce-overhead", "max-autotune"
    tune_attention: bool | None = None  # time SDPA's kernel layouts (`runtime.tune_attention`); None: on CUDA
    save_every: int = 200  # steps between in-epoch checkpoints (0 = only at epoch ends)
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests, benchmarks)
    log_every: int = 10
    quiet: bool = False


def epoch_batches(loader, done: int, progress: TrainingProgress):
    """(enumerated batches of an epoch, how many of them to skip) when `done` of its steps are
    done already (a resumed run). A DeviceLoader starts at the next batch; a DataLoader replays
    the epoch's order and the loop skips the batches already done."""
    if isinstance(loader, DeviceLoader):
        for _ in range(done):
            progress.skip()
        return enumerate(loader.batches(done), start=done), 0
    return enumerate(loader), done


def epoch_notes(task, model: torch.nn.Module, loader, device: torch.device, out_dir: Path, row: dict,
                figures: bool = True) -> list[str]:
    """What follows an epoch's line (rich markup): the router warning, and, when `figures`, the
    task's own end-of-epoch figure (MAE's reconstructions), drawn without moving the training
    RNG stream."""
    note = None
    if figures:
        with torch.random.fork_rng(devices=rng_devices(device)):
            note = task.after_epoch(model, loader, device, out_dir)
    return [n for n in (router_warning(row.get("expert_usage")), note and escape(note)) if n]


class FigureBudget:
    """Whether an epoch's figures (TensorBoard's confusion matrix, MAE's reconstructions) are
    drawn. Drawing one takes a few hundred ms of matplotlib on the host, and the training waits
    meanwhile: on a GPU, where an epoch of CIFAR can take two seconds, every epoch's figure
    would cost the run a tenth of its time. So they are drawn while all the drawing so far has
    cost at most `share` of the run's wall time: every epoch of a run whose epochs are long,
    every few epochs of a fast one; the first epoch of each process and the run's last always
    (the recipe's last epoch, an early stop, or a stop at an epoch's end)."""

    def __init__(self, share: float = 0.02, clock=time.perf_counter):
        self.share, self.clock, self.spent = share, clock, 0.0
        self.start = clock()

    def due(self) -> bool:
        return self.spent <= self.share * (self.clock() - self.start)

    def charge(self, seconds: float) -> None:
        self.spent += seconds


class EpochFigures:
    """The end of an epoch's figures and notes: MAE's reconstruction.png (with its note under the
    epoch's line), the figure TensorBoard shows for the epoch (the confusion matrix, the
    reconstructions), drawn when `forced` or within the `FigureBudget`; the router warning always."""

    def __init__(self, task, record: RunRecord, device: torch.device):
        self.task, self.record, self.device = task, record, device
        self.budget = FigureBudget()

    def draw(self, model: torch.nn.Module, loader, row: dict, forced: bool) -> list[str]:
        figures, start = forced or self.budget.due(), self.budget.clock()
        out, events = self.record.facts.out_dir, self.record.events
        main = self.record.dist.is_main
        notes = epoch_notes(self.task, model, loader, self.device, out, row, figures) if main else []
        if figures and events is not None:
            events.images(lambda: self.task.epoch_images(out), self.record.epoch)
        if figures:
            self.budget.charge(self.budget.clock() - start)
        return notes


class Divergence:
    """The non-finite loss a run stops on (this rank's, if it saw one: under torchrun another
    rank's may stop it), and where: in a training step, or in validation (finite weights whose
    outputs are not); the error the run ends with says which."""

    def __init__(self):
        self.loss: float | None = None
        self.in_validation = False

    def saw(self, loss: float, in_validation: bool = False) -> None:
        self.loss, self.in_validation = loss, in_validation

    def error(self, epochs_done: int, step: int, out: Path, command: str) -> MmlitError:
        where = (f"the validation loss became {self.loss} after epoch {epochs_done + 1} (step {step}), its "
                 f"weights diverged" if self.in_validation else f"the loss became {self.loss or 'nan'} at step {step}")
        last = out / "last.safetensors"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved"
        return MmlitError(f"{where}; stopped, {kept} (try a lower --lr or --set {command}.grad_clip=1.0)")


class Trainer:
    """The epoch/step loop. Where the run stands and what it writes (config.yaml, metrics,
    checkpoints, --resume) is its `record` (`run_record.RunRecord`)."""

    def __init__(self, task, cfg: Config, train_data: ImageData, val_data: ImageData | None, opts: RunOptions,
                 console: Console | None = None):
        self.task, self.opts = task, opts
        self.console = console or Console()
        self.dist, self.device = setup_distributed(opts.device)
        self.amp_dtype = amp_dtype(self.device)
        torch.manual_seed(task.recipe.seed + self.dist.rank)

        self.model = task.model.to(self.device)
        self.normalize = Normalize(cfg.data.mean, cfg.data.std, self.device)  # made once: no per-step copies
        # the config records what `loader: auto` chose, so a resumed run replays the same batches
        self.recipe, self.loader_note, self.train_loader, self.val_loader = run_loaders(
            task.recipe, cfg.model.image_size, self.device, self.dist, train_data, val_data)
        self.cfg = dataclasses.replace(cfg, **{task.command: self.recipe})
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise MmlitError("the training split is empty")
        self.total_steps = self.steps_per_epoch * self.recipe.epochs
        self.warmup_steps = warmup_steps(self.recipe, self.steps_per_epoch)
        # before the model is compiled, wrapped or copied for EMA
        self.attention_note = run_attention_layouts(self.model, cfg, self.recipe.batch_size, self.device,
                                                    self.amp_dtype, self.dist, opts.tune_attention)

        self.peak_lr = peak_lr(self.recipe, self.dist.world_size)
        groups = param_groups(self.model, self.recipe.weight_decay, opts.layer_decay, decay_share(self.recipe))
        self.optimizer = build_adamw(groups, self.peak_lr, self.recipe.betas, self.device)
        self.ema = ModelEMA(self.model, self.recipe.ema_decay) if self.recipe.ema else None
        self.step_model = StepModel(self.model, self.dist, self.device, opts.compile, opts.compile_mode,
                                    self.total_steps)
        self.record = RunRecord(opts, self.cfg, task, self.model, self.optimizer, self.ema, self.dist, self.device)
        self.stop = StopRequest()
        self.progress = TrainingProgress(self.console, self.device, opts.log_every, self.dist.world_size,
                                         disable=not self.dist.is_main or opts.quiet)
        self.divergence = Divergence()
        self.figures = EpochFigures(task, self.record, self.device)

    # what the step calls, compiled or not (`compiled`: the header; all three: the tests)
    train_model = property(lambda self: self.step_model.module)
    compiled = property(lambda self: self.step_model.compiled)
    compile_untried = property(lambda self: self.step_model.untried)
    # the record's counters, read by the loop (and by callers: `run_training`, tests)
    epoch = property(lambda self: self.record.epoch)
    global_step = property(lambda self: self.record.global_step)
    step_in_epoch = property(lambda self: self.record.step_in_epoch)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to the last epoch or a stop: Ctrl-C, SIGTERM or `max_steps` (a resumable checkpoint
        is saved), `--patience`, or a non-finite loss (an error; the last good checkpoint stays)."""
        with self.stop, self.record.writer:  # leaving it waits for the checkpoints being written
            self.record.start()
            self._print_start()
            stopped = "patience" if self.record.early_stop else None  # a resumed run that had stopped early
            with self.progress:
                while self.epoch < self.recipe.epochs and stopped is None:
                    stopped = self._run_epoch()
            return self._finish(stopped)

    def _run_epoch(self) -> str | None:
        """An epoch (what is left of it, after a resume) and its end-of-epoch work; returns why
        the run stops ("nan", "interrupt", "max_steps", "patience"), or None to go on."""
        start = time.perf_counter()
        loss_sum, seen, stopped = self.train_one_epoch()
        if stopped == "nan":
            return stopped
        if stopped is not None and self.step_in_epoch < self.steps_per_epoch:  # stopped within the epoch
            return stopped if self.record.save_within_epoch(loss_sum) else "nan"
        return self._end_epoch(loss_sum, seen, time.perf_counter() - start, final=stopped is not None) or stopped

    def train_one_epoch(self) -> tuple[torch.Tensor, int, str | None]:
        """The steps of one epoch: (the epoch's loss sum on the device, images seen, why it
        stopped early or None)."""
        set_epoch(self.train_loader, self.epoch)
        self.record.restart_clock()
        self.progress.start_epoch(self.epoch, self.recipe.epochs, self.steps_per_epoch)
        batches, skip = epoch_batches(self.train_loader, self.step_in_epoch, self.progress)
        # a resumed epoch starts from its checkpoint's loss sum: train_loss as in an uninterrupted run
        loss_sum = torch.full((), self.record.take_resume_loss_sum(), device=self.device)
        seen, stopped = 0, None
        if skip == 0:  # resumed at an epoch boundary, or at the batch a DeviceLoader starts from
            self.record.restore_rng()
        for i, (images, labels) in batches:
            if i < skip:
                if i == skip - 1:  # where the RNG was saved: after batch skip-1, before batch skip is drawn
                    self.record.restore_rng()
                self.progress.skip()
                continue
            loss = self._train_step(images, labels)
            loss_sum += loss
            seen += images.shape[0]
            stopped = self._after_step(loss, images.shape[0], loss_sum)
            if stopped is not None:
                break
        self.progress.end_epoch()
        wait_for_device(self.device)  # a GPU runs behind the host: the epoch ends when its last step has run
        self.record.bank_elapsed()
        return loss_sum, seen, stopped

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch of uint8 images; returns its loss, on the device."""
        r = self.recipe
        set_schedule(self.optimizer, one_cycle_share(r), self.global_step, self.total_steps, self.warmup_steps,
                     self.peak_lr, r.min_lr, r.betas)
        labels = labels.to(self.device, non_blocking=True)
        loss = self._loss_and_grads(images, labels)
        if self.recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.record.global_step += 1
        self.record.step_in_epoch += 1
        return loss.detach()

    def _loss_and_grads(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's loss; its gradients in the parameters' `.grad`."""
        def step(model: torch.nn.Module) -> torch.Tensor:
            loss = forward_batch(lambda x: self.task.loss(model, x, labels), images, self.normalize, self.device,
                                 self.amp_dtype)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            return loss

        loss, note = self.step_model.run(step)
        self._print(escape(note))
        return loss

    def _after_step(self, loss: torch.Tensor, batch_size: int, loss_sum: torch.Tensor) -> str | None:
        """The progress bar (and the NaN check on the loss it reads), the stops and the in-epoch
        checkpoints after a step; returns why to stop, or None."""
        at_end = self.step_in_epoch == self.steps_per_epoch
        shown = self.progress.step(loss, batch_size, self.optimizer.param_groups[-1]["lr"],
                                   flush=at_end or self.stop.requested)
        if shown is not None and not math.isfinite(shown):
            self.divergence.saw(shown)
        # under torchrun the ranks ask each other, at the same steps (a sync), whether any one's
        # loss diverged or was signalled: they stop together, or one would wait for the rest
        stop = self.stop.agreed(self.dist, self.device, at_end or self.global_step % self.opts.log_every == 0,
                                diverged=self.divergence.loss is not None)
        if stop is not None or (self.opts.max_steps is not None and self.global_step >= self.opts.max_steps):
            return stop or "max_steps"
        if self.opts.save_every and self.global_step % self.opts.save_every == 0 and not at_end:
            if not self.record.save_within_epoch(loss_sum):
                return "nan"
        return None

    def _end_epoch(self, loss_sum: torch.Tensor, seen: int, epoch_time: float, final: bool = False) -> str | None:
        """Validate, log and save after the last step of an epoch (`final`: the run stops
        after it, as it does after the recipe's last epoch); "nan" (and nothing saved) when the
        epoch's loss or the weights are not finite."""
        train_loss = all_reduce_mean(loss_sum / max(self.step_in_epoch, 1), self.dist).item()
        if diverged(train_loss, self.model):
            return "nan"
        record = self.record
        record.partial_loss_sum = 0.0
        model = self.model if self.ema is None else self.ema.module  # scored: the EMA when there is one
        val = {} if self.val_loader is None else self.task.validate(model, self.val_loader, self.device, self.amp_dtype)
        if not math.isfinite(val.get("val_loss", 0.0)):  # finite weights whose outputs are not: diverged too
            self.divergence.saw(val["val_loss"], in_validation=True)
            return "nan"
        record.epoch, record.step_in_epoch, world = record.epoch + 1, 0, self.dist.world_size
        row = epoch_row(self.epoch, self.global_step, train_loss, self.optimizer.param_groups[-1]["lr"], val,
                        epoch_time, seen, world)
        if self.dist.enabled:
            row["ranks_in_sync"] = ranks_in_sync(self.model, self.dist)
        improved = record.close_epoch(row, train_loss, self.recipe.patience, last=self.epoch >= self.recipe.epochs)
        notes = self.figures.draw(self.model, self.val_loader or self.train_loader, row,
                                  forced=final or self.epoch >= self.recipe.epochs or record.early_stop is not None)
        record.save_epoch(row, improved)
        for line in (epoch_line(row, self.recipe.epochs), *notes):
            self._print(line)
        return "patience" if record.early_stop else None

    def _finish(self, stopped: str | None) -> dict:
        out = self.opts.out_dir
        self.record.writer.wait()  # what follows says the checkpoints are there
        if stopped == "nan":
            self.record.close_events()
            raise self.divergence.error(self.epoch, self.global_step, out, self.task.command)
        self._print(stop_line(stopped, self.epoch, self.record.early_stop, self.record.best_epoch, self.stop.signal,
                              out, self.opts.save_best))
        return {"stopped": stopped, "signal": self.stop.signal, "epoch": self.epoch, "global_step": self.global_step,
                "history": self.record.history, "best": self.record.best, "best_saved": self.opts.save_best}

    # ------------------------------------------------------------------ printing

    def _print_start(self) -> None:  # the run in a line (more with the attention's layout and the recipe)
        self._print(run_header(self.task.kind, self.cfg.name, self.steps_per_epoch, self.recipe.epochs,
                               self.recipe.batch_size, self.dist.world_size, self.device, self.amp_dtype is not None,
                               self.compiled, self.loader_note, self.opts.out_dir,
                               (self.attention_note, self.record.recipe_note)))

    def _print(self, msg: str | None) -> None:
        if msg and self.dist.is_main and not self.opts.quiet:  # (an empty line or None: nothing to say)
            self.console.print(msg, highlight=False)
