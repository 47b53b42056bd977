"""Fit the preset's training recipe to the run it is used for.

A preset holds the paper's recipe for a paper-length run (`finetune.epochs: 300` on CIFAR:
10 warm-up epochs, TrivialAugment, mixup and cutmix on every batch, random erasing, drop
path). Squeezed into a short run, that recipe trains a much worse model than a plain loop:
the warm-up eats a large part of the run, and augmentation meant to stop 300 epochs of
over-fitting only slows down a model that has not fitted anything yet. So, unless the
recipe is `paper`, `fit_recipe` moves each setting from the plain loop's value (a short run)
to the preset's (a run of the preset's length) along one ramp, the run's strength

    s = log(epochs / (preset epochs / 15)) / log(15), clipped to [0, 1]

(0 up to 20 of 300 epochs, 1 from 300 on; over-fitting comes from seeing the same images
again, so the measure is epochs). Every setting is a continuous function of s or of the
run's optimisation steps, with no switch at any length:

    setting                          s = 0 (a short run)                s = 1 (the preset)  between
    batch (fine-tuning)              see below                          the preset's        -
    peak lr (fine-tuning)            2 x lr_base x batch / 256          lr_base x batch/256 geometric
    warm-up share (fine-tuning)      10 % (<= 100 steps), 30 % (>= 500) the preset's (1/30) geometric
    one_cycle_share, no_decay_share  1: one-cycle, decay on everything  0: cosine, timm's   1 - s
    grad_clip (fine-tuning)          off                                the preset's        preset's / s
    mixup/cutmix, erasing, drop path 0                                  the preset's        x s
    auto_augment_prob, RandAugment m 0                                  the preset's        x s
    crop padding, flip (fine-tuning) 0 at <= 2 epochs, preset's at >= 5 the preset's        x max(c, s)
    label smoothing                  the preset's                       the preset's        -

where c = log(epochs / 2) / log(5 / 2), clipped to [0, 1]: a run that sees each image once or
twice is far from over-fitting, and crop and flip only make its images harder to fit (+0.8
to +1.0 points without them on 45,000 CIFAR-10 images x 2 epochs); by 5 epochs they cost
nothing (docs/RESULTS.md). The ramp is in epochs for the same reason as s.

The batch (fine-tuning) is the one rule in images seen rather than in s: images x epochs /
1,500 a process (global batch: / processes), between 64 and the preset's batch (or the
device's, `fit_to_device`). A run that sees few images gets more, smaller steps, so that it
has 1,500 steps where it can (batch 64 instead of 128 gained 1.1 to 1.8 points at 2, 5, 10
and 15 epochs of 5,000 CIFAR-10 images and 2 of 45,000; 32 gained nothing more at 2 epochs,
docs/RESULTS.md). A run of
1,500 x 128 images or more (5,000 images x 39 epochs, 45,000 x 5) keeps the preset's 128.

Each is monotone in the run's length but two: the warm-up share, which rises with the steps of
a short run and falls towards the preset's with s (the warm-up in epochs only grows; in steps
it can fall where the batch rule holds a run near 1,500 steps while the share falls), and the
peak lr, the product of the lr per image (falling with s) and the batch (rising with the
images seen). At s = 0 the optimiser is the plain loop's that wins short runs.

With fewer training images than a global batch (and no batch set), the batch is all of them:
an epoch is that one step, and the lr follows the batch it has.

The learning rate always follows the global batch, the fitted one too: `lr = lr_base * batch *
processes / 256` (DeiT's and MAE's linear rule, `peak_lr`); `paper` runs it too. Pre-training
keeps the preset's optimiser (no batch rule, no short-run lr factor); its warm-up keeps the
preset's share of the run and its regularisers scale with s (the fine-tuning rules were
measured for fine-tuning). Every rule is measured against the plain loop (docs/RESULTS.md).

Before these rules, `fit_to_device` sets what the device decides (batch size and loader
workers on a CUDA GPU). A value the user set (`--lr`, `--batch-size`, `--set
finetune.augment.mixup_alpha=0.2`, ...) is kept as set (a warm-up longer than half the run is
capped at half, as the schedules run it), and the fitting does not turn off the
feature it belongs to: the keys without which it does nothing (here `mix_prob`) keep the
preset's values (`KEPT_FOR`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

from .config import AugmentConfig, Config, TrainConfig

LR_BASE_BATCH = 256
# Regularisation is off for runs up to this fraction of the preset's length: on CIFAR-10 at
# 15 of 300 epochs, the preset's regularisers still cost over 10 points (docs/RESULTS.md).
REGULARISE_FROM = 1 / 15
# The short-run end of rule 3, measured on CIFAR-10 (docs/RESULTS.md): the optimal lr falls
# as the run grows, so a short run under-trains at the lr tuned for 300 epochs; clipping at
# 1.0 caps the large gradients of every early step, an lr cut that the schedule does not show.
SHORT_RUN_LR_FACTOR = 2.0
# The warm-up fraction grows with the run's optimisation steps. A 1/30 warm-up hits the peak
# lr while AdamW's second-moment estimates (beta2 0.999: a ~1,000-step average) are still
# noisy; 30 % (one-cycle's default) gave +2.6 points at 585 steps (15 epochs of 5,000 images).
# A run of tens of steps is over before those estimates settle either way, and there the
# time at peak lr is what counts: at 78 steps, 30 % lost 2.8 points to 10 %.
SHORT_RUN_WARMUP = ((100, 0.1), (500, 0.3))  # (total steps, warm-up fraction), log-linear between
# At s = 0 the optimiser is the plain loop's (`one_cycle_share` and `no_decay_share` 1):
# PyTorch's one-cycle (cosine warm-up from lr/25, cosine down to ~0, beta1 0.95-0.85 against
# the lr) and AdamW decaying every parameter. On 45,000 CIFAR-10 images x 2 epochs the
# preset's cosine and decay groups trailed it by 1.0 point over five seeds; at 15 epochs on
# 5,000 images they led it by 0.6. Both shares fall with s, so the optimiser turns into the
# preset's gradually instead of switching at some length (docs/RESULTS.md).


# A short fine-tuning run's batch shrinks so that the run has SHORT_RUN_STEPS optimisation
# steps, down to SMALL_BATCH images a process (the lr follows by rule 1). Measured on CIFAR-10
# (docs/RESULTS.md, two seeds each): batch 64 against 128 gained 1.8, 1.3, 1.3 and 1.1 points at
# 2, 5, 10 and 15 epochs of 5,000 images and 1.3 at 2 epochs of 45,000 (156 to 1,406 steps at
# 64), and 32 gained nothing more at 2 epochs. Below SMALL_BATCH a device does little work per
# step. The 1,500 is past the longest measured run, not a measured optimum.
SHORT_RUN_STEPS = 1500
SMALL_BATCH = 64


# Crop and flip ramp in from CROP_FLIP_EPOCHS[0] to CROP_FLIP_EPOCHS[1] epochs (log scale), as
# measured on CIFAR-10 (docs/RESULTS.md): without them, 2-epoch runs gained 0.8-1.0 points on
# 45,000 images; at 5 epochs on 5,000 images the two were level (36.55 % against 36.64 %).
CROP_FLIP_EPOCHS = (2, 5)


# The bundled sample (1,000 training images) is for trying mmlit: without --epochs a run on it
# lasts this many epochs, not the preset's 300/400, so that `mmlit finetune --preset xxs` and
# `mmlit pretrain --preset xs` each end within two minutes, start to finish, on a 2-core CPU
# (docs/BENCHMARKS.md, "The card's commands"); the recipe is then fitted to that length as
# for any other run.
SAMPLE_EPOCHS = {"finetune": 4, "pretrain": 8}


# On a CUDA GPU a batch of 128 tiny images leaves the card idle between kernel launches
# (docs/BENCHMARKS.md, "GPU: first measurements": the compiled s step is launch-bound), so an
# unset batch grows towards GPU_BATCH as far as an epoch keeps GPU_MIN_STEPS steps (a ramp in
# the training images, not a switch at GPU_BATCH x GPU_MIN_STEPS of them); the lr follows by
# rule 1. The worker loader (data too large for the card) gets GPU_WORKERS processes, as many
# as the machine has up to that.
GPU_BATCH = 512
GPU_MIN_STEPS = 32
GPU_WORKERS = 8


def fit_to_device(cfg: Config, section: str, device_type: str, train_images: int, world_size: int = 1,
                  cpus: int = 1, pinned: Iterable[str] = ()) -> Config:
    """`cfg` with the batch size and loader workers of `cfg.<section>` chosen for the device
    (CUDA only; other devices keep the preset's). Keys in `pinned` are kept as set."""
    recipe: TrainConfig = getattr(cfg, section)
    if device_type != "cuda":
        return cfg
    changes: dict[str, Any] = {}
    fits = min(GPU_BATCH, train_images // (GPU_MIN_STEPS * world_size))
    if f"{section}.batch_size" not in pinned and fits > recipe.batch_size:
        changes["batch_size"] = fits
    if f"{section}.workers" not in pinned:
        changes["workers"] = max(min(GPU_WORKERS, cpus), recipe.workers)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(recipe, **changes)})


