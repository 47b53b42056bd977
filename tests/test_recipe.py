"""The recipe fitted to the run (issue 11): rules tested on the resolved config; accuracy
lives in benchmarks/bench_recipe.py."""

import dataclasses
import math
import subprocess
import sys

import pytest
import yaml

from mmlit_cli.config import load_config, parse_overrides, pinned_keys
from mmlit_cli.errors import ConfigError
from mmlit_cli.recipe import fit_recipe, peak_lr, short_run_warmup_fraction, strength
from mmlit_cli.train import run_training
from helpers import TINY, write_folder

REGULARISERS = ("mixup_alpha", "cutmix_alpha", "mix_prob", "random_erasing")


def fitted(preset="xxs", sets=(), section="finetune", world_size=1, pinned=None, train_images=50_000):
    """The preset fitted to a run on `train_images` (default: a CIFAR-sized training set);
    the keys in `sets` are pinned, as `--set` pins them, unless `pinned` says otherwise."""
    cfg = load_config(preset, list(sets))
    reference = getattr(load_config(preset), section).epochs
    pinned = pinned_keys(parse_overrides(list(sets))) if pinned is None else pinned
    return fit_recipe(cfg, section, reference, train_images, world_size, pinned)


@pytest.mark.parametrize("preset", ["xxs", "xs", "s"])
def test_a_paper_length_run_gets_exactly_the_presets_recipe(preset):
    """300 epochs of a CIFAR-sized set at the preset's batch: nothing is changed but lr,
    which is the paper's lr (lr_base per 256 images x 128 / 256 = 1e-3)."""
    preset_cfg = load_config(preset)
    cfg = fitted(preset)
    assert cfg.finetune.epochs == 300
    assert cfg.finetune.lr == pytest.approx(1e-3)
    assert dataclasses.replace(cfg.finetune, lr=None) == preset_cfg.finetune
    assert cfg.model == preset_cfg.model and cfg.model.drop_path == preset_cfg.model.drop_path
    pre = fitted(preset, section="pretrain")
    assert dataclasses.replace(pre.pretrain, lr=None) == preset_cfg.pretrain
    assert pre.pretrain.lr == pytest.approx(1.5e-3)


def test_short_runs_get_a_proportional_warmup_and_no_heavy_regularisation():
    cfg = fitted("xs", ["finetune.epochs=2"], train_images=5_000)
    r = cfg.finetune
    # 10,000 images seen / 1,500 = 7: batch 64 (the floor), 156 steps, a warm-up of
    # 0.1 + 0.2 x ln(156 / 100) / ln 5 = 0.1 + 0.2 x 0.444686 / 1.609438 = 15.5 % (3 decimals)
    assert r.batch_size == 64 and r.warmup_epochs == pytest.approx(2 * 0.155)
    assert all(getattr(r.augment, k) == 0 for k in REGULARISERS)
    assert r.augment.auto_augment_prob == 0 and cfg.model.drop_path == 0  # TrivialAugment on no image
    assert r.label_smoothing == 0.1  # label smoothing stays at any length
    # crop and flip ramp in from 2 to 5 epochs: c = ln(E / 2) / ln(2.5), by hand (3: 0.442507,
    # 4: 0.756471), x the preset's padding 4 (rounded) and flip 0.5 (3 decimals)
    ramp = {1: (0, 0.0), 2: (0, 0.0), 3: (2, 0.221), 4: (3, 0.378), 5: (4, 0.5), 20: (4, 0.5), 100: (4, 0.5)}
    for epochs, expected in ramp.items():
        aug = fitted("xs", [f"finetune.epochs={epochs}"], train_images=5_000).finetune.augment
        assert (aug.crop_padding, aug.hflip) == expected, epochs
    # set by the user: kept; a preset whose own length is 2 epochs keeps its crop and flip (s = 1)
    kept = fitted("xs", ["finetune.epochs=2", "finetune.augment.hflip=0.3"], train_images=5_000,
                  pinned={"finetune.augment.hflip"}).finetune.augment
    assert (kept.crop_padding, kept.hflip) == (0, 0.3)
    short_preset = fit_recipe(load_config("xs", ["finetune.epochs=2"]), "finetune", 2, 5_000).finetune.augment
    assert (short_preset.crop_padding, short_preset.hflip) == (4, 0.5)
    pre = fitted("xs", ["pretrain.epochs=2"], section="pretrain").pretrain.augment  # measured for fine-tuning only
    preset_pre = load_config("xs").pretrain.augment
    assert (pre.crop_padding, pre.hflip) == (preset_pre.crop_padding, preset_pre.hflip) != (0, 0)
    # MAE pre-training: the same warm-up rule (20 of 400 epochs) and lr per 256 images
    pre = fitted("xs", ["pretrain.epochs=8", "pretrain.batch_size=64"], section="pretrain").pretrain
    assert pre.warmup_epochs == pytest.approx(8 * 20 / 400) and pre.lr == pytest.approx(1.5e-3 * 64 / 256)


