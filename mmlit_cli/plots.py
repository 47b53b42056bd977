"""Figures of a run: training curves, a confusion matrix, an MAE's reconstructions (PNG).

The curves and the confusion matrix need matplotlib, an optional extra (`pip install
"mmlit[plot]"`); without it those functions raise `PlotUnavailable`, which a caller can
catch once and mention. They are drawn on matplotlib's non-interactive Agg canvas through
the object API (no `pyplot`, no change to the process-wide backend, no window). The
reconstructions are a torchvision image grid. Every figure is written atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .errors import MmlitError, one_line
from .files import atomic_write

if TYPE_CHECKING:
    from .config import Config

ANNOTATE_MAX = 20  # up to this many classes: class names on both axes and a number per cell
NAMES_MAX = 40  # up to this many: class names on the axes, no numbers in the cells
_DPI = 120


class PlotUnavailable(MmlitError):
    """matplotlib is not installed: plots cannot be drawn."""


def _new_figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable('plots need matplotlib: pip install "mmlit[plot]"') from None
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@contextlib.contextmanager
def _missing_glyphs_unsaid():
    """A class named in a script the font lacks (CJK in DejaVu Sans) is drawn as boxes;
    matplotlib's warning for each glyph, with its source line, would fill the run's output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        yield


def _save(fig: Any, path: Path) -> Path:
    def draw(tmp):
        with _missing_glyphs_unsaid():
            fig.savefig(tmp, format="png", dpi=_DPI)

    try:
        atomic_write(path, draw)
    except OSError as exc:
        raise MmlitError(f"cannot write {path} ({one_line(exc, with_type=False)})") from None
    return path


def _read_history(path: Path) -> list[dict]:
    """Rows of metrics.jsonl, one per epoch (the last row wins for a repeated epoch)."""
    rows: dict[int, dict] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise MmlitError(f"cannot read {path} ({one_line(exc, with_type=False)})") from None
    for line in lines:  # a line that is not a row (a torn write, stray bytes) is left out, as a plot can
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        epoch = row.get("epoch") if isinstance(row, dict) else None
        if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) and math.isfinite(epoch):
            rows[int(epoch)] = row
    return [rows[e] for e in sorted(rows)]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["epoch"]))
            ys.append(float(v))
    return xs, ys


def plot_curves(run_dir: str | Path) -> Path | None:
    """`<run_dir>/curves.png` from `<run_dir>/metrics.jsonl`: train/val loss per epoch and,
    when the run has them (classification), val top-1/top-5 accuracy per epoch.

    Returns the PNG path, or None when the run has no finished epoch yet (no metrics.jsonl,
    or no row with a loss). Raises `PlotUnavailable` without matplotlib.
    """
    if not str(run_dir).strip():
        raise MmlitError("no run folder given: plot takes a run's folder (the one holding metrics.jsonl)")
    run_dir = Path(run_dir).expanduser()
    if run_dir.is_file() and run_dir.name == "metrics.jsonl":
        run_dir = run_dir.parent
    if run_dir.is_file():
        raise MmlitError(f"{run_dir} is a file: plot takes a run's folder (the one holding metrics.jsonl), "
                         f"here {run_dir.parent}")
    if not run_dir.is_dir():
        raise MmlitError(f"run directory {run_dir} does not exist")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = _read_history(metrics)
    losses = {k: _series(rows, k) for k in ("train_loss", "val_loss")}
    accs = {k: _series(rows, k) for k in ("val_top1", "val_top5")}
    losses = {k: v for k, v in losses.items() if v[0]}
    accs = {k: v for k, v in accs.items() if v[0]}
    if not losses and not accs:
        return None

    panels = [p for p in (losses, accs) if p]
    fig = _new_figure(5.0 * len(panels) + 0.5, 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    names = {"train_loss": "train loss", "val_loss": "val loss", "val_top1": "val top-1",
             "val_top5": "val top-5"}
    last_epoch = max(int(r["epoch"]) for r in rows)
    for ax, panel, ylabel in zip(axes, panels, ["loss" if losses else "accuracy (%)", "accuracy (%)"]):
        for key, (xs, ys) in panel.items():
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=names[key])
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
        if last_epoch == 1:  # one epoch: one tick (the integer locator falls back to 0.6, 0.8, ...)
            ax.set_xlim(0.5, 1.5)
            ax.set_xticks([1])
    if accs:
        ax = axes[-1]
        xs, ys = accs.get("val_top1", next(iter(accs.values())))
        best = max(range(len(ys)), key=ys.__getitem__)
        ax.set_title(f"best {names['val_top1'] if 'val_top1' in accs else 'accuracy'}: "
                     f"{ys[best]:.2f}% (epoch {xs[best]})", fontsize=10)
    if losses:
        axes[0].set_title("loss per epoch", fontsize=10)
    fig.suptitle(f"{run_dir.resolve().name}: {len(rows)} epoch{'s' if len(rows) != 1 else ''}")
    return _save(fig, run_dir / "curves.png")