def short_run_batch(batch: int, images_seen: float, world_size: int = 1) -> int:
    """The batch a process of a fine-tuning run that sees `images_seen` images (training images
    x epochs) gets: `batch` (the preset's or the device's), shrunk so that the run has
    SHORT_RUN_STEPS steps, but not below SMALL_BATCH (nor above `batch`)."""
    return max(min(SMALL_BATCH, batch), min(batch, round(images_seen / (SHORT_RUN_STEPS * world_size))))


def peak_lr(recipe: TrainConfig, world_size: int = 1) -> float:
    """`recipe.lr` when set; else `lr_base` scaled to the global batch (rule 1)."""
    if recipe.lr is not None:
        return recipe.lr
    return recipe.lr_base * recipe.batch_size * world_size / LR_BASE_BATCH


def warmup_steps(recipe: TrainConfig, steps_per_epoch: int) -> float:
    """The warm-up in optimisation steps, at most half the run: one-cycle peaks there (a
    fraction of a step is kept), the linear warm-up of the cosine schedule ramps over its
    whole steps."""
    return min(recipe.warmup_epochs * steps_per_epoch, steps_per_epoch * recipe.epochs / 2)


def strength(epochs: float, reference_epochs: float) -> float:
    """How much of the preset's regularisation a run of `epochs` gets, 0..1.

    Over-fitting, which the regularisers fight, comes from seeing the same images again, so
    the measure is epochs (images seen per training image); it ramps on a log scale, as
    recipes do between 100- and 600-epoch schedules (timm's ResNet-strikes-back A3..A1).
    """
    return _log_share(epochs, reference_epochs * REGULARISE_FROM, reference_epochs)