# The documented ramp (the module docstring's rules 2 and 3, `strength`'s log scale) for a
# 300-epoch preset (xxs: lr 1e-3 at batch 128, clipping 1.0, warm-up 10 of 300 epochs) on 50,000
# images (at least 746 steps an epoch, so every run here has >= 500 steps: a 30 % warm-up at
# strength 0), computed by hand from these formulas, never with the module's own functions:
#   s        = ln(E / 20) / ln(15), clamped to 0..1   (0 up to 300 / 15 = 20 epochs, 1 at 300)
#   lr       = 1e-3 * 2 ** (1 - s)                    (twice the preset's at s = 0, geometric to it)
#   clip     = round(1.0 / s, 3), none at s = 0
#   warm-up  = E * 0.3 ** (1 - s) * (1 / 30) ** s     (30 % of the run at s = 0, 10 / 300 at s = 1)
# e.g. E = 100: s = ln 5 / ln 15 = 1.609438 / 2.708050 = 0.594316; lr = 1e-3 * 2 ** 0.405684 = 1.324717e-3.
# The batch is 128 from 1,500 x 128 / 50,000 = 3.84 epochs on; at E = 2 it is round(100,000 /
# 1,500) = 67, and the lr 2e-3 x 67 / 256 x 2 = 1.046875e-3.
RAMP_300 = {  # epochs: (s, lr, grad_clip, warmup_epochs)
    2: (0.0, 1.046875e-3, 0.0, 0.6),
    20: (0.0, 2e-3, 0.0, 6.0),
    21: (0.018017, 1.975179e-3, 55.504, 6.055475),
    50: (0.338358, 1.581882e-3, 2.955, 7.132070),
    60: (0.405684, 1.509757e-3, 2.465, 7.381620),
    100: (0.594316, 1.324717e-3, 1.683, 8.128297),
    200: (0.850274, 1.109359e-3, 1.176, 9.263679),
    299: (0.998767, 1.000855e-3, 1.001, 9.993704),
    300: (1.0, 1e-3, 1.0, 10.0),
}


def test_the_ramp_has_the_documented_values_at_each_length():
    for epochs, (s, lr, clip, warmup) in RAMP_300.items():
        assert strength(epochs, 300) == pytest.approx(s, abs=1e-6), epochs
        r = fitted("xxs", [f"finetune.epochs={epochs}"]).finetune
        assert r.lr == pytest.approx(lr, rel=1e-6), epochs
        assert r.grad_clip == pytest.approx(clip, abs=1e-9), epochs
        assert r.warmup_epochs == pytest.approx(warmup, rel=1e-6), epochs
    # the ramp is in epochs relative to the preset's length: 4 and 20 of 60 are 20 and 100 of 300
    assert strength(4, 60) == 0 and strength(20, 60) == pytest.approx(RAMP_300[100][0], abs=1e-6)


