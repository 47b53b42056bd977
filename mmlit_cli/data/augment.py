"""Augmentation, batch mixing and normalisation.

Images stay uint8 up to the device: per-sample augmentation (`build_train_transform`, run by
the loader's workers) works on uint8 CHW images; the trainer normalises each batch on the
device (`Normalize`), then applies the optional batch-level MixUp/CutMix (`build_batch_mix`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import DataError

if TYPE_CHECKING:
    from ..config import AugmentConfig


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

class RandomErasingUint8(torch.nn.Module):
    """RandomErasing for uint8 CHW images: the erased box is filled with uniform uint8 noise.

    (torchvision's `value="random"` draws Gaussian noise, which does not fit uint8.)
    """

    def __init__(self, p: float, scale: tuple[float, float] = (0.02, 1 / 3),
                 ratio: tuple[float, float] = (0.3, 3.3)) -> None:
        super().__init__()
        self.p, self.scale = p, scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or torch.rand(()).item() >= self.p:
            return img
        c, h, w = img.shape[-3:]
        area = h * w
        for _ in range(10):
            target = area * torch.empty(()).uniform_(*self.scale).item()
            aspect = math.exp(torch.empty(()).uniform_(*self.log_ratio).item())
            eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < eh < h and 0 < ew < w:
                i = int(torch.randint(0, h - eh + 1, ()).item())
                j = int(torch.randint(0, w - ew + 1, ()).item())
                out = img.clone()
                out[..., i:i + eh, j:j + ew] = torch.randint(0, 256, (*img.shape[:-2], eh, ew),
                                                             dtype=img.dtype)
                return out
        return img

    def extra_repr(self) -> str:
        return f"p={self.p}, scale={self.scale}, fill=uniform uint8 noise"


def build_train_transform(aug: AugmentConfig, image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-sample augmentation of one uint8 CHW image (torchvision transforms v2) -> uint8 CHW."""
    from torchvision.transforms import v2

    steps: list[Callable] = []
    if aug.crop_padding > 0:
        mode = "reflect" if aug.crop_padding < image_size else "constant"
        steps.append(v2.RandomCrop(image_size, padding=aug.crop_padding, padding_mode=mode))
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.auto_augment not in ("trivial", "rand", "none"):
        raise DataError(f"unknown auto_augment {aug.auto_augment!r}: use trivial, rand or none")
    if aug.auto_augment != "none" and aug.auto_augment_prob > 0:
        op = v2.TrivialAugmentWide() if aug.auto_augment == "trivial" else \
            v2.RandAugment(num_ops=aug.randaug_num_ops, magnitude=aug.randaug_magnitude)
        steps.append(op if aug.auto_augment_prob >= 1 else v2.RandomApply([op], p=aug.auto_augment_prob))
    if aug.random_erasing > 0:
        steps.append(RandomErasingUint8(aug.random_erasing))
    return v2.Compose(steps) if steps else v2.Identity()


# --------------------------------------------------------------------------------------------
# Batch mixing (MixUp / CutMix)
# --------------------------------------------------------------------------------------------

class _BatchMix:
    """MixUp / CutMix on a normalized float batch, applied with probability `prob`."""

    def __init__(self, mix: Callable, prob: float, num_classes: int) -> None:
        self.mix, self.prob, self.num_classes = mix, prob, num_classes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = images.dtype if images.is_floating_point() else torch.float32
        if self.prob >= 1.0 or torch.rand(()).item() < self.prob:
            images, targets = self.mix(images, labels)
            return images, targets.to(dtype)
        return images, F.one_hot(labels.long(), self.num_classes).to(dtype)

    def __repr__(self) -> str:
        return f"BatchMix(prob={self.prob}, {self.mix})"


def build_batch_mix(aug: AugmentConfig, num_classes: int
                    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """Batch-level MixUp/CutMix returning soft targets [B, num_classes]; None when disabled."""
    from torchvision.transforms import v2

    if aug.mix_prob <= 0 or (aug.mixup_alpha <= 0 and aug.cutmix_alpha <= 0):
        return None
    if num_classes < 2:
        raise ValueError(f"batch mixing needs at least 2 classes, got {num_classes}")
    ops = []
    if aug.mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=aug.mixup_alpha, num_classes=num_classes))
    if aug.cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=aug.cutmix_alpha, num_classes=num_classes))
    mix = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
    return _BatchMix(mix, float(aug.mix_prob), num_classes)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

class Normalize(torch.nn.Module):
    """uint8 [B, 3, S, S] (or [3, S, S]) -> float32 (x/255 - mean) / std.

    The mean/std tensors belong to this module and are made once, on `device`, by whoever
    normalises many batches (the trainer, an evaluation, the exported graph): no small
    host-to-device copies per step. There is deliberately no process-wide cache of them: a
    cache filled while `torch.export` (the ONNX exporter) traces would hand the tracer's
    tensors to every later eager call in the process.

    Floating-point input is taken to be already scaled to [0, 1].
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str | None = None):
        super().__init__()
        shape = (-1, 1, 1)
        self.register_buffer("mean", torch.tensor([float(m) for m in mean], dtype=torch.float32,
                                                  device=device).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std], dtype=torch.float32,
                                                 device=device).view(shape), persistent=False)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8
        x = x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
        return x.sub_(self.mean).div_(self.std)


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`Normalize(mean, std)` applied once, on the input's device. For one-off calls; a loop
    over many batches keeps one `Normalize` instead (see there)."""
    return Normalize(mean, std, images_uint8.device)(images_uint8)
