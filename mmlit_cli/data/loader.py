"""The dataset, its samplers and the loader.

Order and augmentation are a function of (seed, epoch, sample) only, whatever the number of
loader workers: the sampler hands each index its own augmentation seed (`sample_seed`).
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .splits import ImageData


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finalizer: a cheap, well-spread integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _epoch_key(seed: int, epoch: int) -> int:
    return _mix64(_mix64(seed & _MASK64) ^ (epoch & _MASK64))


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffle seed of one epoch."""
    return _epoch_key(seed, epoch) >> 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample in one epoch (independent of worker count)."""
    return _mix64(_epoch_key(seed, epoch) ^ (index & _MASK64)) >> 1


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


class AugmentedImages(Dataset):
    """(uint8 image, label) pairs from an `ImageData`, with an optional per-sample transform.

    An index may be a plain int, or `(index, seed)` as yielded by the loader's sampler: the
    transform then runs with the CPU generator seeded to `seed`, so augmentations depend only on
    (loader seed, epoch, sample) and not on the number of workers.
    """

    def __init__(self, data: ImageData, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.images = data.images
        self.labels = data.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        img = self.images[index]
        if self.transform is not None:
            if seed is None:
                img = self.transform(img) if _in_worker() else self._single_threaded(img)
            elif _in_worker():
                torch.default_generator.manual_seed(seed)  # a worker's RNG is its own
                img = self.transform(img)
            else:  # main process: do not disturb the caller's RNG stream
                state = torch.get_rng_state()
                torch.default_generator.manual_seed(seed)
                try:
                    img = self._single_threaded(img)
                finally:
                    torch.set_rng_state(state)
        return img, self.labels[index]

    def _single_threaded(self, img: torch.Tensor) -> torch.Tensor:
        # Tiny per-image ops gain nothing from intra-op threads, and on a busy machine the
        # thread pool's spinning made them 10x slower (workers already run with 1 thread).
        threads = torch.get_num_threads()
        if threads == 1:
            return self.transform(img)
        torch.set_num_threads(1)
        try:
            return self.transform(img)
        finally:
            torch.set_num_threads(threads)


class _ShuffleSampler(Sampler[int]):
    """Random permutation fixed by (seed, epoch), like DistributedSampler with one replica."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def class_balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """A drawing weight per image, 1 / its class's count: every class equally likely."""
    counts = torch.bincount(labels.cpu(), minlength=int(labels.max()) + 1 if len(labels) else 0).double()
    return (1.0 / counts.clamp_min(1))[labels.cpu()]


def balanced_order(weights: torch.Tensor, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An epoch's indices drawn with replacement by `weights` (as many as there are images),
    fixed by (seed, epoch): the same on every rank and on --resume."""
    g = torch.Generator(device=device)
    g.manual_seed(epoch_seed(seed, epoch))
    return torch.multinomial(weights.to(device), len(weights), replacement=True, generator=g)


class BalancedSampler(Sampler[int]):
    """Class-balanced indices for the DataLoader path (`balanced_order`), this rank's share."""

    def __init__(self, weights: torch.Tensor, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:
        self.weights, self.seed, self.rank, self.world_size = weights, seed, rank, world_size
        n = len(weights)
        self.per_rank = n // world_size if drop_last else -(-n // world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = balanced_order(self.weights, self.seed, self.epoch)
        total = self.per_rank * self.world_size
        order = torch.cat([order, order[: total - len(order)]]) if total > len(order) else order
        return iter(order[self.rank:total:self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank


class EpochSampler(Sampler):
    """Wraps the index sampler; yields `(index, sample seed)` when augmenting.

    `set_epoch(e)` fixes the epoch (shuffle order and augmentation seeds). If it is not called
    between two passes, the epoch advances by itself, so passes never silently repeat.
    """

    def __init__(self, base: Sampler, seed: int, with_seeds: bool) -> None:
        self.base, self.seed, self.with_seeds = base, seed, with_seeds
        self.epoch, self._used = 0, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._used = int(epoch), False
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(self.epoch)

    def __iter__(self):
        if self._used:
            self.set_epoch(self.epoch + 1)
        self._used = True
        epoch = self.epoch
        if self.with_seeds:
            return ((i, sample_seed(self.seed, epoch, i)) for i in self.base)
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _worker_init(worker_id: int) -> None:
    import random

    # Ctrl-C and SIGTERM are the training process's to handle (it saves, then shuts its workers
    # down): torchrun, schedulers and terminals signal the whole process group, and a worker
    # that died of it would end the run with "DataLoader worker killed", unsaved. The worker
    # started with them blocked (`_Loader`): one that came before now is dropped, as ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    seed = torch.initial_seed() % 2**32  # torch already gives each worker base_seed + id
    random.seed(seed)
    np.random.seed(seed)


class _Loader(DataLoader):
    """A DataLoader whose workers start with Ctrl-C and SIGTERM blocked until `_worker_init`
    ignores them: torch's worker loop sets a SIGTERM handler of its own before it calls
    `worker_init_fn`, and a signal to the group in that window killed a worker as the first
    epoch began ("DataLoader worker ... is killed by signal"), ending the run unsaved. The
    training process gets a signal that came meanwhile once its workers are started."""

    def __iter__(self):
        if not self.num_workers or not hasattr(signal, "pthread_sigmask"):  # (no signal masks on Windows)
            return super().__iter__()
        before = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


def build_loader(data: ImageData, batch_size: int, transform: Callable | None = None,
                 shuffle: bool = False, workers: int = 0, drop_last: bool = False, seed: int = 0,
                 distributed: bool = False, balanced: bool = False) -> DataLoader:
    """DataLoader of uint8 (images [B, 3, S, S], labels int64 [B]).

    Order and augmentation are a function of (seed, epoch) only, for any worker count; call
    `set_epoch(loader, e)` (or `loader.sampler.set_epoch(e)`) before each epoch. `balanced`:
    class-balanced batches, drawn with replacement (`BalancedSampler`).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dataset = AugmentedImages(data, transform)
    base: Sampler
    if balanced:
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        base = BalancedSampler(class_balanced_weights(data.labels), seed, rank, world, drop_last)
    elif distributed:
        base = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        base = _ShuffleSampler(len(dataset), seed)
    else:
        base = torch.utils.data.SequentialSampler(range(len(dataset)))
    sampler = EpochSampler(base, seed, with_seeds=transform is not None)
    g = torch.Generator()
    g.manual_seed(seed)
    return _Loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=drop_last, persistent_workers=workers > 0 and shuffle,  # a training's epochs
                      pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init,
                      generator=g)


def shut_down_workers(loader) -> None:
    """End a `build_loader` loader's persistent workers now (nothing for a `DeviceLoader`, or a
    loader without workers). They ignore SIGTERM (`_worker_init`), and multiprocessing's exit
    handler joins its children after sending them SIGTERM: a loader the garbage collector had
    not yet freed when the process ended held it forever, after "done:". torch keeps the
    persistent workers' iterator in `_iterator` (torch 2.11 to 2.14 at least), whose
    `_shutdown_workers` is what its own `__del__` calls."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def set_epoch(loader, epoch: int) -> None:
    """Fix the epoch of a loader from `build_loader`, or of a `DeviceLoader` (shuffle order
    and augmentation seeds)."""
    target = loader if hasattr(loader, "set_epoch") else getattr(loader, "sampler", None)
    if hasattr(target, "set_epoch"):
        target.set_epoch(epoch)
