"""`eval`: rebuild a classifier from its checkpoint and evaluate it on a dataset split.

`load_classifier` is also how `predict` and `export` get their model. Nothing here imports the
training engine: devices and compile come from `runtime.py`, the loop from `metrics.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint, load_checkpoint
from .data import EVAL_SPLITS, ImageData, build_loader, load_split, skipped_warning
from .errors import CheckpointError, MmlitError, listed
from .metrics import EvalResult, evaluate_classifier
from .model import MLiT
from .runtime import amp_dtype, maybe_compile, resolve_device


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[MLiT, Checkpoint]:
    """An eval-mode classifier from a checkpoint; MAE-only checkpoints are refused."""
    ckpt = load_checkpoint(path)
    if ckpt.task == "mae":
        raise CheckpointError(f"{path} is an MAE pre-training checkpoint with no classifier head: fine-tune it "
                              f"first (mmlit finetune --init {path} --dataset ...)")
    model = MLiT(ckpt.config.model)
    try:
        model.load_state_dict(ckpt.tensors)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "tensor names or shapes differ"
        raise CheckpointError(f"{path}: weights do not fit the config stored in it ({first})") from None
    if ckpt.classes and len(ckpt.classes) != ckpt.config.model.num_classes:
        raise CheckpointError(f"{path}: {len(ckpt.classes)} class names for {ckpt.config.model.num_classes} outputs")
    return model.to(device).eval(), ckpt


def checkpoint_split(ckpt: Checkpoint, dataset: str, split: str, data_dir: str | None) -> ImageData:
    """`split` of `dataset` as the checkpoint's run divided it: its `val_fraction` held out of
    train, or (a `--val test` run, `Checkpoint.held_out`) nothing held out, so that "val" is
    never images the run trained on."""
    return load_split(dataset, split, ckpt.image_size, data_dir=data_dir, val_fraction=ckpt.config.data.val_fraction,
                      holdout=ckpt.held_out)


def held_out_warning(ckpt: Checkpoint, data: ImageData, dataset: str, name: str = "the checkpoint") -> str | None:
    """A line when `data`, of the folder or label file the checkpoint was trained on, was held
    out of (or left by the hold-out in) its training images, but not as the checkpoint's run held
    them out: files added, removed or renamed since pick other files (`stratified_holdout`), some
    of which the run trained on. (Another dataset's hold-out is its own, and says nothing.)"""
    recorded, trained_on = ckpt.info.get("held_out"), ckpt.info.get("dataset")
    if recorded is None or data.held_out is None or recorded == data.held_out or not isinstance(trained_on, dict):
        return None
    if str(Path(dataset).expanduser().resolve()) != trained_on.get("dataset"):
        return None
    return (f"the data's hold-out is not the one {name} was trained with (images were added, "
            f"removed or renamed since): its 'val' split may hold images the model trained on")


def load_eval_split(ckpt: Checkpoint, path: str | Path, dataset: str | None, split: str,
                    data_dir: str | None) -> tuple[ImageData, str, str | None]:
    """(data, dataset, note): `split` of `dataset` when given; else of the dataset the
    checkpoint was trained on, as its run recorded it (absolute paths), with a note saying so."""
    note = None
    if dataset is None:
        recorded = ckpt.info.get("dataset")
        dataset = recorded.get("dataset") if isinstance(recorded, dict) else None
        if not isinstance(dataset, str) or not dataset:
            raise MmlitError(f"--dataset is required: {path} does not record the dataset it was trained on "
                             f"(a name such as cifar10, or an image folder)")
        recorded_dir = recorded.get("data_dir")
        if data_dir is None and isinstance(recorded_dir, str):
            data_dir = recorded_dir
        where = f" in {recorded_dir}" if recorded_dir and data_dir == recorded_dir else ""
        note = f"no --dataset: using {dataset}{where}, the dataset {Path(path).name} was trained on"
    try:
        data = checkpoint_split(ckpt, dataset, split, data_dir)
    except MmlitError as e:
        if note is None:
            raise
        raise MmlitError(f"{e} (the dataset {Path(path).name} was trained on; pass --dataset)") from None
    return data, dataset, note


@dataclass
class EvalReport:
    result: EvalResult
    classes: list[str]
    source: str
    dataset_note: str | None = None  # set when the dataset is the checkpoint's own (no --dataset)
    split: str = "val"
    step: int = 0  # the checkpoint's epoch: where the figures go on TensorBoard's x axis (as a run's)
    skipped: list[str] = field(default_factory=list)  # undecodable files of the split, not scored
    warnings: list[str] = field(default_factory=list)  # said on stderr, and in the JSON

    def as_dict(self) -> dict:
        """JSON-ready: the figures (percent), `per_class` accuracy (= recall), per-class
        `precision` and `recall` (null where a class has no images, or no predictions), and
        `images` per class."""
        r = self.result
        recall = dict(zip(self.classes, r.per_class_accuracy()))
        return {**r.as_dict(), "per_class": recall, "recall": recall,
                "precision": dict(zip(self.classes, r.per_class_precision())),
                "images": dict(zip(self.classes, r.per_class_images())), "images_per_s": self.images_per_s,
                "skipped": self.skipped, "warnings": self.warnings}

    @property
    def images_per_s(self) -> float:
        return self.result.num_images / max(self.result.seconds, 1e-9)


def match_classes(data: ImageData, ckpt_classes: list[str], num_classes: int, dataset: str,
                  by_position: bool = False) -> tuple[ImageData, str | None]:
    """The data with labels that mean what the checkpoint's outputs mean, and a note on how
    they were matched (None when the class lists are the same).

    Classes are matched by name: the same names in another order, or some of them (a test
    folder without a class: that class has no images), are relabelled; a name the checkpoint
    does not have is an error, since counting matches would score shifted labels.
    `by_position` accepts a relabelled dataset (same count, other names) and takes its
    classes in order. A checkpoint without names: only the count can be checked.
    """
    if not ckpt_classes or data.classes == ckpt_classes:
        if len(data.classes) != num_classes:
            raise MmlitError(f"the checkpoint predicts {num_classes} classes but {dataset} has {len(data.classes)}")
        return data, None
    ckpt_set, data_set = set(ckpt_classes), set(data.classes)
    extra = [repr(c) for c in data.classes if c not in ckpt_set]
    missing = [repr(c) for c in ckpt_classes if c not in data_set]
    if not extra:
        index = {c: i for i, c in enumerate(ckpt_classes)}
        to_ckpt = torch.tensor([index[c] for c in data.classes])
        relabelled = ImageData(data.images, to_ckpt[data.labels], list(ckpt_classes), data.source, data.skipped,
                               data.held_out)
        if missing:
            return relabelled, (f"classes matched by name: {len(data.classes)} of the checkpoint's {len(ckpt_classes)} "
                                f"({listed(missing)} not in {dataset}: no images)")
        return relabelled, "classes matched by name (the dataset lists them in another order)"
    if by_position:
        if len(data.classes) != num_classes:
            raise MmlitError(f"--classes-by-position: the checkpoint predicts {num_classes} classes but {dataset} "
                             f"has {len(data.classes)}")
        pairs = [f"{d!r} = {c!r}" for d, c in zip(data.classes, ckpt_classes) if d != c]
        return data, f"classes taken by position (--classes-by-position): {listed(pairs)}"
    if not missing:
        raise MmlitError(f"{dataset} has the checkpoint's {len(ckpt_classes)} classes and {listed(extra)}, which it "
                         f"does not predict: leave {'that class' if len(extra) == 1 else 'those'} out of the data to "
                         f"score the rest")
    raise MmlitError(f"{dataset} has {listed(extra)} where the checkpoint has {listed(missing)}: the class "
                     f"names differ, so its labels would not mean what the model predicts (rename them, or "
                     f"pass --classes-by-position to score the classes in order anyway)")


def check_split(split: str) -> None:
    """eval's and benchmark's --split."""
    if split not in EVAL_SPLITS:
        raise MmlitError(f"--split must be val, test, train or all, got '{split}'")


def evaluate_checkpoint(ckpt_path: str | Path, dataset: str | None, split: str = "val", data_dir: str | None = None,
                        batch_size: int = 256, device: str = "auto", workers: int = 0, compile: bool = False,
                        compile_mode: str | None = None, classes_by_position: bool = False) -> EvalReport:
    """Evaluate a classifier checkpoint on a dataset split. `compile` / `compile_mode`:
    `torch.compile` the model first (see `runtime.maybe_compile`); it pays off on large splits.
    The dataset's classes must be the checkpoint's, by name (`match_classes`); without a
    `dataset`, the one the checkpoint was trained on (`load_eval_split`)."""
    check_split(split)
    if batch_size <= 0:
        raise MmlitError(f"--batch-size must be positive, got {batch_size}")
    dev = resolve_device(device)
    model, ckpt = load_classifier(ckpt_path, dev)
    runner = maybe_compile(model, compile, compile_mode)
    cfg = ckpt.config
    data, dataset, dataset_note = load_eval_split(ckpt, ckpt_path, dataset, split, data_dir)
    data, note = match_classes(data, ckpt.classes, cfg.model.num_classes, dataset, classes_by_position)
    classes = ckpt.classes or data.classes
    warnings = [w for w in (skipped_warning(data.skipped), held_out_warning(ckpt, data, dataset, Path(ckpt_path).name)) if w]
    # a batch larger than the split is the whole split (and a typo's 10**20 no index overflow)
    loader = build_loader(data, min(batch_size, max(len(data), 1)), None, workers=workers)
    amp = amp_dtype(dev)
    result = evaluate_classifier(runner, loader, dev, cfg.data.mean, cfg.data.std, amp, cfg.model.num_classes)
    return EvalReport(result, classes, data.source if note is None else f"{data.source}; {note}", dataset_note,
                      split, int(ckpt.info.get("epoch", 0)), data.skipped, warnings)


def write_eval_files(report: EvalReport, out_dir: Path) -> tuple[Path | None, str | None]:
    """confusion.png into `out_dir`, and with TensorBoard an event file holding the figures
    (as `<split>/top1`, ... at the checkpoint's epoch) and the confusion matrix. Returns the
    PNG's path, or None and why there is none (no matplotlib)."""
    from .events import open_event_log
    from .plots import PlotUnavailable, plot_confusion

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        confusion, note = plot_confusion(report.result.confusion, report.classes, out_dir / "confusion.png"), None
    except PlotUnavailable as e:
        confusion, note = None, str(e)
    events = open_event_log(out_dir)
    if events is not None:
        r = report.result
        figures = {k: v for k, v in r.as_dict().items() if k != "num_images"}
        events.scalars({f"{report.split}_{k}": v for k, v in figures.items()}, report.step)
        if confusion is not None:
            events.png(f"{report.split}/confusion", confusion, report.step)
        events.text("source", report.source)
        events.close()
    return confusion, note
