"""Using a trained checkpoint: rebuild the model from its metadata and evaluate it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, load_checkpoint
from .data import build_loader, load_split
from .engine import amp_dtype, maybe_compile, resolve_device
from .errors import CheckpointError, MmlitError
from .metrics import EvalResult, evaluate_classifier
from .model import MLiT


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


@dataclass
class EvalReport:
    result: EvalResult
    classes: list[str]
    source: str

    def as_dict(self) -> dict:
        per_class = dict(zip(self.classes, self.result.per_class_accuracy()))
        return {**self.result.as_dict(), "per_class": per_class, "images_per_s": self.images_per_s}

    @property
    def images_per_s(self) -> float:
        return self.result.num_images / max(self.result.seconds, 1e-9)


def evaluate_checkpoint(ckpt_path: str | Path, dataset: str, split: str = "val", data_dir: str | None = None,
                        batch_size: int = 256, device: str = "auto", workers: int = 0, compile: bool = False,
                        compile_mode: str | None = None) -> EvalReport:
    """Evaluate a classifier checkpoint on a dataset split. `compile` / `compile_mode`:
    `torch.compile` the model first (see `engine.maybe_compile`); it pays off on large splits."""
    if split not in ("train", "val", "test"):
        raise MmlitError(f"--split must be train, val or test, got '{split}'")
    if batch_size <= 0:
        raise MmlitError(f"--batch-size must be positive, got {batch_size}")
    dev = resolve_device(device)
    model, ckpt = load_classifier(ckpt_path, dev)
    runner = maybe_compile(model, compile, compile_mode)
    cfg = ckpt.config
    data = load_split(dataset, split, cfg.model.image_size, data_dir=data_dir, val_fraction=cfg.data.val_fraction)
    if len(data.classes) != cfg.model.num_classes:
        raise MmlitError(f"the checkpoint predicts {cfg.model.num_classes} classes but {dataset} has "
                         f"{len(data.classes)}")
    classes = ckpt.classes or data.classes
    loader = build_loader(data, batch_size, None, workers=workers)
    amp = amp_dtype(dev)
    result = evaluate_classifier(runner, loader, dev, cfg.data.mean, cfg.data.std, amp, cfg.model.num_classes)
    return EvalReport(result, classes, data.source)