def test_regularisation_grows_with_the_run_and_never_exceeds_the_preset():
    preset = load_config("s").finetune.augment
    previous = -1.0
    for epochs in (10, 20, 21, 50, 100, 200, 299, 300, 600):
        aug = fitted("s", [f"finetune.epochs={epochs}"]).finetune.augment
        assert previous <= aug.mixup_alpha <= preset.mixup_alpha
        previous = aug.mixup_alpha
    assert strength(20, 300) == 0 and strength(300, 300) == 1
    assert strength(100, 300) == pytest.approx(RAMP_300[100][0], abs=1e-6)
    mid = fitted("s", ["finetune.epochs=100"])
    # TrivialAugment on a share s of the images (0.594316, to 3 decimals)
    assert (mid.finetune.augment.auto_augment, mid.finetune.augment.auto_augment_prob) == ("trivial", 0.594)
    # the preset's regularisers x 0.594316, to 3 decimals: mixup 0.8, cutmix 1.0, mix_prob 1.0,
    # random erasing 0.25, RandAugment magnitude 9 (rounded to a whole), drop path 0.1
    a = mid.finetune.augment
    assert (a.mixup_alpha, a.cutmix_alpha, a.mix_prob, a.random_erasing, a.randaug_magnitude) == \
        (0.475, 0.594, 0.594, 0.149, 5)
    assert mid.model.drop_path == 0.059
    assert fitted("s", ["finetune.epochs=50"]).finetune.augment.auto_augment_prob == 0.338
    assert fitted("s", ["finetune.epochs=20"]).finetune.augment.auto_augment_prob == 0


def test_short_runs_get_a_one_cycle_like_schedule_that_ramps_to_the_presets():
    preset = load_config("xxs").finetune
    short = fitted("xxs", ["finetune.epochs=15"]).finetune
    assert short.lr == pytest.approx(2 * 1e-3) and short.grad_clip == 0
    assert short.warmup_epochs == pytest.approx(0.3 * 15)  # 5,850 steps
    previous = (short.lr, short.warmup_epochs / 15, -1.0)
    for epochs in (21, 50, 100, 200, 299):
        r = fitted("xxs", [f"finetune.epochs={epochs}"]).finetune
        _, lr, clip, warmup = RAMP_300[epochs]  # the documented ramp, by hand: not `strength()`
        assert r.lr == pytest.approx(lr, rel=1e-6) and r.grad_clip == pytest.approx(clip, abs=1e-9), epochs
        assert r.warmup_epochs == pytest.approx(warmup, rel=1e-6), epochs
        clip_inverse = 1 / r.grad_clip
        assert r.lr < previous[0] and r.warmup_epochs / epochs < previous[1] and clip_inverse > previous[2]
        previous = (r.lr, r.warmup_epochs / epochs, clip_inverse)
    assert previous[0] > preset.lr_base * 128 / 256 and previous[1] > preset.warmup_epochs / 300
    # set by the user: kept; MAE pre-training: not affected (rule 3 is measured for fine-tuning)
    kept = fitted("xxs", ["finetune.epochs=15", "finetune.grad_clip=0.5", "finetune.lr=3e-4"],
                  pinned={"finetune.grad_clip", "finetune.lr", "finetune.epochs"}).finetune
    assert kept.grad_clip == 0.5 and kept.lr == 3e-4 and kept.warmup_epochs == pytest.approx(4.5)
    pre = fitted("xxs", ["pretrain.epochs=8"], section="pretrain").pretrain
    assert pre.lr == pytest.approx(1.5e-3) and pre.warmup_epochs == pytest.approx(8 * 20 / 400)


