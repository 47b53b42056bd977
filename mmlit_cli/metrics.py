"""Evaluation over a loader: a classifier's loss, top-1/top-5, confusion matrix and expert
usage; an MAE's reconstruction loss. Used by `eval` and by validation during training."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import Normalize
from .runtime import forward_batch, rng_devices, unwrap_model


@dataclass
class EvalResult:
    loss: float
    top1: float  # percent
    top5: float  # percent
    num_images: int
    confusion: torch.Tensor  # [C, C] int64, rows = true class, columns = predicted
    expert_usage: list[list[float]]
    seconds: float

    def per_class_accuracy(self) -> list[float | None]:
        """Recall of each class, percent; None for a class with no images (it has no accuracy:
        0 read as "never right")."""
        return _shares(self.confusion.diag(), self.confusion.sum(1))

    def per_class_precision(self) -> list[float | None]:
        """Of the images predicted as each class, the share that is, percent; None for a class
        never predicted."""
        return _shares(self.confusion.diag(), self.confusion.sum(0))

    def per_class_images(self) -> list[int]:
        return self.confusion.sum(1).tolist()

    @property
    def balanced_accuracy(self) -> float:
        """Mean recall over the classes that have images, percent (scikit-learn's
        `balanced_accuracy_score`): every class counts the same, however many images it has."""
        recall = [r for r in self.per_class_accuracy() if r is not None]
        return sum(recall) / len(recall) if recall else 0.0

    @property
    def macro_f1(self) -> float:
        """Mean F1 over the classes that have images or predictions, percent (scikit-learn's
        `f1_score(average="macro", zero_division=0)`)."""
        tp = self.confusion.diag().double()
        support, predicted = self.confusion.sum(1).double(), self.confusion.sum(0).double()
        seen = (support + predicted) > 0
        f1 = 2 * tp / (support + predicted).clamp_min(1)  # = 2PR / (P + R)
        return float(100.0 * f1[seen].mean()) if seen.any() else 0.0

    def as_dict(self) -> dict:
        return {"loss": self.loss, "top1": self.top1, "top5": self.top5, "balanced_accuracy": self.balanced_accuracy,
                "macro_f1": self.macro_f1, "num_images": self.num_images}


def _shares(hits: torch.Tensor, totals: torch.Tensor) -> list[float | None]:
    return [None if n == 0 else 100.0 * h / n for h, n in zip(hits.tolist(), totals.tolist())]


class ClassifierMeter:
    """Accumulates sums on the device; the host reads them once, after the last batch."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels.unsqueeze(1)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        self.sums += torch.stack([loss.double(), hit[:, 0].sum().double(), hit.any(1).sum().double(),
                                  torch.full((), float(labels.numel()), dtype=torch.float64, device=labels.device)])
        # index_add_, not bincount: bincount reads the max back to the host to size its output
        self.confusion.index_add_(0, labels * self.num_classes + top[:, 0], torch.ones_like(labels))

    def all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.sums)
            torch.distributed.all_reduce(self.confusion)


@torch.inference_mode()
def evaluate_classifier(model: torch.nn.Module, loader, device: torch.device, mean, std,
                        amp_dtype: torch.dtype | None = None, num_classes: int | None = None) -> EvalResult:
    """Run `model` over `loader` (uint8 images) and gather every figure `eval` shows."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    core = unwrap_model(model)
    core.set_usage_tracking(True)
    meter = ClassifierMeter(num_classes or core.cfg.num_classes, device)
    normalize = Normalize(mean, std, device)
    for images, labels in loader:
        logits = forward_batch(model, images, normalize, device, amp_dtype)
        meter.update(logits, labels.to(device, non_blocking=True))
    meter.all_reduce()
    usage = finish_usage_tracking(core)
    model.train(was_training)
    loss, top1, top5, count = meter.sums.tolist()
    count = max(count, 1.0)
    C = meter.num_classes
    return EvalResult(loss / count, 100 * top1 / count, 100 * top5 / count, int(count),
                      meter.confusion.view(C, C).cpu(), usage, time.perf_counter() - start)


@torch.inference_mode()
def evaluate_mae(model: torch.nn.Module, loader, device: torch.device, mean, std,
                 amp_dtype: torch.dtype | None = None) -> tuple[float, list[list[float]]]:
    """(mean reconstruction loss, expert usage) of a masked auto-encoder over `loader`. The masks
    come from a fixed seed in a forked generator: the same masks every epoch, so validation
    losses are comparable, and the caller's random stream is left as it was."""
    was_training = model.training
    model.eval()
    encoder = unwrap_model(model).encoder
    encoder.set_usage_tracking(True)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    normalize = Normalize(mean, std, device)
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(1234)
        for images, _ in loader:
            loss, _, _ = forward_batch(model, images, normalize, device, amp_dtype)
            total += torch.stack([loss.double() * images.shape[0],
                                  torch.full((), float(images.shape[0]), dtype=torch.float64, device=device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    usage = finish_usage_tracking(encoder)
    model.train(was_training)
    loss_sum, count = total.tolist()
    return loss_sum / max(count, 1.0), usage


def finish_usage_tracking(encoder) -> list[list[float]]:
    """Expert usage since `set_usage_tracking(True)`, summed over DDP ranks; tracking off again."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for m in encoder.moe_layers():
            torch.distributed.all_reduce(m.expert_counts)
    usage = encoder.expert_usage()
    encoder.set_usage_tracking(False)
    return usage


def collapsed_layers(usage: list[list[float]], threshold: float = 0.01) -> list[int]:
    """Layers where some expert receives almost no tokens (the others took everything)."""
    return [i for i, shares in enumerate(usage) if shares and min(shares) < threshold]