def short_run_warmup_fraction(total_steps: int) -> float:
    """Rule 3's warm-up fraction at strength 0 for a run of `total_steps` optimisation steps."""
    (lo_steps, lo), (hi_steps, hi) = SHORT_RUN_WARMUP
    return round(lo + _log_share(max(total_steps, 1), lo_steps, hi_steps) * (hi - lo), 3)


def crop_flip_share(epochs: float) -> float:
    """How much of the preset's crop and flip a fine-tuning run of `epochs` gets, 0..1 (c)."""
    return _log_share(epochs, *CROP_FLIP_EPOCHS)


def _log_share(x: float, lo: float, hi: float) -> float:
    """Where `x` lies between `lo` (0) and `hi` (1) on a log scale, clipped to 0..1: the shape
    of every ramp in the rule table."""
    if x <= lo:
        return 0.0
    return 1.0 if x >= hi else math.log(x / lo) / math.log(hi / lo)


def _ramp(short: float, preset: float, s: float) -> float:
    """From `short` (s = 0) to `preset` (s = 1), geometric in between (both > 0)."""
    return preset if s >= 1 else short ** (1 - s) * preset ** s


def _scale(value: float, s: float) -> float:
    return value if s >= 1 else round(value * s, 3)  # 3 decimals keep config.yaml readable