def test_the_optimiser_moves_from_the_plain_loops_to_the_presets_without_a_jump():
    """one_cycle_share and no_decay_share: 1 (the plain loop: one-cycle, decay on every
    parameter) up to 20 of 300 epochs, 1 - s between (RAMP_300's s, by hand), 0 at 300."""
    preset = load_config("xxs").finetune
    assert (preset.one_cycle_share, preset.no_decay_share, preset.schedule) == (0, 0, "cosine")
    for epochs in (1, 2, 5, 20):
        r = fitted("xxs", [f"finetune.epochs={epochs}"], train_images=5_000).finetune
        assert (r.one_cycle_share, r.no_decay_share, r.schedule) == (1, 1, "cosine"), epochs
    for epochs, (s, *_) in RAMP_300.items():
        r = fitted("xxs", [f"finetune.epochs={epochs}"]).finetune
        assert r.one_cycle_share == r.no_decay_share == pytest.approx(1 - s, abs=5e-4), epochs
    previous = 1.0
    for epochs in range(1, 302):
        share = fitted("xxs", [f"finetune.epochs={epochs}"]).finetune.one_cycle_share
        assert previous - 0.02 <= share <= previous, epochs  # monotone, at most 0.02 a step of one epoch
        previous = share
    paper = fitted("xxs", ["finetune.epochs=2", "finetune.recipe=paper"]).finetune
    assert (paper.one_cycle_share, paper.no_decay_share) == (0, 0)
    # a schedule, min_lr or betas set by the user keeps the cosine they were set for
    for key, value in (("schedule", "cosine"), ("min_lr", "1e-4"), ("betas", "[0.8,0.99]")):
        r = fitted("xxs", ["finetune.epochs=2", f"finetune.{key}={value}"], pinned={f"finetune.{key}"}).finetune
        assert (r.one_cycle_share, r.no_decay_share) == (0, 1), key
    r = fitted("xxs", ["finetune.epochs=2", "finetune.decay_all=false"], pinned={"finetune.decay_all"}).finetune
    assert (r.one_cycle_share, r.no_decay_share) == (1, 0)
    pre = fitted("xxs", ["pretrain.epochs=8"], section="pretrain").pretrain
    assert (pre.one_cycle_share, pre.no_decay_share) == (0, 0)
    with pytest.raises(ConfigError, match="schedule"):
        load_config("xxs", ["finetune.schedule=step"])
    with pytest.raises(ConfigError, match="one_cycle_share"):
        load_config("xxs", ["finetune.one_cycle_share=1.5"])


@pytest.mark.parametrize("total_steps,warmup_fraction", [(702, 0.3), (78, 0.1), (7, 0.3), (1, 0.3)])
def test_one_cycle_is_pytorchs_one_cycle_lr(total_steps, warmup_fraction):
    """The engine's one-cycle gives the floats `torch.optim.lr_scheduler.OneCycleLR` gives
    (lr and beta1) at every step, so "the plain loop's schedule" means exactly that."""
    import torch
    from mmlit_cli.optim import one_cycle_at

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=total_steps,
                                                pct_start=warmup_fraction)
    for step in range(total_steps):
        group = opt.param_groups[0]
        assert one_cycle_at(step, total_steps, warmup_fraction, 2e-3) == (group["lr"], group["betas"][0]), step
        opt.step()
        sched.step()
    # where OneCycleLR divides by zero (warm-up ending at step 0), the warm-up is skipped
    assert one_cycle_at(0, 10, 0.1, 2e-3) == (2e-3, 0.85)


