"""Datasets, augmentation and loaders.

`load_split` reads a named dataset in its official on-disk layout (or an image folder) and
decodes every image exactly once into one uint8 tensor `[N, 3, S, S]`. Images stay uint8 all
the way through the `DataLoader` (per-sample augmentation works on uint8 too); the trainer
normalises them on the device (`Normalize`), then applies the optional batch-level
MixUp/CutMix.

The modules, bottom up:

    splits.py     ImageData; the stratified hold-out and how a split is carved
    decode.py     files (Pillow, a process pool) and arrays -> uint8 [N, 3, S, S]
    formats.py    CIFAR pickles (safe unpickler) and binaries, .mat, idx, text files
    datasets.py   the named datasets (the bundled sample too), their downloads, and the registry NAMED_LOADERS
    folders.py    image folders: class sub-folders, train/val/test layouts
    registry.py   load_split: a name or a folder -> ImageData
    augment.py    per-sample augmentation (one image, loader workers), MixUp/CutMix, Normalize
    batch_augment.py  the same per-sample augmentation for a whole batch, on its device
    loader.py     the dataset, samplers (order and augmentation seeds) and the DataLoader
    device_loader.py  batches of a split held on the training device (no workers)
    pipeline.py   a run's loaders: which path (auto/device/workers), then both loaders

Reading rules worth knowing:

* CIFAR pickles are read with a restricted unpickler that only rebuilds numpy arrays;
  anything else in a pickle is refused with a `DataError`.
* Non-square images are resized aspect-preserving (shorter side to S, then a centre crop),
  square ones are simply resized; nothing is resized when it already has the right size.
* Datasets without a validation split (cifar10, cifar100, svhn, fashion-mnist, image folders
  without val/) hold a deterministic stratified part of the training split out for
  validation (per class, seed 0, independent of the training seed), so that model selection
  never looks at the test split; `holdout=False` (the paper protocol) holds nothing out.
"""

from ..errors import DataError
from .batch_augment import BatchAugment
from .device_loader import DeviceLoader
from .augment import Normalize, RandomErasingUint8, build_batch_mix, build_train_transform, normalize
from .decode import decode_files, decode_one, fit_image, to_rgb, usable_cpus
from .formats import read_idx
from .loader import AugmentedImages, EpochSampler, build_loader, sample_seed, set_epoch, shut_down_workers
from .pipeline import build_loaders, choose_loader, resolve_loader
from .datasets import SAMPLE_DIR
from .registry import (DATASET_NAMES, canonical_name, default_data_dir, is_sample, load_split, split_size,
                       train_split_size)
from .splits import EVAL_SPLITS, SPLITS, ImageData, skipped_warning

__all__ = [
    "DATASET_NAMES", "ImageData", "load_split", "build_train_transform", "build_batch_mix",
    "normalize", "Normalize", "AugmentedImages", "build_loader", "set_epoch", "shut_down_workers", "default_data_dir",
    "BatchAugment", "DeviceLoader", "choose_loader", "resolve_loader", "build_loaders", "usable_cpus",
    # also public: what predict decodes files with, and the parts tests and tools use
    "DataError", "EVAL_SPLITS", "SPLITS", "decode_files", "decode_one", "fit_image", "to_rgb", "read_idx", "sample_seed",
    "EpochSampler", "RandomErasingUint8", "SAMPLE_DIR", "canonical_name", "is_sample", "split_size",
    "train_split_size", "skipped_warning",
]
