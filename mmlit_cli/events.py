"""TensorBoard event files of a run, when TensorBoard is installed (`pip install
"mmlit[tensorboard]"`); without it `open_event_log` returns None and nothing else changes.

`tensorboard --logdir runs` then shows every run: each epoch's row of metrics.jsonl as
scalars at its epoch (`train_loss` -> `train/loss`, `val_top1` -> `val/top1`,
`lr`, `train/img_per_s`, ...; the router's share per expert as `expert_usage/layer_L/expert_E`),
the epoch's figures as images (a classifier's confusion matrix, an MAE's reconstructions;
they need matplotlib, the `[plot]` extra), the training curves at the end, the config as text.
`mmlit eval` writes its figures and confusion matrix to its own output folder the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import MmlitError, readable

# Row entries that are not figures of the run's progress (the x axis is the epoch).
_NOT_SCALARS = {"epoch", "step", "world_size", "ranks_in_sync"}


def _tag(key: str) -> str:
    """`train_loss` -> `train/loss`: TensorBoard groups its charts by what precedes the '/'."""
    if key == "epoch_time_s":
        return "train/epoch_time_s"
    for prefix in ("train_", "val_", "test_", "all_"):  # all_: eval --split all
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return key


def scalars_of(row: dict[str, Any]) -> dict[str, float]:
    """The scalars a metrics row is logged as, by tag."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in _NOT_SCALARS or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[_tag(key)] = float(value)
        elif key == "expert_usage" and isinstance(value, list):
            for layer, shares in enumerate(value):
                for expert, share in enumerate(shares):
                    out[f"expert_usage/layer_{layer}/expert_{expert}"] = float(share)
    return out


class EventLog:
    """One SummaryWriter on a run directory. Every write is flushed: a run killed between
    epochs loses nothing it has logged."""

    def __init__(self, writer) -> None:
        self.writer = writer
        self.images_unavailable: str | None = None  # why figures are left out (no matplotlib), once known

    def scalars(self, row: dict[str, Any], step: int) -> None:
        for tag, value in scalars_of(row).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def images(self, make_images, step: int) -> None:
        """`make_images()` -> {tag: uint8 [3, H, W]}; skipped for good when it needs matplotlib
        and there is none."""
        from .plots import PlotUnavailable

        if self.images_unavailable is not None:
            return
        try:
            images = make_images()
        except PlotUnavailable as e:
            self.images_unavailable = str(e)
            return
        for tag, image in images.items():
            self.writer.add_image(tag, image, step, dataformats="CHW")
        self.writer.flush()

    def png(self, tag: str, path: Path, step: int) -> None:
        self.images(lambda: {tag: read_png(path)}, step)

    def text(self, tag: str, text: str) -> None:
        # TensorBoard renders text as markdown: four spaces keep the YAML as it is
        # (`readable`: a path with bytes that are not UTF-8 cannot be written into the event file)
        self.writer.add_text(tag, "".join(f"    {line}\n" for line in readable(text).splitlines()), 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        return False
    return True


def open_event_log(run_dir: Path, purge_step: int | None = None) -> EventLog | None:
    """An EventLog writing into `run_dir`, or None without TensorBoard. `purge_step`: what the
    event files there hold at this step or later is hidden from TensorBoard (a resumed run
    passes the epoch after its checkpoint's, so an epoch logged twice shows once)."""
    if not tensorboard_available():
        return None
    from torch.utils.tensorboard import SummaryWriter

    try:
        return EventLog(SummaryWriter(log_dir=str(run_dir), purge_step=purge_step))
    except OSError as exc:
        raise MmlitError(f"cannot write TensorBoard events into {run_dir} ({exc})") from None


def read_png(path: Path) -> torch.Tensor:
    """A PNG file as uint8 [3, H, W]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
