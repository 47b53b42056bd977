"""What is trained: one class per task, found by the command that trains it (`TASKS`).

A task says what its model is, what its loss is, how it is validated, which validation
figure picks best.safetensors (`monitor`, and `higher_is_better`), and what it does at the
end of an epoch besides that. The engine (`engine.py`) does the rest, the same for both.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import Config
from .data import build_batch_mix
from .metrics import evaluate_classifier, evaluate_mae


class ClassifyTask:
    """Supervised classification with mixup/cutmix targets and label smoothing."""

    command = "finetune"  # the command that trains it; its recipe is the config section of that name
    kind = "classify"  # the task a checkpoint records
    needs_labels = True
    monitor = "val_top1"  # the validation figure that picks best.safetensors
    higher_is_better = True

    def __init__(self, cfg: Config, classes: list[str], class_counts: list[int] | None = None):
        from .model import MLiT

        self.cfg, self.classes = cfg, classes
        self.model = MLiT(cfg.model)
        self.recipe = cfg.finetune
        self.mix = build_batch_mix(self.recipe.augment, cfg.model.num_classes)
        self.confusion: torch.Tensor | None = None  # of the last validation
        # --class-balance loss: the training split's class frequencies, into the loss
        self.logit_shift, self.class_weight = None, None
        if self.recipe.class_balance == "loss" and class_counts:
            counts = torch.tensor(class_counts, dtype=torch.float32).clamp_min(1)
            if self.recipe.balance_loss == "logit-adjust":
                self.logit_shift = (counts / counts.sum()).log()
            else:
                self.class_weight = counts.sum() / (len(counts) * counts)

    @staticmethod
    def fit_config(cfg: Config, num_classes: int) -> Config:
        """The config of a new run on data of `num_classes` classes: the head gets them."""
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))

    @property
    def init_target(self) -> torch.nn.Module:
        """What `--init` loads a checkpoint's weights into."""
        return self.model

    def loss(self, model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        else:
            targets = labels
        logits = model(images).float()
        if self.logit_shift is not None:  # trained on the prior-adjusted logits; predicts with the plain ones
            self.logit_shift = self.logit_shift.to(logits.device)  # once: on CUDA each copy would sync
            logits = logits + self.logit_shift
        if self.class_weight is not None:
            self.class_weight = self.class_weight.to(logits.device)
        loss = F.cross_entropy(logits, targets, weight=self.class_weight, label_smoothing=self.recipe.label_smoothing)
        aux = self.model.aux_loss()
        return loss if aux is None else loss + aux

    def validate(self, model, loader, device, amp_dtype) -> dict[str, Any]:
        r = evaluate_classifier(model, loader, device, self.cfg.data.mean, self.cfg.data.std, amp_dtype,
                                self.cfg.model.num_classes)
        self.confusion = r.confusion
        return {"val_loss": r.loss, "val_top1": r.top1, "val_top5": r.top5,
                "val_balanced_accuracy": r.balanced_accuracy, "val_macro_f1": r.macro_f1,
                "expert_usage": r.expert_usage}

    def after_epoch(self, model, loader, device, out_dir: Path) -> str | None:
        """Nothing besides validation: a classifier's figures are its metrics."""
        return None

    def epoch_images(self, out_dir: Path) -> dict[str, torch.Tensor]:
        """The last validation's confusion matrix, for TensorBoard (needs matplotlib)."""
        from .plots import confusion_image

        if self.confusion is None:
            return {}
        names = self.classes if len(self.classes) == self.confusion.shape[0] else []  # else indices
        return {"val/confusion": confusion_image(self.confusion, names)}


class MAETask:
    """Masked auto-encoder pre-training; validation is the reconstruction loss."""

    command = "pretrain"
    kind = "mae"
    needs_labels = False  # a folder of unlabelled images will do
    monitor = "val_loss"
    higher_is_better = False

    def __init__(self, cfg: Config, classes: list[str], class_counts: list[int] | None = None):
        from .mae import MaskedAutoencoder  # (class_counts: pre-training has no classes to balance)

        self.cfg, self.classes = cfg, classes
        self.model = MaskedAutoencoder(cfg.model, cfg.mae)
        self.recipe = cfg.pretrain

    @staticmethod
    def fit_config(cfg: Config, num_classes: int) -> Config:
        return cfg

    @property
    def init_target(self) -> torch.nn.Module:
        return self.model.encoder

    def loss(self, model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, _, _ = model(images)
        aux = self.model.aux_loss()
        return loss if aux is None else loss + aux

    def validate(self, model, loader, device, amp_dtype) -> dict[str, Any]:
        loss, usage = evaluate_mae(model, loader, device, self.cfg.data.mean, self.cfg.data.std, amp_dtype)
        return {"val_loss": loss, "expert_usage": usage}

    def after_epoch(self, model, loader, device, out_dir: Path) -> str | None:
        """reconstruction.png, from the first images of `loader`; returns a line saying so."""
        from .plots import plot_reconstruction

        images = next(iter(loader))[0][:8]
        path = plot_reconstruction(model, images, self.cfg, device, out_dir / "reconstruction.png")
        return f"reconstructions (rows: original, masked, reconstruction): {path}"

    def epoch_images(self, out_dir: Path) -> dict[str, torch.Tensor]:
        """The reconstructions `after_epoch` drew, for TensorBoard."""
        from .events import read_png

        path = out_dir / "reconstruction.png"
        return {"val/reconstruction": read_png(path)} if path.exists() else {}


TASKS = {task.command: task for task in (ClassifyTask, MAETask)}
