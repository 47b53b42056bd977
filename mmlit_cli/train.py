"""`finetune` and `pretrain` as library functions: resolve the config, the data and the run
directory, then hand everything to the engine."""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import numbers
import os
import re
import signal
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from .checkpoint import Checkpoint, load_checkpoint, load_weights_into, recorded_train_state
from .config import CLASS_BALANCE, RESUME_MAY_CHANGE, RESUMED_CONFIG_MAY_CHANGE, Config, check_label_free, \
    bundled_preset, dump_config, load_config, own_preset_keys, parse_overrides, pinned_keys, with_overrides
from .data import DATASET_NAMES, SAMPLE_DIR, ImageData, canonical_name, default_data_dir, is_sample, load_split, \
    shut_down_workers, skipped_warning, split_size, train_split_size, usable_cpus
from .engine import RunOptions, Trainer
from .errors import DataNotFound, MmlitError, listed
from .files import check_writable, claim_out, claim_run_dir, new_run_dir, removed_if_left_empty
from .mae import check_masking
from .recipe import SAMPLE_EPOCHS, batch_origin, describe, fit_recipe, fit_to_device
from .report import RunInterrupted
from .run_record import check_history, stopped_early
from .runtime import check_compile_mode, end_distributed, local_process_count, process_count, process_rank, \
    resolve_device
from .tasks import TASKS
from .train_state import layer_decay_of_run


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

    @property
    def named(self) -> bool:
        """Whether the dataset is a named one, found under a data directory (not a folder or
        label file, not the bundled sample)."""
        return canonical_name(self.dataset) in DATASET_NAMES and not is_sample(self.dataset)

    def located(self) -> dict[str, Any]:
        """This spec with absolute paths, as every checkpoint records it: `eval` and `benchmark`
        without --dataset read the data from there, whatever folder they are run in."""
        name = canonical_name(self.dataset)
        if is_sample(name):
            return dataclasses.asdict(dataclasses.replace(self, dataset=name, data_dir=None))
        if self.named:
            root = _absolute(self.data_dir) if self.data_dir else str(default_data_dir())
            return dataclasses.asdict(dataclasses.replace(self, dataset=name, data_dir=root))
        return dataclasses.asdict(dataclasses.replace(self, dataset=_absolute(self.dataset)))

    def load(self, split: str, cfg: Config, require_labels: bool = True) -> ImageData:
        return load_split(self.dataset, split, cfg.model.image_size, data_dir=self.data_dir,
                          download=self.download, val_fraction=cfg.data.val_fraction,
                          require_labels=require_labels, holdout=self.validation == "auto")


def _absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _apply_shortcuts(cfg: Config, section: str, **values: Any) -> Config:
    recipe = getattr(cfg, section)
    changes = {k: v for k, v in values.items() if v is not None}
    recipe = dataclasses.replace(recipe, **changes)
    cfg = dataclasses.replace(cfg, **{section: recipe})
    return cfg.validate()


def _warn_skipped(console: Console, data: ImageData) -> None:
    if data.skipped:
        console.print(f"[yellow]warning[/yellow]: {escape(skipped_warning(data.skipped))}", highlight=False)


