"""`finetune` and `pretrain` as library functions: resolve the config, the data and the run
directory, then hand everything to the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from .checkpoint import atomic_write, load_checkpoint, load_weights_into
from .config import Config, load_config
from .data import ImageData, load_split
from .engine import (ClassifyTask, MAETask, RunOptions, Trainer, check_compile_mode, check_resume_world_size,
                     end_distributed, layer_decay_of_run, resolve_device)
from .errors import MmlitError


VALIDATION = ("auto", "test")


@dataclasses.dataclass
class DataSpec:
    """Everything needed to load the same data again (stored in the checkpoint for --resume).

    `validation`: "auto" validates (and picks best.safetensors) on the official validation
    split, else on a part held out of the training split; "test" is the paper protocol: train
    on the whole training split, validate on the test split, keep no best.safetensors.
    """

    dataset: str
    data_dir: str | None = None
    download: bool = False
    validation: str = "auto"

    @property
    def val_split(self) -> str:
        return "test" if self.validation == "test" else "val"

    def load(self, split: str, cfg: Config, require_labels: bool = True) -> ImageData:
        return load_split(self.dataset, split, cfg.model.image_size, data_dir=self.data_dir,
                          download=self.download, val_fraction=cfg.data.val_fraction,
                          require_labels=require_labels, holdout=self.validation == "auto")


def new_run_dir(out: str | Path | None, kind: str, name: str) -> Path:
    """`--out DIR` must not hold files already; without it, `runs/<kind>/<name>`, `<name>2`, ..."""
    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise MmlitError(f"output directory {path} already exists and is not empty: choose another --out, "
                             f"or continue that run with --resume {path}")
        return path
    base = Path("runs") / kind
    for i in range(1, 10_000):
        path = base / (name if i == 1 else f"{name}{i}")
        if not path.exists():
            return path
    raise MmlitError(f"too many runs in {base}")


def _apply_shortcuts(cfg: Config, section: str, **values: Any) -> Config:
    recipe = getattr(cfg, section)
    changes = {k: v for k, v in values.items() if v is not None}
    recipe = dataclasses.replace(recipe, **changes)
    cfg = dataclasses.replace(cfg, **{section: recipe})
    return cfg.validate()


def _check_writable(path: Path) -> None:
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    probe = parent / ".mmlit-write-test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise MmlitError(f"cannot write to {parent}: {e.strerror}") from None


def _warn_skipped(console: Console, data: ImageData) -> None:
    if data.skipped:
        shown = ", ".join(data.skipped[:3]) + (" ..." if len(data.skipped) > 3 else "")
        console.print(f"[yellow]warning[/yellow]: skipped {len(data.skipped)} unreadable image(s): {escape(shown)}",
                      highlight=False)


def run_training(kind: str, preset: str | None, dataset: str | None, *, data_dir: str | None = None,
                 out: str | Path | None = None, overrides: list[str] | None = None,
                 epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 seed: int | None = None, workers: int | None = None, device: str = "auto",
                 init: str | Path | None = None, resume: str | Path | None = None, compile: bool = False,
                 compile_mode: str | None = None,
                 save_every: int = 200, download: bool = False, max_steps: int | None = None,
                 validation: str | None = None, console: Console | None = None, quiet: bool = False) -> dict:
    """Train (`kind` = "finetune" or "pretrain"); returns the engine's summary. `validation`:
    see `DataSpec` ("auto" when None; a resumed run keeps its own)."""
    console = console or Console()
    section = "finetune" if kind == "finetune" else "pretrain"
    task_cls = ClassifyTask if kind == "finetune" else MAETask
    shortcuts = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, workers=workers)

    resolve_device(device)  # a missing GPU is reported before any data is read
    check_compile_mode(compile_mode)
    if validation is not None and validation not in VALIDATION:
        raise MmlitError(f"--val must be {' or '.join(VALIDATION)}, got '{validation}'")
    resume_ckpt = None
    if resume is not None:
        run_dir = Path(resume)
        last = run_dir / "last.safetensors"
        if not last.is_file():
            raise MmlitError(f"nothing to resume in {run_dir}: no last.safetensors")
        resume_ckpt = load_checkpoint(last, with_train_state=True)
        if resume_ckpt.train_info is None:
            raise MmlitError(f"{last} holds no training state (it is not a run's last checkpoint)")
        expected_task = "classify" if kind == "finetune" else "mae"
        if resume_ckpt.task != expected_task:
            raise MmlitError(f"{run_dir} is a {resume_ckpt.task} run; resume it with the matching command")
        check_resume_world_size(int(resume_ckpt.train_info.get("world_size", 1)))
        cfg = resume_ckpt.config
        if preset is not None and load_config(preset).name != cfg.name:
            raise MmlitError(f"{run_dir} was trained with preset '{cfg.name}', not '{preset}'")
        if overrides:
            raise MmlitError("--set cannot change a run being resumed; its config is in the checkpoint")
        cfg = _apply_shortcuts(cfg, section, epochs=epochs, workers=workers)
        spec = DataSpec(**resume_ckpt.train_info["dataset"])
        if dataset is not None and dataset != spec.dataset:
            raise MmlitError(f"{run_dir} was trained on '{spec.dataset}', not '{dataset}'")
        if validation is not None and validation != spec.validation:
            raise MmlitError(f"{run_dir} was trained with --val {spec.validation}; a resumed run keeps it")
    else:
        if dataset is None:
            raise MmlitError("--dataset is required (a dataset name or an image folder)")
        cfg = _apply_shortcuts(load_config(preset or "xs", overrides), section, **shortcuts)
        spec = DataSpec(dataset, data_dir, download, validation or "auto")
        run_dir = new_run_dir(out, kind, cfg.name)
        _check_writable(run_dir)

    require_labels = kind == "finetune"
    train = spec.load("train", cfg, require_labels)
    _warn_skipped(console, train)
    try:
        val = spec.load(spec.val_split, cfg, require_labels)
        _warn_skipped(console, val)
    except MmlitError as e:
        if spec.validation == "test":
            raise MmlitError(f"{e} (--val test validates on the test split; without --val a validation part is "
                             f"held out of train)") from None
        if require_labels:
            raise
        val = None  # an unlabelled folder for pre-training may have no held-out part
    if kind == "finetune" and resume_ckpt is None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=len(train.classes)))
    if not quiet:
        console.print(escape(f"data: {train.source}; validation: {_validation_note(spec, val)}"), highlight=False)

    recipe = getattr(cfg, section)
    torch.manual_seed(recipe.seed)  # the initial weights depend on the seed alone
    task = task_cls(cfg, train.classes)
    layer_decay = 1.0 if resume_ckpt is None else layer_decay_of_run(resume_ckpt.train_info, recipe)
    if init is not None and resume_ckpt is None:
        init_ckpt = load_checkpoint(init)
        target = task.model if kind == "finetune" else task.model.encoder
        init_report = load_weights_into(target, init_ckpt)
        if not init_report.loaded:
            raise MmlitError(f"--init {init}: no tensor of that checkpoint fits this model")
        if not quiet:
            console.print(escape(f"--init {init}: loaded {len(init_report.loaded)} tensors; skipped "
                                 f"{len(init_report.skipped)} ({_short(init_report.skipped)}); new "
                                 f"{len(init_report.missing)} ({_short(init_report.missing)})"), highlight=False)
        layer_decay = recipe.layer_decay  # fine-tuning a pre-trained encoder: BEiT/MAE layer-wise lr decay

    opts = RunOptions(out_dir=run_dir, dataset=dataclasses.asdict(spec), device=device, compile=compile,
                      compile_mode=compile_mode,
                      save_every=save_every, max_steps=max_steps, layer_decay=layer_decay, quiet=quiet,
                      save_best=spec.validation != "test",
                      on_epoch_end=write_reconstruction if kind == "pretrain" else None)
    trainer = Trainer(task, cfg, train, val, opts, console)
    if resume_ckpt is not None:
        trainer.resume_from(resume_ckpt)
        if not quiet:
            console.print(escape(f"resuming {run_dir} at epoch {trainer.epoch + 1}, step {trainer.global_step}"),
                          highlight=False)
    result = trainer.fit()
    result["out_dir"] = str(run_dir)
    if trainer.dist.is_main and result["stopped"] is None:
        from .plots import PlotUnavailable, plot_curves

        try:
            result["curves"] = plot_curves(run_dir)
        except PlotUnavailable as e:  # matplotlib is an optional extra
            result["curves_note"] = str(e)
    end_distributed(trainer.dist)
    return result


def _validation_note(spec: DataSpec, val: ImageData | None) -> str:
    """Where validation (and so best.safetensors) comes from, in words."""
    if val is None:
        return "none"
    if spec.validation == "test":
        return (f"{val.source} -- the paper protocol (--val test): trained on the whole training split and "
                f"validated on the test split, so no best.safetensors is kept (it would be picked on the test "
                f"split); use last.safetensors")
    return val.source


def _short(names: list[str], n: int = 4) -> str:
    if not names:
        return "-"
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


@torch.no_grad()
def write_reconstruction(trainer: Trainer, row: dict, count: int = 8) -> Path | None:
    """`reconstruction.png`: rows of original, masked input and reconstruction (MAE runs)."""
    from torchvision.utils import make_grid, save_image

    from .data import normalize
    from .mae import unpatchify

    loader = trainer.val_loader or trainer.train_loader
    images = next(iter(loader))[0][:count]
    mae = trainer.model
    cfg = trainer.cfg
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    was_training = mae.training
    mae.eval()
    with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
        torch.manual_seed(0)
        x = normalize(images.to(trainer.device), cfg.data.mean, cfg.data.std)
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
    path = trainer.opts.out_dir / "reconstruction.png"
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
    trainer._print(escape(f"reconstructions (rows: original, masked, reconstruction): {path}"))
    return path