# The fitting never turns off a feature the user set: a key keeps the preset's value, unscaled,
# when the user set a key that does nothing without it. On a short run (s = 0) `--set
# finetune.augment.mixup_alpha=0.2` would otherwise mix with probability 0, and
# `auto_augment=rand` would run on no image at magnitude 0. The siblings are still fitted: mixup
# set, cutmix stays off on a short run.
KEPT_FOR = {
    "mix_prob": ("mixup_alpha", "cutmix_alpha"),
    "mixup_alpha": ("mix_prob",),
    "cutmix_alpha": ("mix_prob",),
    "auto_augment_prob": ("auto_augment", "randaug_magnitude", "randaug_num_ops"),
    "randaug_magnitude": ("auto_augment", "auto_augment_prob", "randaug_num_ops"),
}


def _scaled_augment(aug: AugmentConfig, s: float, pinned: set[str], crop_flip: float = 1.0) -> AugmentConfig:
    """The preset's augmentation at strength `s`, its crop and flip at share `crop_flip`;
    `pinned` (keys under the section: "augment.mixup_alpha") are kept, and so are the keys
    they need (`KEPT_FOR`)."""
    changes: dict[str, Any] = {
        "crop_padding": aug.crop_padding if crop_flip >= 1 else round(aug.crop_padding * crop_flip),
        "hflip": _scale(aug.hflip, crop_flip),
        "mixup_alpha": _scale(aug.mixup_alpha, s),
        "cutmix_alpha": _scale(aug.cutmix_alpha, s),
        "mix_prob": _scale(aug.mix_prob, s),
        "random_erasing": _scale(aug.random_erasing, s),
        "randaug_magnitude": round(aug.randaug_magnitude * s),
        # TrivialAugment has no magnitude to turn down: the share of images it augments is.
        "auto_augment_prob": _scale(aug.auto_augment_prob, s),
    }
    kept = {k for k, needed_by in KEPT_FOR.items() if any(f"augment.{n}" in pinned for n in needed_by)}
    return dataclasses.replace(aug, **{k: v for k, v in changes.items()
                                       if f"augment.{k}" not in pinned and k not in kept})