def _short(name: str, n: int = 18) -> str:
    """Long names keep their start and their end (`class_wi…_name_12`): ends often differ."""
    if len(name) <= n:
        return name
    head = (n - 1) // 2
    return name[:head] + "…" + name[len(name) - (n - 1 - head):]


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], out_path: str | Path) -> Path:
    """Write a row-normalised confusion matrix (rows = true class, columns = predicted) as PNG.

    Up to 20 classes every cell shows its percentage and both axes carry the class names;
    beyond that it is a plain heat map (names on the axes up to 40 classes, indices above).
    The title gives the overall accuracy. `out_path` may be a folder (-> `confusion.png`
    inside it). Returns the written path; raises `PlotUnavailable` without matplotlib.
    """
    out = Path(out_path)
    if out.is_dir():
        out = out / "confusion.png"
    return _save(_confusion_figure(confusion, classes), out)


def confusion_image(confusion: torch.Tensor, classes: Sequence[str]) -> torch.Tensor:
    """`plot_confusion`'s figure as a uint8 [3, H, W] image (for TensorBoard), no file."""
    fig = _confusion_figure(confusion, classes)
    with _missing_glyphs_unsaid():
        fig.canvas.draw()
    rgba = torch.frombuffer(bytearray(fig.canvas.buffer_rgba()), dtype=torch.uint8)
    width, height = fig.canvas.get_width_height()
    return rgba.view(height, width, 4)[..., :3].permute(2, 0, 1).contiguous()


def _confusion_figure(confusion: torch.Tensor, classes: Sequence[str]) -> Any:
    cm = torch.as_tensor(confusion).detach().cpu().to(torch.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise MmlitError(f"a confusion matrix must be square [C, C], got {list(cm.shape)}")
    C = cm.shape[0]
    names = [str(c) for c in classes] if classes else [str(i) for i in range(C)]
    if len(names) != C:
        raise MmlitError(f"{len(names)} class names for a {C}x{C} confusion matrix")
    total = float(cm.sum())
    accuracy = 100.0 * float(cm.diag().sum()) / total if total > 0 else 0.0
    rows = cm / cm.sum(1, keepdim=True).clamp_min(1)

    annotate = C <= ANNOTATE_MAX
    side = (max(4.5, 0.45 * C + 2.5) if annotate else min(14.0, max(7.0, 0.14 * C + 3.0)))
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(100.0 * rows.numpy(), cmap="Blues", vmin=0.0, vmax=100.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="% of the true class")
    named = C <= NAMES_MAX
    ax.set_xlabel("predicted class" if named else "predicted class (index)")
    ax.set_ylabel("true class" if named else "true class (index)")
    ax.set_title(f"Confusion matrix (% of each true class)\noverall accuracy {accuracy:.2f}% "
                 f"on {int(total)} images, {C} classes", fontsize=11)
    if named:
        font = 9 if annotate else 6
        ax.set_xticks(range(C), [_short(n) for n in names], rotation=45, ha="right",
                      rotation_mode="anchor", fontsize=font)
        ax.set_yticks(range(C), [_short(n) for n in names], fontsize=font)
    if annotate:
        for i in range(C):
            for j in range(C):
                v = float(rows[i, j])
                if cm[i, j] == 0:
                    continue
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v > 0.55 else "black")
    return fig


@torch.no_grad()
def plot_reconstruction(mae: torch.nn.Module, images: torch.Tensor, cfg: Config, device: torch.device,
                        out_path: str | Path) -> Path:
    """Rows of original, masked input and reconstruction for a few uint8 `images`, scaled up
    4x (an MAE run's reconstruction.png). The masks come from seed 0 in a forked generator, so
    the run's own random stream is untouched."""
    from torchvision.utils import make_grid, save_image

    from .data import normalize
    from .mae import unpatchify
    from .runtime import rng_devices

    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    was_training = mae.training
    mae.eval()
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(0)
        x = normalize(images.to(device), cfg.data.mean, cfg.data.std)
        _, pred, mask = mae(x)
    mae.train(was_training)
    x, pred, mask = x.float().cpu(), pred.float().cpu(), mask.cpu()
    recon = mae.reconstruct(x, pred)
    P, C = cfg.model.patch_size, cfg.model.in_chans
    patch_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, P * P * C), P, C)  # 1 = hidden
    masked = x * (1 - patch_mask) + patch_mask * ((0.5 - mean) / std)  # hidden patches shown grey
    pasted = x * (1 - patch_mask) + recon * patch_mask  # visible patches kept, hidden ones predicted
    rows = [t * std + mean for t in (x, masked, pasted)]
    grid = make_grid(torch.cat(rows).clamp(0, 1), nrow=len(x), padding=1, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid.unsqueeze(0), scale_factor=4, mode="nearest")[0]
    path = Path(out_path)
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
    return path
