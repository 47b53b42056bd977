"""Batched per-sample augmentation (`data/batch_augment.py`) against torchvision.

For fixed parameters every op must compute exactly what torchvision's functional op computes
on that image; the draws must follow torchvision's sampling (chi-square against draws taken
from torchvision's own TrivialAugmentWide / RandAugment); images in one batch must draw
independently; the same generator seed must give the same batch.
"""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mmlit_cli.config import AugmentConfig
from mmlit_cli.data.augment import RandomErasingUint8
from mmlit_cli.data.batch_augment import (OPS, SIGNED, BatchAugment, CropFlipParams, EraseParams, OpParams,
                                          apply_ops, crop_flip, erase, magnitude_table, sample_crop_flip,
                                          sample_erasing, sample_ops, signed_ops)

S = 12  # image size of the tests: every op has borders, interiors and ties at this size


def varied_images(n: int = 24, size: int = S) -> torch.Tensor:
    """uint8 [n, 3, size, size] covering what the ops branch on: noise, smooth gradients,
    grey pixels (r = g = b), flat channels (autocontrast/equalize do nothing there),
    low-contrast images and saturated ones."""
    g = torch.Generator().manual_seed(0)
    out = [torch.randint(0, 256, (n // 4, 3, size, size), generator=g, dtype=torch.uint8)]
    ramp = torch.linspace(0, 255, size).round().to(torch.uint8)
    out.append(torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
                            ramp.flip(0).view(1, -1).expand(size, size)])[None].repeat(2, 1, 1, 1))
    grey = torch.randint(0, 256, (n // 4, 1, size, size), generator=g, dtype=torch.uint8).expand(-1, 3, -1, -1)
    out.append(grey.contiguous())
    flat = torch.full((2, 3, size, size), 77, dtype=torch.uint8)
    flat[1, 0] = 200  # one flat channel beside two others
    flat[1, 1, :size // 2] = 10
    out.append(flat)
    low = torch.randint(100, 108, (n // 4, 3, size, size), generator=g, dtype=torch.uint8)
    out.append(low)
    out.append(torch.tensor([0, 255], dtype=torch.uint8)[torch.randint(0, 2, (2, 3, size, size), generator=g)])
    return torch.cat(out)


def torchvision_op(image: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """torchvision's own application of one auto-augment op (what TrivialAugmentWide and
    RandAugment call), with their default nearest interpolation and fill."""
    ta = v2.TrivialAugmentWide()
    return ta._apply_image_or_video_transform(image, name, magnitude, interpolation=ta.interpolation, fill=ta._fill)


@pytest.mark.parametrize("policy", ["trivial", "rand"])
def test_every_op_at_every_magnitude_equals_torchvisions_functional_op(policy):
    images = varied_images()
    table = magnitude_table(policy, S)
    n = len(images)
    for index, name in enumerate(OPS):
        signs = (1, -1) if name in SIGNED else (1,)
        for b in range(table.shape[1]):
            for sign in signs:
                magnitude = float(table[index, b]) * sign
                ours = apply_ops(images, OpParams(torch.full((n,), index), torch.full((n,), magnitude,
                                                                                       dtype=torch.float64)))
                theirs = torch.stack([torchvision_op(im, name, magnitude) for im in images])
                assert torch.equal(ours, theirs), (name, magnitude, int((ours != theirs).sum()))


def tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32's 10-bit mantissa (to nearest, ties to even), as a GPU's tensor
    cores read a convolution's operands when cuDNN may use TF32 (torch's default)."""
    bits = t.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


def test_sharpness_is_exact_when_the_convolution_computes_in_tf32(monkeypatch):
    """cuDNN convolves float32 in TF32 unless told not to (torch gives this depthwise blur its
    own float32 CUDA kernel today); whichever backend runs it, the blur must round to
    torchvision's pixels (with 1/13 read in TF32, ~1 % of them moved by one)."""
    images = varied_images(48)
    n = len(images)
    table = magnitude_table("trivial", S)
    magnitudes = [float(m) * sign for m in table[OPS.index("Sharpness"), 1::6] for sign in (1, -1)]
    theirs = [torch.stack([torchvision_op(im, "Sharpness", m) for im in images]) for m in magnitudes]
    conv2d = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda x, w, *a, **k: conv2d(tf32(x), tf32(w), *a, **k))
    for m, expected in zip(magnitudes, theirs):
        ours = apply_ops(images, OpParams(torch.full((n,), OPS.index("Sharpness")),
                                          torch.full((n,), m, dtype=torch.float64)))
        assert torch.equal(ours, expected), (m, int((ours != expected).sum()))


def test_mixed_ops_in_one_batch_each_image_gets_only_its_own():
    images = varied_images()
    n = len(images)
    g = torch.Generator().manual_seed(3)
    params = sample_ops(n, magnitude_table("trivial", S), signed_ops(), g)
    ours = apply_ops(images, params)
    for i in range(n):
        expected = torchvision_op(images[i], OPS[params.op[i]], float(params.magnitude[i]))
        assert torch.equal(ours[i], expected), (i, OPS[params.op[i]])


def test_the_op_space_is_torchvisions():
    for policy, cls in (("trivial", v2.TrivialAugmentWide), ("rand", v2.RandAugment)):
        space = cls._AUGMENTATION_SPACE
        assert tuple(space) == OPS
        table = magnitude_table(policy, S)
        for index, (name, (magnitudes_fn, signed)) in enumerate(space.items()):
            assert signed == (name in SIGNED), name
            values = magnitudes_fn(31, S, S)
            expected = torch.zeros(31, dtype=torch.float64) if values is None else values.double()
            assert torch.equal(table[index], expected), name


@pytest.mark.parametrize("pad", [0, 2, 4])
def test_crop_and_flip_equal_torchvisions_pad_crop_and_flip(pad):
    images = varied_images()
    n = len(images)
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            for flip in (False, True):
                p = CropFlipParams(torch.full((n,), top), torch.full((n,), left), torch.full((n,), flip))
                ours = crop_flip(images, p, pad)
                padded = TF.pad(images, [pad] * 4, padding_mode="reflect") if pad else images
                theirs = TF.crop(padded, top, left, S, S)
                theirs = TF.horizontal_flip(theirs) if flip else theirs
                assert torch.equal(ours, theirs), (pad, top, left, flip)


def test_crop_pads_with_zeros_when_the_padding_is_not_smaller_than_the_image():
    images = varied_images(8, size=4)
    n, pad = len(images), 5
    for top, left in ((0, 0), (3, 7), (10, 10), (5, 5)):
        p = CropFlipParams(torch.full((n,), top), torch.full((n,), left), torch.zeros(n, dtype=torch.bool))
        theirs = TF.crop(TF.pad(images, [pad] * 4, fill=0), top, left, 4, 4)
        assert torch.equal(crop_flip(images, p, pad), theirs)


def test_erasing_equals_torchvisions_erase_with_the_same_box_and_fill():
    images = varied_images()
    n = len(images)
    g = torch.Generator().manual_seed(1)
    p = sample_erasing(n, 1.0, S, 3, g, "cpu")
    ours = erase(images, p)
    for i in range(n):
        if not p.apply[i]:
            assert torch.equal(ours[i], images[i])
            continue
        t, l, h, w = (int(v[i]) for v in (p.top, p.left, p.height, p.width))
        fill = p.noise[i, :, t:t + h, l:l + w]
        assert torch.equal(ours[i], TF.erase(images[i], t, l, h, w, fill)), i


# ---------------------------------------------------------------------- sampling


def torchvision_draws(cls, count: int, **kwargs) -> list[tuple[str, float]]:
    """(op, magnitude) as torchvision's own transform draws them, recorded at the call."""
    transform = cls(**kwargs)
    seen: list[tuple[str, float]] = []

    def record(image, transform_id, magnitude, interpolation, fill):
        seen.append((transform_id, magnitude))
        return image

    transform._apply_image_or_video_transform = record
    torch.manual_seed(0)
    image = torch.zeros(3, S, S, dtype=torch.uint8)
    while len(seen) < count:
        transform(image)
    return seen


def ours_draws(policy: str, count: int, magnitude_bin: int | None = None) -> list[tuple[str, float]]:
    g = torch.Generator().manual_seed(0)
    p = sample_ops(count, magnitude_table(policy, S), signed_ops(), g, magnitude_bin)
    return [(OPS[o], m) for o, m in zip(p.op.tolist(), p.magnitude.tolist())]


def two_sample_chi2(a: list, b: list) -> float:
    """p-value that two samples of categories come from the same distribution."""
    cats = sorted(set(a) | set(b), key=str)
    ca, cb = Counter(a), Counter(b)
    table = np.array([[ca[c] for c in cats], [cb[c] for c in cats]])
    return stats.chi2_contingency(table)[1]


def test_trivial_augment_draws_ops_magnitudes_and_signs_as_torchvision_does():
    theirs = torchvision_draws(v2.TrivialAugmentWide, 6000)
    ours = ours_draws("trivial", 20000)
    assert two_sample_chi2([o for o, _ in theirs], [o for o, _ in ours]) > 1e-3  # op
    table = magnitude_table("trivial", S)
    for name in ("ShearX", "Rotate", "Posterize", "Solarize"):
        def magnitudes(draws):
            return [abs(m) if name in SIGNED else m for o, m in draws if o == name]

        assert two_sample_chi2(magnitudes(theirs), magnitudes(ours)) > 1e-3, name
        if name != "Posterize":  # 31 distinct values: each bin once, so the bins must be uniform
            column = {float(v): b for b, v in enumerate(table[OPS.index(name)])}
            bins = [column[m] for m in magnitudes(ours)]
            assert stats.chisquare(np.bincount(bins, minlength=31)).pvalue > 1e-3, name
    for draws in (theirs, ours):
        signs = [m < 0 for o, m in draws if o in SIGNED and m != 0]
        assert stats.binomtest(sum(signs), len(signs), 0.5).pvalue > 1e-3
    # the same set of (op, magnitude) values can occur
    assert {(o, abs(m)) for o, m in theirs} <= {(o, abs(m)) for o, m in ours}


def test_rand_augment_draws_as_torchvision_does_at_its_fixed_magnitude():
    theirs = torchvision_draws(v2.RandAugment, 6000, num_ops=2, magnitude=9)
    ours = ours_draws("rand", 20000, magnitude_bin=9)
    assert two_sample_chi2(theirs, ours) > 1e-3  # (op, signed magnitude) pairs


def test_images_in_one_batch_draw_independently():
    g = torch.Generator().manual_seed(5)
    n = 2 * 14 * 14 * 40
    p = sample_ops(n, magnitude_table("trivial", S), signed_ops(), g)
    pairs = p.op.view(-1, 2)
    table = np.zeros((14, 14))
    np.add.at(table, (pairs[:, 0].numpy(), pairs[:, 1].numpy()), 1)
    assert stats.chi2_contingency(table)[1] > 1e-3
    crop = sample_crop_flip(n, 4, 0.5, g, "cpu")
    neighbours = np.zeros((9, 9))
    np.add.at(neighbours, (crop.top[0::2].numpy(), crop.top[1::2].numpy()), 1)
    assert stats.chi2_contingency(neighbours)[1] > 1e-3
    assert stats.chisquare(np.bincount(crop.left.numpy(), minlength=9)).pvalue > 1e-3
    assert stats.binomtest(int(crop.flip.sum()), n, 0.5).pvalue > 1e-3


@pytest.mark.parametrize("scale", [(0.02, 1 / 3), (0.3, 0.95)])
def test_erasing_draws_boxes_as_the_per_image_transform_does(scale):
    """At the default scale nearly every first box fits; at (0.3, 0.95) many do not, and the
    retries (up to 10, then no erasing) shape the distribution."""
    n, p = 4000, 0.5
    g = torch.Generator().manual_seed(2)
    ours = sample_erasing(n, p, S, 3, g, "cpu", scale=scale)
    torch.manual_seed(2)
    per_image = RandomErasingUint8(p, scale=scale)
    blank = torch.zeros(1, S, S, dtype=torch.uint8)
    heights, widths, applied = [], [], 0
    for _ in range(n):
        out = per_image(blank)
        changed = (out != blank)[0]
        if out is not blank:
            applied += 1
            rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
            if len(rows):  # noise can be 0 everywhere only with negligible probability
                heights.append(int(rows.max() - rows.min() + 1))
                widths.append(int(cols.max() - cols.min() + 1))
    assert stats.binomtest(int(ours.apply.sum()), n, applied / n).pvalue > 1e-3
    assert two_sample_chi2(ours.height[ours.apply].tolist(), heights) > 1e-3
    assert two_sample_chi2(ours.width[ours.apply].tolist(), widths) > 1e-3


# ---------------------------------------------------------------------- the whole recipe


def paper_augment(**changes) -> BatchAugment:
    aug = AugmentConfig(crop_padding=2, hflip=0.5, auto_augment="trivial", random_erasing=0.25)
    for k, v in changes.items():
        setattr(aug, k, v)
    return BatchAugment.from_config(aug, S)


@pytest.mark.parametrize("policy", ["trivial", "rand"])
def test_the_same_seed_gives_the_same_batch_and_another_seed_another(policy):
    images = varied_images()
    augment = paper_augment(auto_augment=policy)
    a = augment(images, torch.Generator().manual_seed(11))
    b = augment(images, torch.Generator().manual_seed(11))
    c = augment(images, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == images.shape


def test_an_augmentation_that_does_nothing_is_none_and_the_global_rng_is_untouched():
    assert BatchAugment.from_config(AugmentConfig(crop_padding=0, hflip=0.0, auto_augment="none",
                                                  random_erasing=0.0), S) is None
    torch.manual_seed(0)
    before = torch.get_rng_state()
    paper_augment()(varied_images(), torch.Generator().manual_seed(0))
    assert torch.equal(before, torch.get_rng_state())


def test_the_batched_recipe_and_the_per_image_recipe_change_images_alike():
    """Not equal draws (the generators differ) but the same kind of change: the share of
    pixels each recipe alters, and of images it leaves as they were."""
    from mmlit_cli.data import build_train_transform

    images = varied_images(96)
    aug = AugmentConfig(crop_padding=2, hflip=0.5, auto_augment="trivial", random_erasing=0.25)
    batched = BatchAugment.from_config(aug, S)(images, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    transform = build_train_transform(aug, S)
    per_image = torch.stack([transform(im) for im in images])
    changed_b = (batched != images).float().mean().item()
    changed_p = (per_image != images).float().mean().item()
    assert math.isclose(changed_b, changed_p, abs_tol=0.08), (changed_b, changed_p)


@pytest.mark.parametrize("batched", [True, False])
def test_the_auto_augment_share_is_the_share_of_images_it_touches(batched):
    """`auto_augment_prob` p (how the fitted recipe turns TrivialAugment up with the run):
    TrivialAugment alone changes about p x (the share of its draws that change an image) of
    the images, in the device path and in the workers' per-image transform alike; at p = 0 it
    is off (`BatchAugment` is None, the transform holds no op)."""
    from mmlit_cli.data import build_train_transform

    images = varied_images(3000)

    def changed_share(p: float) -> float:
        aug = AugmentConfig(crop_padding=0, hflip=0.0, auto_augment="trivial", auto_augment_prob=p,
                            random_erasing=0.0)
        if batched:
            out = BatchAugment.from_config(aug, S)(images, torch.Generator().manual_seed(3))
        else:
            torch.manual_seed(3)
            transform = build_train_transform(aug, S)
            out = torch.stack([transform(im) for im in images])
        return (out != images).flatten(1).any(1).float().mean().item()

    full = changed_share(1.0)
    assert 0.75 < full < 1.0
    assert changed_share(0.3) == pytest.approx(0.3 * full, abs=0.04)
    off = AugmentConfig(crop_padding=0, hflip=0.0, auto_augment="trivial", auto_augment_prob=0.0, random_erasing=0.0)
    assert BatchAugment.from_config(off, S) is None
    assert torch.equal(build_train_transform(off, S)(images[0]), images[0])