@dataclasses.dataclass
class RunPlan:
    """What a run is, before anything is trained: its config, data and directory, and for a
    resumed run the checkpoint it continues from."""

    cfg: Config
    spec: DataSpec
    run_dir: Path
    recipe_note: str | None
    resume: Checkpoint | None = None
    # A new run's recipe is fitted once its training images are counted (`fit_to`).
    reference_epochs: int | None = None
    pinned: set[str] = dataclasses.field(default_factory=set)
    invocation: dict[str, Any] | None = None  # what makes the run this run (`_invocation`)
    continued: bool = False  # resumed because the same command was run again
    # folders created for this run (no --out: its own, so that no other run takes it, and the
    # runs/<kind>, runs/ above it that did not exist), deepest first
    created: tuple[Path, ...] = ()
    lock: Path | None = None  # its folder's, held while the run runs (`files.claim_out`; a resumed run: `_locked`)

    def fit_to(self, section: str, train_images: int, device_type: str) -> RunPlan:
        """A new run's plan with its recipe fitted to `train_images` on a `device_type` device
        (a resumed run's config is the one its checkpoint recorded, already fitted)."""
        if self.resume is not None:
            return self
        world = process_count()
        local_world = local_process_count()  # torchrun: processes sharing these cores
        device_cfg = fit_to_device(self.cfg, section, device_type, train_images, world,
                                   max(usable_cpus() // local_world, 1), self.pinned)
        cfg = fit_recipe(device_cfg, section, self.reference_epochs, train_images, world, self.pinned)
        preset, device, fitted = (getattr(c, section).batch_size for c in (self.cfg, device_cfg, cfg))
        every_image = device * world > train_images and fitted == max(train_images // world, 1)  # `fit_recipe`'s cap
        origin = batch_origin(preset, device, fitted, every_image, given=f"{section}.batch_size" in self.pinned)
        note = describe(cfg, section, self.reference_epochs, train_images, world, f"{section}.lr" in self.pinned,
                        origin)
        return dataclasses.replace(self, cfg=cfg, recipe_note=note)


_WHOLE_NUMBERS = ("epochs", "batch_size", "seed", "workers", "patience", "save_every", "max_steps")
_PATHS = ("preset", "dataset", "data_dir", "out", "init", "resume")


def _as_the_cli_gives_them(train):
    """`run_training`'s arguments as the CLI gives them, from any caller: a numpy integer is an
    int, a `Path` a str; another type is an error naming the argument. (From Python, epochs=1.5
    trained 2 epochs, and a numpy seed or a Path dataset failed after the run's first files.)"""
    def plain(name: str, value: Any) -> Any:
        if value is None:
            return None
        if name in _WHOLE_NUMBERS:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise MmlitError(f"{name} must be a whole number, got {value!r}")
            return int(value)
        if name == "lr":
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise MmlitError(f"lr must be a number, got {value!r}")
            return float(value)
        if name in _PATHS:
            if not isinstance(value, (str, os.PathLike)):
                raise MmlitError(f"{name} must be a path or name, got {value!r}")
            return os.fspath(value)
        return value  # (overrides: `config.parse_overrides` checks them)

    @functools.wraps(train)
    def checked(kind: str, preset: str | None = None, dataset: str | None = None, **options: Any) -> dict:
        if kind not in TASKS:
            raise MmlitError(f"kind must be one of {', '.join(TASKS)}, got {kind!r}")
        return train(kind, plain("preset", preset), plain("dataset", dataset),
                     **{name: plain(name, value) for name, value in options.items()})
    return checked


@_as_the_cli_gives_them
def run_training(kind: str, preset: str | None, dataset: str | None, *, data_dir: str | None = None,
                 out: str | Path | None = None, overrides: list[str] | None = None,
                 epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 seed: int | None = None, workers: int | None = None, recipe: str | None = None,
                 loader: str | None = None, patience: int | None = None, class_balance: str | None = None,
                 device: str = "auto",
                 init: str | Path | None = None, resume: str | Path | None = None, compile: bool | None = None,
                 compile_mode: str | None = None, tune_attention: bool | None = None,
                 save_every: int = 200, download: bool = False, max_steps: int | None = None,
                 validation: str | None = None, console: Console | None = None, quiet: bool = False) -> dict:
    """Train (`kind` = "finetune" or "pretrain"); returns the engine's summary. `validation`:
    see `DataSpec` ("auto" when None; a resumed run keeps its own). `tune_attention`: time the
    attention's kernel layouts first (`runtime.tune_attention`; None: on a CUDA GPU)."""
    console = console or Console()
    main_process = process_rank() == 0
    quiet = quiet or not main_process  # under torchrun, rank 0 alone speaks
    task_cls = TASKS[kind]
    device_type = resolve_device(device).type  # a missing GPU is reported before any data is read
    check_compile_mode(compile_mode)
    _check_validation(validation)
    if save_every < 0:
        raise MmlitError(f"--save-every must be >= 0 (0 = a checkpoint at epoch ends only), got {save_every}")
    shortcuts = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, workers=workers, recipe=recipe,
                     loader=loader, patience=patience, class_balance=class_balance)
    if resume is not None:
        plan = _resumed_run(Path(resume), task_cls, preset=preset, dataset=dataset, overrides=overrides,
                            validation=validation, options={**shortcuts, "init": init, "out": out},
                            data_dir=data_dir, download=download)
    else:
        plan = _new_run(kind, task_cls, preset, dataset, data_dir, download, validation, overrides, shortcuts, out,
                        init)
        if not quiet and plan.resume is None:
            if dataset is None:
                console.print(escape(_sample_note(getattr(plan.cfg, task_cls.command).epochs)), highlight=False)
            for line in _unread_overrides(task_cls.command, overrides):
                console.print(escape(line), highlight=False)
    if plan.resume is not None:
        plan = _locked(plan)
    with removed_if_left_empty(plan.created, plan.lock):  # held until the event log is closed
        if plan.resume is not None and _finished(plan, task_cls.command):
            return _nothing_to_do(plan, None if quiet else console)
        # a missing or broken --init file is said before the data is read (minutes, for a big folder)
        init_ckpt = load_checkpoint(init) if init is not None and plan.resume is None else None

        train, val = _load_data(plan.spec, plan.cfg, task_cls.needs_labels, console if main_process else None,
                                resumed=plan.resume is not None)
        if plan.resume is not None and task_cls.needs_labels:
            _check_same_classes(plan, train.classes)
        if plan.resume is not None:
            _check_same_held_out(plan, train.held_out)
        plan = plan.fit_to(task_cls.command, len(train), device_type)
        cfg = plan.cfg if plan.resume is not None else task_cls.fit_config(plan.cfg, len(train.classes))
        if not quiet:
            console.print(escape(f"data: {train.source}; validation: {_validation_note(plan.spec, val)}"),
                          highlight=False)
            if "model.num_classes" in plan.pinned and cfg.model.num_classes != plan.cfg.model.num_classes:
                console.print(escape(f"note: --set model.num_classes={plan.cfg.model.num_classes} overridden: the "
                                     f"head has one output per class of the data, {cfg.model.num_classes}"),
                              highlight=False)
            _warn_imbalance(console, train, getattr(cfg, task_cls.command).class_balance, task_cls.needs_labels)
        task, layer_decay = _new_task(task_cls, cfg, train, plan, init, init_ckpt, None if quiet else console)
        opts = RunOptions(out_dir=plan.run_dir, dataset=dataclasses.asdict(plan.spec), data_source=plan.spec.located(),
                          device=device, compile=compile, compile_mode=compile_mode, tune_attention=tune_attention,
                          save_every=save_every, max_steps=max_steps, layer_decay=layer_decay, quiet=quiet,
                          save_best=plan.spec.validation != "test", recipe_note=plan.recipe_note,
                          invocation=plan.invocation, held_out=train.held_out)
        trainer = Trainer(task, cfg, train, val, opts, console)
        if plan.resume is not None:
            _resume(trainer, plan, None if quiet else console)
        result = _fit(trainer, plan.run_dir, main_process)
    end_distributed(trainer.dist)
    if result["signal"]:  # saved: the caller stops too, as on any other Ctrl-C
        raise RunInterrupted(result)
    return result


def _fit(trainer: Trainer, run_dir: Path, main_process: bool) -> dict:
    """`trainer.fit()`, then the run's curves drawn (by rank 0, for a run that ended) and its event
    log closed, however it ends: TensorBoard's writer thread, left inside protobuf's C code, aborts
    the process's exit. Once `fit` returns the run is saved: Ctrl-C from there costs only the
    curves, and a signal that came as the run ended (during its last save) skips them, as a
    scheduler's SIGTERM wants the process to end now. The result's "signal" says either."""
    result: dict[str, Any] = {}
    try:
        result = {**trainer.fit(), "out_dir": str(run_dir), "main_process": main_process}
        if trainer.dist.is_main and result["stopped"] in (None, "patience"):
            if result["signal"]:
                result["curves_note"] = f"{signal.Signals(result['signal']).name} as the run ended; mmlit plot " \
                                        f"{run_dir} draws it"
            else:
                _plot_curves(run_dir, result)
    except KeyboardInterrupt:
        if not result:  # within the training: `fit` saved what it could
            raise
        result["signal"] = int(signal.SIGINT)
    finally:
        try:
            shut_down_workers(trainer.train_loader)
        finally:
            trainer.record.close_events(result.get("curves"))
    return result


def _locked(plan: RunPlan) -> RunPlan:
    """A resumed (or continued) run's plan holding its folder's lock, as a new run's `--out` is
    held (`files.claim_out`): two commands continuing one run both trained and wrote into it. The
    checkpoint the plan read must still be the folder's last once the lock is held (a command
    that held it then may have saved more). Not under torchrun, whose ranks share the folder."""
    if plan.lock is not None or process_count() > 1:
        return plan
    _, lock = claim_out(plan.run_dir, busy="{path} is being trained by another mmlit command: wait for it to end, "
                                           "then run this command again")
    saved = recorded_train_state(plan.run_dir / "last.safetensors") or {}
    if [saved.get(k) for k in ("epoch", "global_step")] != [plan.resume.train_info.get(k)
                                                             for k in ("epoch", "global_step")]:
        with removed_if_left_empty((), lock):
            raise MmlitError(f"{plan.run_dir}/last.safetensors was written by another mmlit command while this "
                             f"one read it: run this command again")
    return dataclasses.replace(plan, lock=lock)


def _resume(trainer: Trainer, plan: RunPlan, console: Console | None) -> None:
    """The trainer where the plan's checkpoint left the run, said in a line (two when the
    process count changed)."""
    saved_world = int(plan.resume.train_info.get("world_size", 1))
    trainer.record.resume_from(plan.resume, trainer.steps_per_epoch)
    if console is None:
        return
    how = "the same command again: continuing" if plan.continued else "resuming"
    console.print(escape(f"{plan.run_dir} holds this run's last.safetensors; " if plan.continued else "") +
                  escape(f"{how} {plan.run_dir} at epoch {trainer.epoch + 1}, step {trainer.global_step}"),
                  highlight=False)
    had, epochs = getattr(plan.resume.config, trainer.task.command).epochs, trainer.recipe.epochs
    if had != epochs:
        console.print(escape(
            f"note: {epochs} epochs, where the run had {had}: the lr schedule is stretched to {epochs} epochs and "
            f"goes on from where that puts step {trainer.global_step}; the rest of the recipe stays as the run "
            f"started it (a new run would fit it to {epochs} epochs)"), highlight=False)
    early_stop = plan.resume.train_info.get("early_stop")
    if early_stop and trainer.record.early_stop is None:
        console.print(escape(f"note: the run had stopped early ({early_stop}); with --patience "
                             f"{trainer.recipe.patience or 0} it goes on"), highlight=False)
    world = trainer.dist.world_size
    if saved_world != world:
        how = "as set" if _lr_pinned(plan.invocation, trainer.task.command) else f"x {world}/{saved_world}"
        console.print(escape(
            f"note: resumed on {world} process(es), not the {saved_world} this run was trained on: its random "
            f"streams differ from the original run's from here on; the global batch is now "
            f"{trainer.recipe.batch_size} x {world} and the peak lr {trainer.peak_lr:.3g} ({how})"), highlight=False)


def _check_same_classes(plan: RunPlan, classes: list[str]) -> None:
    """A resumed classifier's data must hold the classes its head was trained on, in its order:
    a class renamed, added or removed in the folder since would give each output another
    meaning (or a label the head has no output for)."""
    trained = list(plan.resume.classes)
    if not trained or trained == list(classes):
        return
    gone, new = [c for c in trained if c not in classes], [c for c in classes if c not in trained]
    what = "; ".join(part for part in (
        f"{listed([repr(c) for c in gone], 3)} no longer in it" if gone else "",
        f"{listed([repr(c) for c in new], 3)} new" if new else "",
        f"the same {len(classes)} classes in another order" if not gone and not new else "") if part)
    raise MmlitError(f"{plan.run_dir} was trained on other classes than its data now has ({what}): put the data "
                     f"back as it was to resume, or start a new run (--init {plan.run_dir / 'last.safetensors'} "
                     f"keeps the weights)")


def _check_same_held_out(plan: RunPlan, held_out: str | None) -> None:
    """A resumed run validates on the files it held out for validation when it started: which
    ones the hold-out picks depends on every file of a class, so an image added to (or removed
    from) the folder since picks others, some of which the run trained on."""
    recorded = plan.resume.info.get("held_out")
    if recorded is None or recorded == held_out:  # the same files (or a run from before runs recorded them)
        return
    raise MmlitError(f"{plan.run_dir} validated on images its data no longer holds out (images were added, removed, "
                     f"renamed or moved since it started): resumed, it would validate on images it trained on. Put "
                     f"the data back as it was to resume it")


def _command_of(ckpt: Checkpoint) -> str | None:
    """The command that trains a checkpoint's task ("pretrain" for an MAE), or None if unknown."""
    return next((c.command for c in TASKS.values() if c.kind == ckpt.task), None)


def _check_validation(validation: str | None) -> None:
    if validation is not None and validation not in VALIDATION:
        raise MmlitError(f"--val must be {' or '.join(VALIDATION)}, got '{validation}'")


def _finished(plan: RunPlan, section: str) -> bool:
    """Whether the checkpoint a plan resumes from ended its run (all its epochs done, or
    stopped by --patience)."""
    info, recipe = plan.resume.train_info, getattr(plan.cfg, section)
    return int(info["epoch"]) >= recipe.epochs or stopped_early(info, recipe.patience)


def _nothing_to_do(plan: RunPlan, console: Console | None) -> dict:
    """The result of resuming a finished run (said in a line): no process group, and no file
    but curves.png where the run did not draw it."""
    info = plan.resume.train_info
    how = f"stopped early after epoch {info['epoch']}: {info['early_stop']}" if info.get("early_stop") else \
        f"{info['epoch']} epochs"
    if console is not None:
        console.print(escape(f"{plan.run_dir}: the run is finished ({how}); nothing to do"), highlight=False)
    result = {"stopped": "finished", "out_dir": str(plan.run_dir), "main_process": process_rank() == 0,
              "best_saved": plan.spec.validation != "test", "epoch": int(info["epoch"])}
    if result["main_process"] and not (plan.run_dir / "curves.png").exists():  # a run killed before it drew them
        _plot_curves(plan.run_dir, result)
    return result


def _unread_overrides(command: str, overrides: list[str] | None) -> list[str]:
    """A note for each `--set` key of the other command's section whose counterpart in this
    command's section is not set too: `mmlit pretrain --set finetune.epochs=5` is valid config,
    and trained pretrain.epochs without a word. (Both set: one list of overrides kept for both
    commands, nothing to say.)"""
    other = "finetune" if command == "pretrain" else "pretrain"
    keys = pinned_keys(parse_overrides(overrides))
    return [f"note: --set {key} is not read by mmlit {command}, which reads {command}.{key.partition('.')[2]}"
            for key in sorted(keys) if key.startswith(f"{other}.") and key.replace(other, command, 1) not in keys]


def _sample_note(epochs: int) -> str:
    return (f"no --dataset: training on the bundled sample ({SAMPLE_DIR}; 1,000 CIFAR-10 images), {epochs} "
            f"epoch{'' if epochs == 1 else 's'}. For real data pass --dataset: a name (cifar10, cifar100, ...), "
            f"an image folder or a label file (.csv)")


def _class_counts(train: ImageData) -> list[int]:
    labelled = train.labels[train.labels >= 0]
    return torch.bincount(labelled, minlength=len(train.classes)).tolist() if len(labelled) else []


def _warn_imbalance(console: Console, train: ImageData, class_balance: str, labelled: bool) -> None:
    """One line when the largest class has over 3x the images of the smallest."""
    counts = _class_counts(train) if labelled else []
    if counts and class_balance == "none" and max(counts) > 3 * max(min(counts), 1):
        console.print(f"[yellow]note[/yellow]: imbalanced classes ({max(counts):,} images in the largest, "
                      f"{min(counts):,} in the smallest); --class-balance loss or sampler trains for every class "
                      f"alike", highlight=False)


def _new_task(task_cls, cfg: Config, train: ImageData, plan: RunPlan, init: str | Path | None,
              init_ckpt: Checkpoint | None, console: Console | None):
    """(the task with its model, the layer-wise lr decay of its param groups). The initial
    weights depend on the seed alone; `--init` (the file `init`, loaded as `init_ckpt`) puts a
    checkpoint's into a new run's model."""
    train_cfg = getattr(cfg, task_cls.command)
    torch.manual_seed(train_cfg.seed)
    task = task_cls(cfg, train.classes, _class_counts(train))
    layer_decay = 1.0 if plan.resume is None else layer_decay_of_run(plan.resume.train_info, train_cfg)
    if init_ckpt is not None:
        layer_decay = train_cfg.layer_decay  # fine-tuning a pre-trained encoder: BEiT/MAE layer-wise lr decay
        _load_init(task, init, init_ckpt, console, layer_decay, cfg)
    elif plan.resume is None and console is not None and f"{task_cls.command}.layer_decay" in plan.pinned \
            and train_cfg.layer_decay != 1.0:  # set by the user, where it has nothing to act on
        console.print(escape(f"note: {task_cls.command}.layer_decay {train_cfg.layer_decay} is unused: layer-wise lr "
                             f"decay applies to a fine-tuning run started from a checkpoint (finetune --init)"),
                      highlight=False)
    return task, layer_decay


def _resumed_run(run_dir: Path, task_cls, *, preset: str | None = None, dataset: str | None = None,
                 overrides: list[str] | None = None, validation: str | None = None,
                 options: dict[str, Any] | None = None, data_dir: str | None = None,
                 download: bool = False) -> RunPlan:
    """`--resume DIR`: the run as its last.safetensors recorded it. Of the command's `options`
    (the shortcuts, init, out), --epochs, --workers and --patience apply, and the others must
    agree with the run (`_kept_options_that_differ`); `data_dir` and `download` say where its
    files now are."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    loader = options.pop("loader", None)
    changes = {k: options.pop(k) for k in RESUMED_CONFIG_MAY_CHANGE if k in options}
    run_dir = run_dir.expanduser()
    if run_dir.is_file() and run_dir.suffix == ".safetensors":  # `--resume runs/x/last.safetensors`, as YOLO takes it
        if run_dir.name != "last.safetensors":
            raise MmlitError(f"{run_dir} is not a run's last checkpoint: --resume takes the run's folder "
                             f"({run_dir.parent}), which resumes from its last.safetensors")
        run_dir = run_dir.parent
    if not run_dir.exists():
        raise MmlitError(f"nothing to resume: {run_dir} does not exist")
    last = run_dir / "last.safetensors"
    if not last.is_file():
        raise MmlitError(f"nothing to resume in {run_dir}: no last.safetensors")
    ckpt = load_checkpoint(last, with_train_state=True)
    if ckpt.train_info is None:
        raise MmlitError(f"{last} holds no training state (it is not a run's last checkpoint)")
    check_history(run_dir, int(ckpt.train_info.get("epoch", 0)))  # before the data is read
    if ckpt.task != task_cls.kind:
        command = _command_of(ckpt)
        how = f"mmlit {command} --resume {run_dir}" if command else "the command that trained it"
        raise MmlitError(f"{run_dir} is a {command or ckpt.task} run: resume it with {how}")
    cfg = ckpt.config
    if preset is not None and load_config(preset).name != cfg.name:
        raise MmlitError(f"{run_dir} was trained with preset '{cfg.name}', not '{preset}'")
    if preset is not None and not bundled_preset(preset):  # a file of one's own: named as the run's preset was
        # enough, whatever it held. Its model (with --set) must be the run's; the rest of a resumed run's
        # recipe is the run's own.
        asked = dataclasses.asdict(load_config(preset, overrides).model)
        # the model as the run started it, before its recipe was fitted (which scales drop_path)
        ran = (ckpt.train_info.get("invocation") or {}).get("config", {}).get("model") or dataclasses.asdict(cfg.model)
        differ = [f"model.{k} {ran.get(k)!r} there, {v!r} in it" for k, v in asked.items()
                  if k != "num_classes" and v != ran.get(k)]  # (the data's class count)
        if differ:
            raise MmlitError(f"{run_dir} was trained with another model than preset {preset} gives ({differ[0]}): "
                             f"leave --preset out (a resumed run keeps its own)")
    recorded = getattr(cfg, task_cls.command).loader
    # A run records the loader it chose; "auto" in a checkpoint means the run predates the
    # device loader, so its batches came from loader workers.
    recorded = "workers" if recorded == "auto" else recorded
    if loader is not None and loader != recorded:
        raise MmlitError(f"{run_dir} was trained with --loader {recorded}; a resumed run keeps it (the other "
                         f"loader draws other batches)")
    section = task_cls.command
    invocation = ckpt.train_info.get("invocation")
    saved_world, world = int(ckpt.train_info.get("world_size", 1)), process_count()
    if saved_world != world and not _lr_pinned(invocation, section):  # the lr follows the global batch
        cfg = _apply_shortcuts(cfg, section, lr=getattr(cfg, section).lr * world / saved_world)
    set_changes, set_differ = _overrides_on_resume(cfg, section, overrides, invocation)
    _check_options_agree(section, changes, set_changes)
    changes = {**set_changes, **{k: v for k, v in changes.items() if v is not None}}
    differ = _kept_options_that_differ(run_dir, section, getattr(cfg, section), invocation, options) + set_differ
    if differ:
        on = f" on {world} process(es)" if saved_world != world else ""
        raise MmlitError(f"{run_dir} keeps what it was trained with, so --resume{on} cannot change "
                         f"{', '.join(differ)}: only {RESUME_MAY_CHANGE} may change (a new run can change the rest)")
    cfg = _apply_shortcuts(cfg, section, loader=recorded, **changes)
    spec = _recorded_data(ckpt, data_dir, download)
    if dataset is not None and DataSpec(dataset).located()["dataset"] != DataSpec(spec.dataset).located()["dataset"]:
        raise MmlitError(f"{run_dir} was trained on '{spec.dataset}', not '{dataset}'")
    if validation is not None and validation != spec.validation:
        raise MmlitError(f"{run_dir} was trained with --val {spec.validation}; a resumed run keeps it")
    if invocation is not None:  # what --epochs/--patience/--workers changed, the same command must say again
        invocation = json.loads(json.dumps(invocation))
        invocation["config"][section].update(changes)
    return RunPlan(cfg, spec, run_dir, ckpt.train_info.get("recipe_note"), ckpt, invocation=invocation)


def _recorded_data(ckpt: Checkpoint, data_dir: str | None, download: bool) -> DataSpec:
    """The data a run was trained on, with absolute paths (recorded as `info["dataset"]`; runs
    older than that recorded the paths as given), so that it resumes from any folder; a
    named dataset's files may have moved (`data_dir`: --data-dir, or where the same command
    run again finds them) or be missing (`download`)."""
    located = ckpt.info.get("dataset")
    spec = DataSpec(**(located if isinstance(located, dict) else ckpt.train_info["dataset"]))
    if data_dir is not None and data_dir != spec.data_dir:
        if not spec.named:
            raise MmlitError(f"--data-dir locates a named dataset (cifar10, ...); this run was trained on "
                             f"{spec.dataset}")
        spec = dataclasses.replace(spec, data_dir=data_dir)
    return dataclasses.replace(spec, download=download) if download else spec


def _kept_options_that_differ(run_dir: Path, section: str, recorded: Any, invocation: dict[str, Any] | None,
                              kept: dict[str, Any]) -> list[str]:
    """The options in `kept` that ask for other than the run recorded (its config section
    `recorded`, its --init, its folder), each said as "--lr 0.002 (the run's: 0.00158)"."""
    there = {"batch_size": recorded.batch_size, "lr": recorded.lr, "seed": recorded.seed, "recipe": recorded.recipe,
             "class_balance": recorded.class_balance, "out": _absolute(run_dir),
             "init": "not recorded" if invocation is None else invocation.get("init") or "none"}
    # as `--set` (`_overrides_on_resume`): the run's value as it runs, or as its command asked for
    # it before the recipe was fitted (a batch larger than the data, fitted down to all of it)
    started = (invocation or {}).get("config", {}).get(section) or {}
    same = {"lr": _same_lr, "init": lambda asked, run: _absolute(asked) == run,
            "out": lambda asked, run: _absolute(asked) == run}
    return [f"--{key.replace('_', '-')} {asked} (the run's: {_shown(there[key])})" for key, asked in kept.items()
            if asked is not None and not same.get(key, lambda a, run: a in (run, started.get(key)))(asked, there[key])]


def _overrides_on_resume(cfg: Config, section: str, overrides: list[str] | None,
                         invocation: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """`--set` given with `--resume`: the keys a resumed run may change (its section's epochs,
    patience, workers) as changes; every other key must ask for the run's own value, as it runs
    (`cfg`) or as its command asked for it (`invocation`: before the recipe was fitted, say a
    warm-up longer than half the run), and those that do not are said as "--set model.depth=4
    (the run's: 6)"."""
    asked = with_overrides(cfg, overrides)  # an unknown key or a bad value: the error a new run gives
    started = (invocation or {}).get("config", {})
    changes, differ = {}, []
    for key in sorted(pinned_keys(parse_overrides(overrides))):
        parts = key.split(".")
        want, have = (functools.reduce(getattr, parts, c) for c in (asked, cfg))
        as_started = functools.reduce(lambda node, k: node.get(k) if isinstance(node, dict) else None, parts, started)
        if parts[0] == section and parts[-1] in RESUMED_CONFIG_MAY_CHANGE and len(parts) == 2:
            changes[parts[1]] = want
        elif not (_same_lr(want, have) if key == f"{section}.lr" else want in (have, as_started)):
            differ.append(f"--set {key}={want} (the run's: {_shown(have)})")
    return changes, differ


def _shown(value: Any) -> Any:
    """A run's value for a message: a float to 6 significant digits (0.000140625, not 0.00014062500000000002)."""
    return f"{value:.6g}" if isinstance(value, float) else value


def _same_lr(asked: float | None, run: float | None) -> bool:
    """Whether an lr asked for is the run's: as the recipe line prints it (3 significant digits)."""
    return asked is not None and run is not None and math.isclose(asked, run, rel_tol=5e-3)


def _lr_pinned(invocation: dict[str, Any] | None, section: str) -> bool:
    """Whether the run's lr was given (--lr, --set): then it stays at any process count."""
    return invocation is not None and invocation["config"][section].get("lr") is not None


def _new_run(kind: str, task_cls, preset: str | None, dataset: str | None, data_dir: str | None, download: bool,
             validation: str | None, overrides: list[str] | None, shortcuts: dict[str, Any],
             out: str | Path | None, init: str | Path | None = None, probe: bool = True) -> RunPlan:
    """A new run: the preset with the user's overrides; its recipe is fitted to the run once
    the data is loaded (`RunPlan.fit_to`). When `out` holds a run this very command started
    (torchrun's restarts, a requeued job, the up-arrow), that run, continued. `probe`: check
    that the run's folder can be written (a file is written and removed there)."""
    plan = _new_plan(task_cls, preset, dataset, data_dir, download, validation, overrides, shortcuts)
    plan = dataclasses.replace(plan, invocation=_invocation(plan, init))
    out = None if out is None else Path(out).expanduser()  # `--out=~/runs/x`: the shell leaves that ~ to us
    name = plan.cfg.name
    if out is None and (not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0")):
        raise MmlitError(f"name must be a plain folder name (a run without --out is runs/{kind}/<name>), got "
                         f"{name!r}")
    continued = _continued_run(out, task_cls, plan) if out is not None else \
        _restarted_run(kind, task_cls, plan)
    if continued is not None:
        return continued
    # a run in one process makes its folder now: two started at once used to write into one
    # folder, the same free runs/<kind>/<name>N or the same new --out (under torchrun, rank 0
    # makes it later)
    made, lock = (), None
    if not probe or process_count() > 1:
        run_dir = new_run_dir(out, kind, plan.cfg.name, resumable=True)
        if probe:
            check_writable(run_dir)
    else:
        run_dir, made, lock = claim_run_dir(out, kind, plan.cfg.name, resumable=True)
    return dataclasses.replace(plan, run_dir=run_dir, created=made, lock=lock)


def _invocation(plan: RunPlan, init: str | Path | None) -> dict[str, Any]:
    """What makes a run this run: its config before fitting (preset, --set, the shortcuts),
    its data (absolute paths) and its --init; recorded in every last.safetensors."""
    located = plan.spec.located()  # not --download or --data-dir: where the files are may change
    return json.loads(json.dumps({"config": dataclasses.asdict(plan.cfg),
                                  "dataset": {k: located[k] for k in ("dataset", "validation")},
                                  "init": None if init is None else _absolute(init)}))


def _continued_run(out: Path, task_cls, command: RunPlan) -> RunPlan | None:
    """The run in `out` when the same command (`command`: its plan as a new run) started it,
    to be continued, its named dataset read where the command finds it now (--data-dir,
    $MMLIT_DATA: a requeued job's data may have moved); None when `out` holds no run's
    last.safetensors. A different run there is an error naming the difference."""
    last = out / "last.safetensors"
    if not last.is_file():
        return None
    ckpt = load_checkpoint(last, with_train_state=True)
    recorded = (ckpt.train_info or {}).get("invocation")
    other = _command_of(ckpt)
    if ckpt.train_info is not None and ckpt.task != task_cls.kind and other is not None:
        raise MmlitError(f"{out} holds a {other} run: choose another --out, or continue that run with mmlit {other} "
                         f"--resume {out}")
    if recorded is None or ckpt.task != task_cls.kind:
        return None  # not a run this mmlit can tell apart: new_run_dir refuses the folder
    differences = _differences(recorded, command.invocation)
    continued_with = _resumed_with(recorded, command.invocation, task_cls.command) if differences else None
    if continued_with:  # this command's run, since resumed with --epochs (say): not "another run"
        raise MmlitError(f"{out} holds this command's run, since continued with {continued_with} ({differences}): "
                         f"continue it with --resume {out}, or add {continued_with} to this command")
    if differences:
        raise MmlitError(f"{out} holds another run ({differences}): choose another --out, or continue that run "
                         f"with --resume {out}")
    where = command.spec.located() if command.spec.named else {}
    plan = _resumed_run(out, task_cls, data_dir=where.get("data_dir"), download=command.spec.download)
    return dataclasses.replace(plan, continued=True)


def _restarted_run(kind: str, task_cls, plan: RunPlan) -> RunPlan | None:
    """Without --out, a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) continues the folder
    its torchrun job started: the newest `runs/<kind>/<name>N` whose last.safetensors records
    the job's id (TORCHELASTIC_RUN_ID; a new one for every `torchrun --standalone`), when this
    command started it. None (a new folder) when there is none: the attempt that died had
    not saved its step-0 checkpoint, and the newest folder is an older job's run."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return None
    name, job = plan.cfg.name, os.environ.get("TORCHELASTIC_RUN_ID")
    numbered = []
    for folder in (Path("runs") / kind).glob(f"{glob.escape(name)}*"):
        number = re.fullmatch(rf"{re.escape(name)}(\d*)", folder.name)
        if number is not None:
            numbered.append((int(number.group(1) or 1), folder))
    for _, folder in sorted(numbered, reverse=True):
        state = recorded_train_state(folder / "last.safetensors")
        if state is not None and state.get("torchrun_run_id") == job:
            try:
                return _continued_run(folder, task_cls, plan)
            except MmlitError:  # that job's folder holds another command's run
                return None
    return None


def _resumed_with(there: dict[str, Any], here: dict[str, Any], section: str) -> str | None:
    """The options ("--epochs 3") a `--resume` gave the run recorded as `there`, when they are
    all that tells it from the command `here`; None when something else differs too."""
    recorded, asked = there["config"].get(section, {}), here["config"].get(section, {})
    keys = [k for k in RESUMED_CONFIG_MAY_CHANGE if k in recorded and k in asked and recorded[k] != asked[k]]
    mended = json.loads(json.dumps(here))
    mended["config"][section].update({k: recorded[k] for k in keys})
    if not keys or _differences(there, mended):
        return None
    return " ".join(f"--{k} {recorded[k]}" for k in keys)


def _differences(there: dict[str, Any], here: dict[str, Any], prefix: str = "") -> str:
    """The first few keys where two invocations differ: "finetune.epochs: 3 there, 5 here"."""
    found = []
    for key in sorted(set(there) & set(here)):  # a key one side lacks: another mmlit version's
        a, b = there[key], here[key]
        if isinstance(a, dict) and isinstance(b, dict):
            found += [d for d in _differences(a, b, f"{prefix}{key}.").split("; ") if d]
        elif a != b:
            shown = ["not set" if v is None else v for v in (a, b)]  # None: the option was not given
            found.append(f"{prefix.removeprefix('config.')}{key}: {shown[0]} there, {shown[1]} here")
    return "; ".join(found[:3]) + ("; ..." if len(found) > 3 else "")


def _new_plan(task_cls, preset: str | None, dataset: str | None, data_dir: str | None, download: bool,
              validation: str | None, overrides: list[str] | None, shortcuts: dict[str, Any]) -> RunPlan:
    """A new run's plan before its directory is chosen: no --dataset means the sample, whose
    runs are short unless --epochs says otherwise (`SAMPLE_EPOCHS`)."""
    section = task_cls.command
    dataset = "sample" if dataset is None else dataset
    if shortcuts.get("recipe") not in (None, "auto", "paper"):
        raise MmlitError(f"--recipe must be auto or paper, got '{shortcuts['recipe']}'")
    if shortcuts.get("class_balance") not in (None, *CLASS_BALANCE):
        raise MmlitError(f"--class-balance must be none, loss or sampler, got '{shortcuts['class_balance']}'")
    pinned = pinned_keys(parse_overrides(overrides)) | {f"{section}.{k}" for k, v in shortcuts.items() if v is not None}
    if is_sample(dataset) and f"{section}.epochs" not in pinned | own_preset_keys(preset or "xs"):
        shortcuts = {**shortcuts, "epochs": SAMPLE_EPOCHS[section]}
    cfg = load_config(preset or "xs", overrides)
    given = pinned_keys(parse_overrides(overrides))
    _check_options_agree(section, shortcuts, {k: getattr(getattr(cfg, section), k) for k in shortcuts
                                              if f"{section}.{k}" in given})
    cfg = _apply_shortcuts(cfg, section, **shortcuts)
    if cfg.model.in_chans != 3:  # a model of other channels is for count-params and the Python API
        raise MmlitError(f"model.in_chans is {cfg.model.in_chans}: training needs 3, as every image is decoded as "
                         f"RGB (grey ones with 3 equal channels)")
    if section == "pretrain":  # before the data is read
        check_masking(cfg.model, cfg.mae)
        check_label_free(cfg.pretrain)
    # The preset's own length is the one its recipe was written for (`RunPlan.fit_to` fits it).
    reference_epochs = getattr(load_config(preset or "xs"), section).epochs
    spec = DataSpec(dataset, data_dir, download, validation or "auto")
    return RunPlan(cfg, spec, Path("."), None, reference_epochs=reference_epochs, pinned=pinned)


def _check_options_agree(section: str, options: dict[str, Any], set_values: dict[str, Any]) -> None:
    """`--lr 0.01 --set finetune.lr=0.02`: two values for one key, one of them silently lost.
    `options`: the options given (None: not given); `set_values`: what `--set` gave the same keys."""
    for key, value in options.items():
        if value is not None and key in set_values and set_values[key] != value:
            raise MmlitError(f"--{key.replace('_', '-')} {value} and --set {section}.{key}={set_values[key]} "
                             f"ask for two values: give one")


def resolved_config(kind: str, preset: str | None, dataset: str | None, *, data_dir: str | None = None,
                    overrides: list[str] | None = None, validation: str | None = None, device: str = "auto",
                    resume: str | Path | None = None, **shortcuts: Any) -> str:
    """`--print-config`: the config a run would use, as YAML (the fitted recipe in words atop,
    as comments), without reading an image or writing a file. The training images are counted
    (`data.train_split_size`: a folder is listed, a named dataset is its official size); with
    `resume`, or an `--out` holding this command's run (which the run would continue), the
    config the resumed run would use: the one the run recorded, with what --epochs, --workers
    and --patience (and another process count, the lr) change; an option the run keeps (--lr,
    --batch-size, ...) is checked against it as the run would check it. What the run would
    refuse before reading its data is refused: a missing or broken --init file, or one of another
    architecture (checked on a model built and dropped), an --out
    holding another run or other files."""
    task_cls = TASKS[kind]
    if resume is not None:
        plan = _resumed_run(Path(resume), task_cls, preset=preset, dataset=dataset, overrides=overrides,
                            validation=validation, options=shortcuts, data_dir=data_dir)
        return _recorded_config(plan, f"resumed from {resume}: the config it recorded, as the resumed run would use it")
    _check_validation(validation)
    init, out = shortcuts.get("init"), shortcuts.get("out")
    init_ckpt = None if init is None else load_checkpoint(init)
    shortcuts = {k: shortcuts.get(k) for k in ("epochs", "batch_size", "lr", "seed", "workers", "recipe", "loader",
                                               "patience", "class_balance")}
    plan = _new_run(kind, task_cls, preset, dataset, data_dir, False, validation, overrides, shortcuts, out, init,
                    probe=False)
    if plan.resume is not None:  # --out holds this command's run, which the run would continue
        return _recorded_config(plan, f"{plan.run_dir} holds this command's run: the config it recorded")
    images, classes = train_split_size(plan.spec.dataset, plan.cfg.data.val_fraction, plan.spec.validation == "auto",
                                       task_cls.needs_labels)
    if plan.spec.validation == "test":  # a folder with no test split: refused, as the run refuses it
        try:
            split_size(plan.spec.dataset, "test", holdout=False, require_labels=task_cls.needs_labels)
        except MmlitError as e:
            raise _no_test_split(e) from None
    plan = plan.fit_to(task_cls.command, images, resolve_device(device).type)
    cfg = task_cls.fit_config(plan.cfg, classes)
    if init_ckpt is not None:  # the architecture check the run makes, on a model built here and dropped
        _load_init(task_cls(cfg, [str(i) for i in range(classes)]), init, init_ckpt, None, 1.0, cfg)
    head = [f"{plan.spec.dataset}: {images:,} training images, {classes} classes (counted, not read)",
            *(plan.recipe_note or "").splitlines()]
    return "".join(f"# {line}\n" for line in head) + dump_config(cfg)


def _recorded_config(plan: RunPlan, first_line: str) -> str:
    head = [first_line, *(f"recorded at its start: {line}" for line in (plan.recipe_note or "").splitlines())]
    return "".join(f"# {line}\n" for line in head) + dump_config(plan.cfg)


def _load_data(spec: DataSpec, cfg: Config, require_labels: bool, console: Console | None,
               resumed: bool = False) -> tuple[ImageData, ImageData | None]:
    """The training split and the validation split (None: an unlabelled folder with nothing
    to hold out); skipped files are reported on `console` when given."""
    try:
        train = spec.load("train", cfg, require_labels)
    except DataNotFound as e:
        if not resumed:
            raise
        # a resumed run reads its named dataset where it was trained, which may have moved
        raise DataNotFound(f"{e} Resuming: if they have moved since the run began, pass --data-dir with the "
                           f"folder they are in now.") from None
    if console is not None:
        _warn_skipped(console, train)
    try:
        val = spec.load(spec.val_split, cfg, require_labels)
        if console is not None:
            _warn_skipped(console, val)
    except MmlitError as e:
        if spec.validation == "test":
            raise _no_test_split(e) from None
        if require_labels:
            raise
        val = None  # an unlabelled folder for pre-training may have no held-out part
    return train, val


def _no_test_split(e: MmlitError) -> MmlitError:
    return MmlitError(f"{e} (--val test validates on the test split; without --val a validation part is held out "
                      f"of train)")


def _load_init(task, init: str | Path, ckpt: Checkpoint, console: Console | None, layer_decay: float,
               cfg: Config) -> None:
    """`--init`: the checkpoint's weights into the task's model (see `load_weights_into`)."""
    report = load_weights_into(task.init_target, ckpt)
    if not report.loaded:
        raise MmlitError(f"--init {init}: no tensor of that checkpoint fits this model")
    # A head of another class count is replaced, as timm does; any other tensor in another shape,
    # or in one model and not the other (another depth: half a pre-trained encoder dropped, or
    # blocks left at their initialisation), means another architecture.
    found = ((report.mismatched, "differ in shape"), (report.unplaced, "of its encoder have no place here"),
             (report.missing, "of this model are not in it"))
    other = [f"{len(body)} tensor(s) {how}: {body[0]}" for names, how in found
             if (body := [n for n in names if not n.startswith("head.")])]
    if other:
        raise MmlitError(f"--init {init} is another architecture ({other[0]}): train with its preset and --set (its "
                         f"config.yaml says them)")
    if console is None:
        return
    resampled = f"; position embedding resampled from {report.resampled}" if report.resampled else ""
    decay = f"; layer-wise lr decay {layer_decay}" if layer_decay < 1.0 else ""
    console.print(escape(f"--init {init}: loaded {len(report.loaded)} tensors; skipped "
                         f"{len(report.skipped)} ({_short(report.skipped)}); new "
                         f"{len(report.missing)} ({_short(report.missing)}){resampled}{decay}"), highlight=False)
    if (list(ckpt.mean), list(ckpt.std)) != (list(cfg.data.mean), list(cfg.data.std)):
        console.print(escape(f"note: --init {init} was trained on images normalised with mean {list(ckpt.mean)}, std "
                             f"{list(ckpt.std)}; this run uses mean {list(cfg.data.mean)}, std {list(cfg.data.std)} "
                             f"(--set data.mean=... --set data.std=... to keep the checkpoint's)"), highlight=False)


def _plot_curves(run_dir: Path, result: dict) -> None:
    """curves.png into the run, noted in `result` (or why there is none)."""
    from .plots import PlotUnavailable, plot_curves

    try:
        result["curves"] = plot_curves(run_dir)
    except PlotUnavailable as e:  # matplotlib is an optional extra
        result["curves_note"] = str(e)
    except MmlitError as e:  # a full disk: the run is saved, and finished
        result["curves_note"] = f"{e}; mmlit plot {run_dir} draws it"
    except KeyboardInterrupt:  # the run is saved and finished: Ctrl-C skips the drawing, then stops
        result["curves_note"] = f"interrupted while drawing it; mmlit plot {run_dir} draws it"
        raise


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