def test_the_one_cycle_schedule_reaches_the_optimizer(tmp_path):
    """A short run's optimizer state holds one-cycle's lr and beta1 for its last step and
    decays every parameter; `--recipe paper` keeps the preset's betas and no-decay groups."""
    from mmlit_cli.checkpoint import load_checkpoint
    from mmlit_cli.optim import one_cycle_at

    data = write_folder(tmp_path / "data", per_class=8)

    def last_state(name, sets):
        run_training("finetune", "xxs", str(data), out=tmp_path / name, overrides=TINY + sets, epochs=2,
                     batch_size=8, max_steps=4, save_every=0, quiet=True)
        info = load_checkpoint(tmp_path / name / "last.safetensors", with_train_state=True).train_info
        recipe = yaml.safe_load((tmp_path / name / "config.yaml").read_text())["finetune"]
        return info["optimizer"]["param_groups"], recipe

    groups, recipe = last_state("auto", [])
    assert recipe["one_cycle_share"] == 1 and recipe["no_decay_share"] == 1
    total_steps = 2 * 2  # 16 images at batch 8, 2 epochs; the last step taken is step 3 (max_steps 4)
    lr, beta1 = one_cycle_at(3, total_steps, recipe["warmup_epochs"] / 2, recipe["lr"])
    assert all(g["lr"] == lr and tuple(g["betas"]) == (beta1, 0.999) for g in groups)
    assert all(g["weight_decay"] == recipe["weight_decay"] for g in groups)
    groups, recipe = last_state("paper", ["finetune.recipe=paper"])
    assert recipe["one_cycle_share"] == 0 and [tuple(g["betas"]) for g in groups] == [(0.9, 0.999)] * len(groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, recipe["weight_decay"]]
    # between: the mix, by hand. Step 3 of 4 with a 1-step warm-up: the cosine is at
    # min_lr + (lr - min_lr) * (1 + cos(pi * 2/3)) / 2, beta1 at 0.25 x one-cycle's + 0.75 x 0.9
    sets = ["finetune.one_cycle_share=0.25", "finetune.no_decay_share=0.5", "finetune.warmup_epochs=0.5"]
    groups, recipe = last_state("mixed", sets)
    peak, min_lr = recipe["lr"], recipe["min_lr"]
    cosine = min_lr + (peak - min_lr) * (1 + math.cos(math.pi * 2 / 3)) / 2
    cycle_lr, cycle_beta1 = one_cycle_at(3, total_steps, 0.25, peak)
    assert all(g["lr"] == pytest.approx(0.25 * cycle_lr + 0.75 * cosine, rel=1e-12) for g in groups)
    assert all(g["betas"][0] == pytest.approx(0.25 * cycle_beta1 + 0.75 * 0.9, rel=1e-12) for g in groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.5 * recipe["weight_decay"], recipe["weight_decay"]]


def test_the_short_run_warmup_grows_with_the_runs_optimisation_steps():
    """Issue 11's budgets at batch 128 (set, so the batch rule keeps it): (a) 2 epochs of 5,000
    images = 78 steps, (b) 15 epochs of 5,000 = 585 steps, (c) 2 epochs of 45,000 = 702 steps."""
    def warmup_fraction(epochs, images, sets=("finetune.batch_size=128",), world_size=1):
        r = fitted("xxs", [f"finetune.epochs={epochs}", *sets], world_size=world_size, train_images=images).finetune
        return r.warmup_epochs / epochs

    assert warmup_fraction(2, 5_000) == pytest.approx(0.1)
    assert warmup_fraction(15, 5_000) == pytest.approx(0.3)
    assert warmup_fraction(2, 45_000) == pytest.approx(0.3)
    # the steps count, not the images: 4x the batch (or 4 processes) is 4x fewer steps
    assert warmup_fraction(15, 5_000, ["finetune.batch_size=512"]) < 0.3
    assert warmup_fraction(15, 5_000, world_size=4) == warmup_fraction(15, 5_000, ["finetune.batch_size=512"])
    # with the batch unset, the batch rule's 64 doubles (a)'s steps: 156, 0.1 + 0.2 x ln 1.56 / ln 5
    assert warmup_fraction(2, 5_000, sets=()) == pytest.approx(0.155)
    fractions = [short_run_warmup_fraction(t) for t in (1, 50, 100, 150, 250, 400, 500, 10_000)]
    assert fractions[0] == fractions[2] == 0.1 and fractions[-2] == fractions[-1] == 0.3
    assert fractions == sorted(fractions) and 0.1 < fractions[4] < 0.3


