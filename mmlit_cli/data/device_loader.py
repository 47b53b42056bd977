"""Batches of a split that lives on the training device: no loader workers, no copies.

A decoded split is small (CIFAR at 36 px: 45,000 images = 175 MB), so it is moved to the
device once; each epoch is then an index permutation drawn there, each batch an index
gather, and per-sample augmentation runs on the whole batch (`BatchAugment`). On a GPU this
takes the CPU out of the step; on a CPU it replaces ~300 us of per-image transforms by a few
batched ops.

Order and augmentation depend on (seed, epoch, batch index, rank) and the kind of device only:
- every process draws the same permutation of the split (seed, epoch) and takes its own
  share (`rank::world_size`), as `DistributedSampler` does;
- batch i of an epoch is augmented from a generator seeded with (seed, epoch, i, rank), so a
  resumed run starts at any batch without replaying the ones before it.
The generators are the device's, and a CPU's and a GPU's draw different numbers from one seed,
so a run resumed mid-epoch on another kind of device takes the rest of that epoch in another
order (some images twice, some not at all).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .batch_augment import BatchAugment
from .loader import balanced_order, class_balanced_weights, epoch_seed, sample_seed
from .splits import ImageData


class DeviceLoader:
    """Iterable of (uint8 images [B, 3, S, S], int64 labels [B]) on `device`.

    Call `set_epoch(e)` before each epoch (shuffle order and augmentation); `batches(start)`
    yields the epoch's batches from batch `start` on.
    """

    def __init__(self, data: ImageData, batch_size: int, device: torch.device | str,
                 augment: BatchAugment | None = None, shuffle: bool = False, drop_last: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1, balanced: bool = False) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.batch_size, self.augment, self.shuffle, self.drop_last = batch_size, augment, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # class-balanced epochs: indices drawn with replacement, each class equally likely
        self.weights = class_balanced_weights(data.labels).to(self.device) if balanced else None
        self.epoch = 0
        self._generator = torch.Generator(device=self.device)
        n = len(self.labels)
        # this process's share, as DistributedSampler takes it: drop_last trims the split to a
        # multiple of world_size, otherwise the first images are repeated to fill the last round
        self.per_rank = n // world_size if drop_last else -(-n // world_size)

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> torch.Tensor:
        """This process's indices for the epoch, on the device."""
        n = len(self.labels)
        if self.weights is not None:
            order = balanced_order(self.weights, self.seed, self.epoch, self.device)
        elif self.shuffle:
            self._generator.manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=self._generator, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        total = self.per_rank * self.world_size
        if total > n:  # pad by repeating from the start
            order = torch.cat([order, order[: total - n]])
        return order[self.rank:total:self.world_size]

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        for i in range(start, len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            images = self.images[index]
            if self.augment is not None:
                # one generator per batch: independent of every batch before it
                self._generator.manual_seed(sample_seed(self.seed, self.epoch, i * self.world_size + self.rank))
                images = self.augment(images, self._generator)
            yield images, self.labels[index]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(0)