def fit_recipe(cfg: Config, section: str, reference_epochs: int, train_images: int, world_size: int = 1,
               pinned: Iterable[str] = ()) -> Config:
    """`cfg` with `cfg.<section>` fitted to its `epochs` of `train_images` (see the module
    docstring).

    `reference_epochs` is the length the preset's recipe was written for (its own `epochs`
    before `--epochs`); `pinned` holds the dotted keys the user set (`finetune.lr`,
    `finetune.augment.mixup_alpha`, `model.drop_path`, ...), which are kept as set (but
    `warmup_epochs`, capped at half the run).
    """
    recipe: TrainConfig = getattr(cfg, section)
    mine = {k[len(section) + 1:] for k in pinned if k.startswith(section + ".")}
    if recipe.batch_size * world_size > train_images:
        # fewer images than a global batch (the preset's or the user's): an epoch's one step takes
        # them all, and the lr (rule 1) follows the batch that step has, not one the data cannot fill
        recipe = dataclasses.replace(recipe, batch_size=max(train_images // world_size, 1))
    if recipe.recipe == "auto" and section == "finetune" and "batch_size" not in mine:
        recipe = dataclasses.replace(recipe, batch_size=short_run_batch(
            recipe.batch_size, train_images * recipe.epochs, world_size))
    changes: dict[str, Any] = {}
    changes["lr"] = peak_lr(recipe, world_size)  # an lr given by --lr, --set or a preset is kept
    model = cfg.model
    if recipe.recipe == "auto":
        s = strength(recipe.epochs, reference_epochs)
        warmup_fraction = recipe.warmup_epochs / reference_epochs
        if section == "finetune":  # the optimiser's rules (measured for fine-tuning only)
            if recipe.lr is None:
                changes["lr"] *= _ramp(SHORT_RUN_LR_FACTOR, 1.0, s)
            # full global batches, as the engine's loader drops the last partial one (one step at least)
            steps = max(train_images // (recipe.batch_size * world_size), 1) * recipe.epochs
            warmup_fraction = _ramp(short_run_warmup_fraction(steps), warmup_fraction, s) if warmup_fraction else 0.0
            if "grad_clip" not in mine and s < 1:
                changes["grad_clip"] = round(recipe.grad_clip / s, 3) if s > 0 else 0.0
            # a schedule, min_lr or betas the user set keeps the schedule they were set for
            if not mine & {"schedule", "one_cycle_share", "min_lr", "betas"}:
                changes["one_cycle_share"] = round(1 - s, 3)
            if not mine & {"decay_all", "no_decay_share"}:
                changes["no_decay_share"] = round(1 - s, 3)
        if "warmup_epochs" not in mine:
            changes["warmup_epochs"] = warmup_fraction * recipe.epochs
        # crop and flip ramp in with the epochs of a fine-tuning run (or with s, for a preset
        # whose own length is that short); pre-training keeps its own
        crop_flip = max(crop_flip_share(recipe.epochs), s) if section == "finetune" else 1.0
        changes["augment"] = _scaled_augment(recipe.augment, s, mine, crop_flip)
        if "model.drop_path" not in pinned:
            model = dataclasses.replace(model, drop_path=_scale(model.drop_path, s))
    # The schedules warm up for at most half the run (`warmup_steps`): the config says so too.
    changes["warmup_epochs"] = min(changes.get("warmup_epochs", recipe.warmup_epochs), recipe.epochs / 2)
    recipe = dataclasses.replace(recipe, **changes)
    return dataclasses.replace(cfg, model=model, **{section: recipe}).validate()


def batch_origin(preset: int, device: int, fitted: int, every_image: bool = False, given: bool = False) -> str:
    """Where a run's batch came from when it is not the preset's: "preset 128 -> 512 on the
    GPU -> 90 for a short run" (`device`: after `fit_to_device`; `fitted`: after `fit_recipe`,
    `every_image` when that is all the training images). A batch the user set (`given`, as
    `preset`) is kept by both unless the data has fewer images: "128 asked -> 50, all the
    training images"."""
    steps = [f"{preset} asked" if given else f"preset {preset}"]
    if device != preset:
        steps.append(f"{device} on the GPU")
    if fitted != device:
        steps.append(f"{fitted}, all the training images" if every_image else f"{fitted} for a short run")
    return " -> ".join(steps) if len(steps) > 1 else ""


def describe(cfg: Config, section: str, reference_epochs: int, train_images: int | None = None,
             world_size: int = 1, lr_given: bool = False, origin: str = "") -> str:
    """The recipe a run will use, in two lines (printed at the start of a run, and atop its
    config.yaml): the values the optimizer and the loader get (the batch with its `origin`,
    see `batch_origin`), the peak lr with its factors, the warm-up in epochs and in steps (for
    `train_images` split over `world_size` processes)."""
    r: TrainConfig = getattr(cfg, section)
    a = r.augment
    s = strength(r.epochs, reference_epochs) if r.recipe == "auto" else 1.0
    fitted = f"auto, fitted to {r.epochs} of {reference_epochs} epochs: regularisation x{s:.2f}" \
        if r.recipe == "auto" else "paper (the preset's, not fitted to the run)"
    flip = ("flip" if a.hflip == 0.5 else f"flip p{a.hflip:g}") if a.hflip else ""  # 0.5: the usual
    aug = [f"crop pad {a.crop_padding}" if a.crop_padding else "", flip,
           {"trivial": "TrivialAugment", "rand": f"RandAugment m{a.randaug_magnitude}"}.get(a.auto_augment, "")
           + (f" on {a.auto_augment_prob:.0%} of images" if a.auto_augment_prob < 1 else "")
           if a.auto_augment != "none" and a.auto_augment_prob > 0 else "",
           f"mixup {a.mixup_alpha:g}/cutmix {a.cutmix_alpha:g} p{a.mix_prob:g}"
           if a.mix_prob and (a.mixup_alpha or a.cutmix_alpha) else "",  # both 0: no mixing (`build_batch_mix`)
           f"erasing {a.random_erasing:g}" if a.random_erasing else "",
           f"drop path {cfg.model.drop_path:g}" if cfg.model.drop_path else "",
           f"label smoothing {r.label_smoothing:g}" if r.label_smoothing else ""]
    clip = (f"clip {r.grad_clip:g}" if r.grad_clip else "no clipping") + (f", EMA {r.ema_decay:g}" if r.ema else "")
    share, no_decay = one_cycle_share(r), decay_share(r)
    cycle = "one-cycle (cosine up from lr/25, down to ~0; beta1 0.95-0.85)"
    # a min_lr at or above the peak keeps the lr flat (`optim.lr_at`): it never rises to min_lr
    cosine = f"cosine to {r.min_lr:g}" if r.min_lr < r.lr else f"flat at the peak (min_lr {r.min_lr:g} is not below it)"
    shape = cycle if share >= 1 else cosine if share <= 0 else f"{share:g} one-cycle + {1 - share:.3g} {cosine}"
    decay = f"weight decay {r.weight_decay:g}" + (" on every parameter" if no_decay >= 1 else
                                                  f" (x{no_decay:g} on norms, biases, embeddings)" if no_decay else "")
    warm = f"warm-up {r.warmup_epochs:.3g} epochs"
    if train_images:
        steps_per_epoch = max(train_images // (r.batch_size * world_size), 1)
        steps = warmup_steps(r, steps_per_epoch)
        warm += f" = {steps:,.0f}" if steps >= 100 else f" = {steps:.3g}"
        warm += f" of {steps_per_epoch * r.epochs:,} steps"
    return (f"recipe {fitted}\n"
            f"  batch {r.batch_size} x {world_size} process(es){f' ({origin})' if origin else ''}, lr {r.lr:.3g} ({lr_factors(r, world_size, lr_given)}), {warm}, "
            f"{shape}, {decay}, {clip}; {', '.join(x for x in aug if x) or 'no augmentation'}")


def one_cycle_share(recipe: TrainConfig) -> float:
    """The share of one-cycle in the schedule the engine runs (`schedule: one-cycle` is all of it)."""
    return 1.0 if recipe.schedule == "one-cycle" else recipe.one_cycle_share


def decay_share(recipe: TrainConfig) -> float:
    """The share of weight decay norms, biases and embeddings get (`decay_all` is all of it)."""
    return 1.0 if recipe.decay_all else recipe.no_decay_share


def lr_factors(recipe: TrainConfig, world_size: int = 1, given: bool = False) -> str:
    """How the peak lr came about, in words: as given (`--lr`, `--set`), or the linear rule
    (rule 1) times rule 3's short-run factor when there is one."""
    if given:
        return "as given"
    rule = recipe.lr_base * recipe.batch_size * world_size / LR_BASE_BATCH
    words = f"lr_base {recipe.lr_base:g} x {recipe.batch_size * world_size}/{LR_BASE_BATCH}"
    factor = recipe.lr / rule if rule > 0 else 1.0
    if abs(factor - 1.0) < 1e-6:
        return words
    # --recipe paper fits nothing: an lr off the rule is the preset's own `lr`
    return "as given" if recipe.recipe == "paper" else f"{words} x {factor:.3g} short-run factor"