def test_a_short_run_gets_a_smaller_batch_so_that_it_has_1500_steps():
    """The batch rule, by hand: round(images x epochs / (1,500 x processes)), within 64 and the
    preset's 128 (xxs); the lr follows it (rule 1, x 2 at s = 0)."""
    def batch(epochs, images=5_000, sets=(), world_size=1, **kw):
        r = fitted("xxs", [f"finetune.epochs={epochs}", *sets], world_size=world_size, train_images=images, **kw)
        return r.finetune.batch_size
    # 10,000 / 1,500 = 6.7 and 50,000 / 1,500 = 33: the floor; 100,000 / 1,500 = 66.7 -> 67;
    # 150,000 / 1,500 = 100; 190,000 / 1,500 = 126.7 -> 127; 195,000 / 1,500 = 130: the preset's
    walk = {1: 64, 2: 64, 10: 64, 19: 64, 20: 67, 30: 100, 38: 127, 39: 128, 100: 128, 300: 128}
    assert {e: batch(e) for e in walk} == walk
    assert fitted("xxs", ["finetune.epochs=20"], train_images=5_000).finetune.lr == pytest.approx(2e-3 * 67 / 256 * 2)
    # the global batch counts: 45,000 x 2 over 4 processes is 15 a process (floor 64); 5,000 x 60
    # over 2 is 100 a process
    assert batch(2, 45_000, world_size=4) == 64 and batch(60, 5_000, world_size=2) == 100
    # a batch the user set is kept, below the floor or above the preset's; a preset's batch below
    # the floor is never raised; `paper` and pre-training keep the preset's
    assert batch(2, sets=["finetune.batch_size=32"]) == 32 and batch(2, sets=["finetune.batch_size=256"]) == 256
    assert batch(2, sets=["finetune.batch_size=32"], pinned=set()) == 32
    assert batch(2, sets=["finetune.batch_size=100"], pinned=set()) == 64
    assert batch(2, sets=["finetune.recipe=paper"]) == 128
    assert fitted("xs", ["pretrain.epochs=2"], section="pretrain", train_images=5_000).pretrain.batch_size == \
        load_config("xs").pretrain.batch_size


def test_the_recipe_line_says_mixing_only_where_it_mixes():
    """mix_prob 1 with both alphas 0 mixes nothing (`build_batch_mix`): the line said "mixup 0/cutmix 0 p1"."""
    from mmlit_cli.recipe import describe

    off = fitted("xxs", ["finetune.recipe=paper", "finetune.augment.mixup_alpha=0", "finetune.augment.cutmix_alpha=0",
                         "finetune.augment.mix_prob=1"])
    assert "mixup" not in describe(off, "finetune", 300, 50_000)
    assert "mixup 0.8/cutmix 1 p1" in describe(fitted("xxs", ["finetune.recipe=paper"]), "finetune", 300, 50_000)


def test_the_recipe_line_names_the_ema_when_there_is_one():
    from mmlit_cli.recipe import describe

    assert "clip 1, EMA 0.999;" in describe(fitted("xxs", ["finetune.ema=true", "finetune.ema_decay=0.999"]),
                                            "finetune", 300, 50_000)
    assert "EMA" not in describe(fitted("xxs"), "finetune", 300, 50_000)


def test_a_min_lr_above_the_peak_is_said_to_keep_the_lr_flat():
    """The lr stays at a peak below min_lr (optim.lr_at); the recipe line said "cosine to 1"."""
    from mmlit_cli.recipe import describe

    cfg = fitted("xxs", ["finetune.recipe=paper", "finetune.min_lr=1"])
    assert cfg.finetune.lr < 1
    assert "flat at the peak (min_lr 1 is not below it)" in describe(cfg, "finetune", 300, 50_000)
    assert "cosine to 1e-05" in describe(fitted("xxs", ["finetune.recipe=paper"]), "finetune", 300, 50_000)


