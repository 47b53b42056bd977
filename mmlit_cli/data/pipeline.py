"""A run's training and validation loaders: which path (`loader: auto|device|workers`) and
the loaders themselves, so the trainer only asks for batches.

`device` (`DeviceLoader` + `BatchAugment`) keeps the decoded split on the training device;
`workers` (`build_loader` + `build_train_transform`) augments image by image in a DataLoader.
`auto` resolves to one of them for the device and the split's size (`choose_loader`).
"""

from __future__ import annotations

import torch

from .augment import build_train_transform
from .batch_augment import BatchAugment
from .device_loader import DeviceLoader
from .loader import build_loader
from .splits import ImageData

# The decoded splits may take up to this share of a GPU's free memory; the model, its
# activations and the optimizer state need the rest (an s step at batch 1024 takes ~3 GB).
DEVICE_MEMORY_SHARE = 0.25


def choose_loader(device: torch.device, nbytes: int) -> tuple[str, str]:
    """What `loader: auto` means on `device` for `nbytes` of decoded images: ("device" or
    "workers", the reason in words)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= DEVICE_MEMORY_SHARE * free:
            return "device", f"the split ({nbytes / 2**20:.0f} MB) is on the GPU"
        return "workers", (f"the split ({nbytes / 2**20:.0f} MB) is over {DEVICE_MEMORY_SHARE:.0%} of the GPU's "
                           f"free memory: loader workers")
    if device.type == "cpu":
        # the images are in memory already; batched augmentation costs a fraction of per-image
        # transforms in worker processes, which compete with the model for the same cores
        # (docs/BENCHMARKS.md, "Data and augmentation on the device")
        return "device", "batched in the training process"
    return "workers", f"loader workers (the device-resident path is not tested on {device.type})"


def resolve_loader(loader: str, workers: int, device: torch.device, train: ImageData,
                   val: ImageData | None) -> tuple[str, str]:
    """(`loader` with "auto" resolved for `device` and these splits, the choice in words)."""
    if loader == "device":
        return loader, "data on the device"
    if loader == "workers":
        return loader, f"{workers} loader workers"
    nbytes = train.images.nbytes + (val.images.nbytes if val is not None else 0)
    kind, why = choose_loader(device, nbytes)
    return kind, f"data on the device ({why})" if kind == "device" else why


def build_loaders(recipe, image_size: int, train: ImageData, val: ImageData | None, device: torch.device,
                  rank: int = 0, world_size: int = 1, distributed: bool = False):
    """(training loader: shuffled, augmented by `recipe.augment`, sharded over `world_size`
    processes; validation loader: this rank's disjoint share, or None without validation
    images; class-balanced when `recipe.class_balance` is "sampler"). `recipe` is a
    `TrainConfig` whose `loader` is resolved (device or workers);
    `distributed`: under a process group (the worker path then shards with its sampler)."""
    drop_last = len(train.labels) >= recipe.batch_size * world_size
    on_device = recipe.loader == "device"
    balanced = recipe.class_balance == "sampler" and bool((train.labels >= 0).all())  # needs labels
    if on_device:
        augment = BatchAugment.from_config(recipe.augment, image_size)
        train_loader = DeviceLoader(train, recipe.batch_size, device, augment, shuffle=True, drop_last=drop_last,
                                    seed=recipe.seed, rank=rank, world_size=world_size, balanced=balanced)
    else:
        transform = build_train_transform(recipe.augment, image_size)
        train_loader = build_loader(train, recipe.batch_size, transform, shuffle=True, workers=recipe.workers,
                                    drop_last=drop_last, seed=recipe.seed, distributed=distributed,
                                    balanced=balanced)
    if val is None or len(val.labels) == 0:
        return train_loader, None
    if world_size > 1:  # every rank takes an exact, disjoint share; sums are all-reduced
        val = ImageData(val.images[rank::world_size], val.labels[rank::world_size], val.classes, val.source, [])
    if on_device:
        return train_loader, DeviceLoader(val, recipe.batch_size * 2, device)
    return train_loader, build_loader(val, recipe.batch_size * 2, None, workers=0)
