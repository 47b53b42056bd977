"""What a training run shows while it runs, and how it is asked to stop.

* `TrainingProgress`: one progress bar per epoch with the mean loss of the last logging
  window, read lagged (`LaggedScalar`) so the hot loop never waits for the GPU.
* `StopRequest`: Ctrl-C asks the run to stop after the current step.
* `epoch_line`, `router_warning`: the lines printed at the end of an epoch.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .metrics import collapsed_layers
from .runtime import agreed_stop


class LaggedScalar:
    """The loss shown on the progress bar, read without stalling the GPU.

    On CUDA the value of a logging window is copied to pinned host memory without blocking
    and read at the next window, when the copy has long finished: the hot loop never waits
    for the device. On CPU there is nothing to wait for and the value is read at once.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: tuple[torch.Tensor, Any] | None = None

    def exchange(self, value: torch.Tensor) -> float | None:
        """Hand over this window's value; get the newest value that is ready (None at first)."""
        if self.device.type != "cuda":
            return value.item()
        ready = None
        if self.pending is not None:
            host, event = self.pending
            event.synchronize()  # recorded a whole window ago: already complete in practice
            ready = host.item()
        host = torch.empty((), dtype=value.dtype, pin_memory=True)
        host.copy_(value.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))  # the copy's stream (cuda:N's, not cuda:0's)
        self.pending = (host, event)
        return ready