def test_lr_follows_the_global_batch():
    assert fitted("xxs", ["finetune.batch_size=1024"]).finetune.lr == pytest.approx(8e-3)
    assert fitted("xxs", ["finetune.batch_size=256"], world_size=4).finetune.lr == pytest.approx(8e-3)
    assert peak_lr(load_config("xxs").finetune) == pytest.approx(1e-3)


@pytest.mark.parametrize("section", ["finetune", "pretrain"])
def test_a_batch_the_data_cannot_fill_is_all_the_images_and_the_lr_follows_it(section):
    """54 training images and a preset batch of 128 (256 pre-training): an epoch is one step of
    54 images, so the batch is 54 and the lr is scaled for 54; on two processes, 27 each. So
    for a batch the user set (it stayed 100, with an lr for 100 and a step of 54)."""
    epochs = ["finetune.epochs=300", "pretrain.epochs=400"]  # the preset's length: no short-run factor
    for world in (1, 2):
        cfg = getattr(fitted("xxs", epochs, section, world_size=world, pinned=set(), train_images=54), section)
        base = getattr(load_config("xxs"), section).lr_base
        assert cfg.batch_size == 54 // world and cfg.lr == pytest.approx(base * 54 / 256)
    pinned = getattr(fitted("xxs", [f"{section}.batch_size=100", epochs[section == "pretrain"]], section,
                            train_images=54), section)
    assert pinned.batch_size == 54 and pinned.lr == pytest.approx(base * 54 / 256)


def test_values_the_user_set_are_kept_as_set():
    sets = ["finetune.epochs=2", "finetune.lr=5e-3", "finetune.batch_size=1024",
            "finetune.augment.mixup_alpha=0.3", "finetune.warmup_epochs=1", "model.drop_path=0.2"]
    pinned = {"finetune.lr", "finetune.augment.mixup_alpha", "finetune.warmup_epochs", "model.drop_path",
              "finetune.epochs", "finetune.batch_size"}
    cfg = fitted("xs", sets, pinned=pinned)
    assert cfg.finetune.lr == 5e-3  # not rescaled by the batch
    assert cfg.finetune.augment.mixup_alpha == 0.3 and cfg.finetune.warmup_epochs == 1
    assert cfg.model.drop_path == 0.2
    assert cfg.finetune.augment.cutmix_alpha == 0  # what was not set is still fitted


@pytest.mark.parametrize("key, value, on", [
    ("mixup_alpha", 0.2, {"mix_prob": 1.0, "mixup_alpha": 0.2, "cutmix_alpha": 0.0}),
    ("cutmix_alpha", 0.5, {"mix_prob": 1.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.5}),
    ("mix_prob", 0.5, {"mix_prob": 0.5, "mixup_alpha": 0.8, "cutmix_alpha": 1.0}),
    ("auto_augment", "rand", {"auto_augment_prob": 1.0, "randaug_magnitude": 9, "random_erasing": 0.0}),
    ("randaug_magnitude", 5, {"auto_augment_prob": 1.0, "randaug_magnitude": 5}),
    ("auto_augment_prob", 0.5, {"auto_augment_prob": 0.5, "randaug_magnitude": 9, "mix_prob": 0.0}),
])
def test_a_feature_the_user_set_is_not_fitted_off(key, value, on):
    """On a 2-epoch run (s = 0) the fitting turns every regulariser off; a feature the user set
    stays on: the keys without which it does nothing keep the preset's values, and the recipe
    line names it."""
    from mmlit_cli.recipe import describe

    cfg = fitted("xs", ["finetune.epochs=2", f"finetune.augment.{key}={value}"])
    aug = cfg.finetune.augment
    assert {k: getattr(aug, k) for k in on} == on
    line = describe(cfg, "finetune", 300)
    if "mix_prob" in on and on["mix_prob"]:
        assert "mixup" in line
    if key in ("auto_augment", "randaug_magnitude"):
        assert ("RandAugment m" if key == "auto_augment" else "TrivialAugment") in line