class TrainingProgress:
    """The progress bar of a run: one bar per epoch, with the mean loss of the last logging
    window (`log_every` steps, lagged: see `LaggedScalar`), the lr and the images per second."""

    def __init__(self, console: Console, device: torch.device, log_every: int, world_size: int,
                 disable: bool = False):
        self.device, self.log_every, self.world_size = device, log_every, world_size
        self.progress = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
                                 TimeRemainingColumn(), console=console, transient=True, disable=disable)

    def __enter__(self) -> TrainingProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.bar = self.progress.add_task("train", total=steps, epoch=f"{epoch + 1}/{epochs}", loss="-", lr="-",
                                          ips="-")
        self.shown_loss = LaggedScalar(self.device)
        self._new_window(time.perf_counter())

    def _new_window(self, now: float) -> None:
        self.window_loss = torch.zeros((), device=self.device)
        self.window_n, self.window_start = 0, now

    def skip(self) -> None:
        """A step done before the run was resumed."""
        self.progress.advance(self.bar)

    def step(self, loss: torch.Tensor, batch_size: int, lr: float, flush: bool = False) -> float | None:
        """Count a step. At the end of a logging window (or when `flush`), show the window and
        return its mean loss: lagged (the window before's on CUDA), None when none is ready."""
        self.window_loss += loss
        self.window_n += 1
        self.progress.advance(self.bar)
        if self.window_n < self.log_every and not flush:
            return None
        mean_loss = self.shown_loss.exchange(self.window_loss / self.window_n)
        now = time.perf_counter()
        ips = self.window_n * batch_size * self.world_size / max(now - self.window_start, 1e-9)
        self.progress.update(self.bar, loss=f"{mean_loss:.4f}" if mean_loss is not None else "-",
                             ips=f"{ips:,.0f}", lr=f"{lr:.2e}")
        self._new_window(now)
        return mean_loss

    def end_epoch(self) -> None:
        self.progress.remove_task(self.bar)


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C while a run was stopping: it gave up at once, without saving."""


class RunInterrupted(KeyboardInterrupt):
    """A run that Ctrl-C or SIGTERM stopped, once its resumable checkpoint is saved: what
    `run_training` raises then, so that a script or a sweep stops as Ctrl-C stops it anywhere else
    (a library that returned would start the sweep's next run). `result`: the run's summary, as
    `run_training` returns it; `signal`: the signal's number."""

    def __init__(self, result: dict) -> None:
        self.result, self.signal = result, int(result["signal"])
        super().__init__(f"{signal.Signals(self.signal).name}: the run stopped after saving a resumable checkpoint "
                         f"(continue with --resume {result['out_dir']})")


class StopRequest:
    """Within its `with` block, Ctrl-C (SIGINT) or SIGTERM (what schedulers, Kubernetes and
    preemption send before they kill) sets `signal`: the run stops after the current step and
    saves a resumable checkpoint. A second Ctrl-C gives up at once (KeyboardInterrupt); a
    repeated SIGTERM does not (torchrun's agent forwards the one its group already got, and
    the save must finish). Signals reach the main thread only: elsewhere nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal = 0  # the signal number that asked to stop; 0: none
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal != 0

    def agreed(self, dist, device, now: bool, diverged: bool = False) -> str | None:
        """Why every rank stops here: "nan" when any rank's loss `diverged`, "interrupt" when
        any was signalled; None to go on. Under torchrun the ranks ask each other only when
        `now` (a collective, so every rank passes the same `now` at the same step): what
        reached one rank stops them all at that step. Alone: at every call."""
        if dist.enabled and not now:
            return None
        self.signal, diverged = agreed_stop(self.signal, diverged, dist, device)
        return "nan" if diverged else "interrupt" if self.requested else None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT:  # the second Ctrl-C: give up at once
                raise SecondInterrupt
            return
        self.signal = signum

    def __enter__(self) -> StopRequest:
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not in the main thread
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def run_header(kind: str, name: str, steps_per_epoch: int, epochs: int, batch_size: int, world_size: int,
               device, bf16: bool, compiled: bool, loader_note: str, out_dir, notes: tuple = ()) -> str:
    """The first line of a run (rich markup), then a line for each of `notes` (plain text; an
    empty or None note has none)."""
    plural = "" if epochs == 1 else "s"
    header = (f"[bold]{kind}[/bold] {escape(name)}: {steps_per_epoch} steps/epoch x {epochs} epoch{plural}, "
              f"batch {batch_size} x {world_size} process(es), device {device}{', bf16' if bf16 else ''}{', compiled' if compiled else ''}"
              f", {escape(loader_note)} -> {escape(str(out_dir))}")
    return "\n".join([header, *(escape(note) for note in notes if note)])


def as_started(recipe_note: str | None) -> str | None:
    """A resumed run's recipe line: the one fitted at the run's start (the notes printed before
    it say what the resume changed), not a recipe fitted now."""
    return recipe_note and "\n".join(f"as the run started: {line.strip()}" for line in recipe_note.splitlines())


def stop_line(stopped: str | None, epoch: int, early_stop: str | None, best_epoch: int | None, signum: int | None,
              out_dir, best_saved: bool = True) -> str | None:
    """What a run that stopped before its last epoch says last (rich markup): an early stop, an
    interrupt with how to continue; None otherwise. `best_saved`: the run keeps a best.safetensors
    (not with --val test)."""
    if stopped == "patience":
        best = f" (best.safetensors is epoch {best_epoch})" if best_saved else ""
        return f"stopped early after epoch {epoch}: {escape(early_stop)}; the run is finished{best}"
    if stopped == "interrupt":
        return (f"[yellow]interrupted[/yellow] ({signal.Signals(signum).name}): saved a resumable checkpoint; "
                f"continue with --resume {escape(str(out_dir))} (or the same command with that --out)")
    return None


def epoch_line(row: dict, epochs: int) -> str:
    """An epoch's row of metrics.jsonl as the line printed for it."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"train loss {row['train_loss']:.4f}"]
    if "val_top1" in row:
        parts += [f"val loss {row['val_loss']:.4f}", f"top-1 {row['val_top1']:.2f}%", f"top-5 {row['val_top5']:.2f}%"]
    elif "val_loss" in row:
        parts.append(f"val loss {row['val_loss']:.4f}")
    parts += [f"{row['train_img_per_s']:,.0f} img/s", f"{row['epoch_time_s']:.1f}s"]
    return "  ".join(parts)


def router_warning(usage: list[list[float]] | None) -> str | None:
    """A warning when an expert gets almost no tokens in some layer (router collapse)."""
    bad = collapsed_layers(usage) if usage else []
    if not bad:
        return None
    worst = ", ".join(f"layer {i}: " + "/".join(f"{s:.2f}" for s in usage[i]) for i in bad[:3])
    return (f"[yellow]router collapse[/yellow]: an expert gets < 1% of tokens in {len(bad)} layer(s) "
            f"({worst}); consider --set model.aux_loss_weight=0.01")