def test_recipe_paper_turns_the_fitting_off():
    preset = load_config("xs")
    cfg = fitted("xs", ["finetune.epochs=2", "finetune.recipe=paper"])
    assert cfg.finetune.augment == preset.finetune.augment and cfg.model == preset.model
    assert cfg.finetune.warmup_epochs == 1.0  # the preset's 10, capped at half the run as the schedules run it
    assert cfg.finetune.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="recipe must be auto or paper"):
        load_config("xs", ["finetune.recipe=fast"])


def test_a_run_prints_its_recipe_and_config_yaml_holds_the_fitted_values(tmp_path):
    data = write_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmlit_cli", "finetune", "--preset", "xxs", "--dataset", str(data), "--epochs", "2",
           "--batch-size", "8", "--out", str(out), "--device", "cpu", "--set", "finetune.augment.cutmix_alpha=0.5"]
    for o in TINY:
        if "warmup" not in o:
            cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "recipe auto, fitted to 2 of 300 epochs: regularisation x0.00" in r.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())["finetune"]
    assert saved["lr"] == pytest.approx(2 * 2e-3 * 8 / 256) and saved["recipe"] == "auto"
    assert saved["warmup_epochs"] == pytest.approx(0.2) and saved["grad_clip"] == 0
    assert saved["augment"]["mixup_alpha"] == 0 and saved["augment"]["auto_augment_prob"] == 0
    assert saved["augment"]["cutmix_alpha"] == 0.5  # set by the user: kept
    assert (out / "config.yaml").read_text().startswith("# recipe auto")
    # what its header says: `--preset config.yaml --recipe paper` is this recipe again, as it is
    # (auto would fit the fitted values once more, to 2 of 2 epochs: one-cycle turned into cosine)
    assert "# to train with exactly this recipe again: --preset config.yaml --recipe paper\n" in \
        (out / "config.yaml").read_text()
    again = subprocess.run([sys.executable, "-m", "mmlit_cli", "finetune", "--preset", str(out / "config.yaml"),
                            "--recipe", "paper", "--dataset", str(data), "--print-config"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    run, shown = yaml.safe_load((out / "config.yaml").read_text()), yaml.safe_load(again.stdout)
    assert shown["finetune"].pop("recipe") == "paper" and run["finetune"].pop("recipe") == "auto"
    assert shown == run


def test_resume_keeps_the_fitted_recipe(tmp_path):
    data = write_folder(tmp_path / "data", per_class=8)
    sets = [o for o in TINY if "warmup" not in o]
    run_training("finetune", "xxs", str(data), out=tmp_path / "run", overrides=sets, epochs=2, batch_size=8,
                 max_steps=2, quiet=True)
    first = (tmp_path / "run" / "config.yaml").read_text()
    run_training("finetune", None, None, resume=tmp_path / "run", quiet=True)
    # the same config and recipe line, the line now said to be the one of the run's start
    assert (tmp_path / "run" / "config.yaml").read_text() == first.replace("# recipe ", "# as the run started: recipe ") \
        .replace("#   batch ", "# as the run started: batch ")


def test_the_recipe_line_names_the_auto_augment_share_only_with_an_auto_augment():
    """At 100 of 300 epochs TrivialAugment touches 59 % of the images, and the line says so;
    with `auto_augment: none` set by the user the fitted share means nothing and is not shown."""
    from mmlit_cli.recipe import describe

    line = describe(fitted("s", ["finetune.epochs=100"]), "finetune", 300)
    assert "TrivialAugment on 59% of images" in line
    off = fitted("s", ["finetune.epochs=100", "finetune.augment.auto_augment=none"],
                 pinned={"finetune.augment.auto_augment"})
    assert off.finetune.augment.auto_augment_prob == 1.0 and " of images" not in describe(off, "finetune", 300)
