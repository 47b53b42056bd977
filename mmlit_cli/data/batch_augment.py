"""Per-sample augmentation of whole uint8 batches, on the device that holds them.

`BatchAugment` does to a batch `[B, 3, S, S]` what `build_train_transform` does to each
image in a loader worker: reflect-padded random crop, horizontal flip, TrivialAugmentWide or
RandAugment, random erasing. Every image gets its own draws (crop offset, flip, op and
magnitude, erased box), yet the whole batch goes through a fixed sequence of tensor ops:

    crop + flip     one gather with per-image row/column indices (the padding is never built)
    auto-augment    one affine grid_sample for every geometric op (identity where an image's
                    op is not geometric), then the colour ops as per-image blends and
                    `torch.where` selections
    erasing         a per-image box mask, filled with uniform uint8 noise

Nothing reads a value back to the host or copies one to the device (tests/test_device_sync.py
traces a batch on a stand-in GPU), and nothing depends on how many images drew which op, so a
batch costs the same few dozen kernels on a GPU whatever the draws. Each op, for fixed
parameters, computes what torchvision's functional op computes on that image (the tests
compare them); the sampling follows torchvision's (op uniform over the 14, magnitude bin
uniform, sign a fair coin).

All randomness comes from the `torch.Generator` passed in, on the batch's device: the same
generator state gives the same batch, which is what makes `--resume` exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# torchvision's op set for TrivialAugmentWide and RandAugment, in its order.
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
OP = {name: i for i, name in enumerate(OPS)}
SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
          "Sharpness")
NUM_MAGNITUDE_BINS = 31


def magnitude_table(policy: str, size: int, num_bins: int = NUM_MAGNITUDE_BINS) -> torch.Tensor:
    """float64 [len(OPS), num_bins]: the magnitude of each op at each bin, as torchvision's
    `_AUGMENTATION_SPACE` of TrivialAugmentWide ("trivial") or RandAugment ("rand") gives it
    for a size x size image (0 for ops without a magnitude)."""
    wide = policy == "trivial"
    lin = lambda hi: torch.linspace(0.0, hi, num_bins)  # noqa: E731 - float32, as torchvision's
    rows = {
        "ShearX": lin(0.99 if wide else 0.3), "ShearY": lin(0.99 if wide else 0.3),
        "TranslateX": lin(32.0 if wide else 150.0 / 331.0 * size),
        "TranslateY": lin(32.0 if wide else 150.0 / 331.0 * size),
        "Rotate": lin(135.0 if wide else 30.0),
        "Brightness": lin(0.99 if wide else 0.9), "Color": lin(0.99 if wide else 0.9),
        "Contrast": lin(0.99 if wide else 0.9), "Sharpness": lin(0.99 if wide else 0.9),
        "Posterize": (8 - (torch.arange(num_bins) / ((num_bins - 1) / (6 if wide else 4)))).round().int(),
        "Solarize": torch.linspace(1.0, 0.0, num_bins),
    }
    table = torch.zeros(len(OPS), num_bins, dtype=torch.float64)
    for name, values in rows.items():
        table[OP[name]] = values.double()  # float(magnitudes[i]), as torchvision reads them
    return table


# --------------------------------------------------------------------------------------------
# Parameters: drawn on the device, one row per image
# --------------------------------------------------------------------------------------------

@dataclass
class CropFlipParams:
    top: torch.Tensor  # long [B], 0..2*pad: the crop's offset in the padded image
    left: torch.Tensor  # long [B]
    flip: torch.Tensor  # bool [B]


@dataclass
class OpParams:
    op: torch.Tensor  # long [B], an index into OPS
    magnitude: torch.Tensor  # float64 [B], signed


@dataclass
class EraseParams:
    apply: torch.Tensor  # bool [B]
    top: torch.Tensor  # long [B]
    left: torch.Tensor  # long [B]
    height: torch.Tensor  # long [B]
    width: torch.Tensor  # long [B]
    noise: torch.Tensor  # uint8 [B, C, S, S]: the fill (only the box is used)


def sample_crop_flip(n: int, pad: int, hflip: float, gen: torch.Generator, device) -> CropFlipParams:
    top = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=device)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=device)
    flip = torch.rand(n, generator=gen, device=device) < hflip
    return CropFlipParams(top, left, flip)


def signed_ops() -> torch.Tensor:
    """bool [len(OPS)]: which ops take a random sign."""
    return torch.tensor([name in SIGNED for name in OPS])


def sample_ops(n: int, table: torch.Tensor, signed: torch.Tensor, gen: torch.Generator,
               magnitude_bin: int | None = None) -> OpParams:
    """One op per image: op uniform over OPS, magnitude bin uniform (or `magnitude_bin`, as
    RandAugment fixes it), and for signed ops the sign negative with probability 1/2.
    `table` (`magnitude_table`) and `signed` (`signed_ops`) are on the generator's device."""
    device = table.device
    op = torch.randint(0, len(OPS), (n,), generator=gen, device=device)
    if magnitude_bin is None:
        bins = torch.randint(0, table.shape[1], (n,), generator=gen, device=device)
    else:
        bins = torch.full((n,), magnitude_bin, dtype=torch.long, device=device)
    negative = torch.rand(n, generator=gen, device=device) <= 0.5  # torchvision: `torch.rand(()) <= 0.5`
    magnitude = table[op, bins]
    magnitude = torch.where(negative & signed[op], -magnitude, magnitude)
    return OpParams(op, magnitude)


def sample_erasing(n: int, p: float, size: int, channels: int, gen: torch.Generator, device,
                   scale: tuple[float, float] = (0.02, 1 / 3), ratio: tuple[float, float] = (0.3, 3.3),
                   attempts: int = 10) -> EraseParams:
    """`RandomErasingUint8`'s draws for every image at once: with probability `p`, the first
    of `attempts` (area, log-uniform aspect) boxes that fits inside the image."""
    area = size * size
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=gen, device=device,
                                                                  dtype=torch.float64))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, attempts, generator=gen, device=device,
                                                              dtype=torch.float64))
    heights = torch.sqrt(target * aspect).round().long()
    widths = torch.sqrt(target / aspect).round().long()
    fits = (heights > 0) & (heights < size) & (widths > 0) & (widths < size)
    first = fits.int().argmax(1, keepdim=True)  # the first box that fits (0 when none does)
    height, width = heights.gather(1, first)[:, 0], widths.gather(1, first)[:, 0]
    apply = (torch.rand(n, generator=gen, device=device) < p) & fits.any(1)
    top = (torch.rand(n, generator=gen, device=device, dtype=torch.float64) * (size - height + 1)).long()
    left = (torch.rand(n, generator=gen, device=device, dtype=torch.float64) * (size - width + 1)).long()
    noise = torch.randint(0, 256, (n, channels, size, size), generator=gen, device=device, dtype=torch.uint8)
    return EraseParams(apply, top, left, height, width, noise)


# --------------------------------------------------------------------------------------------
# Applying them
# --------------------------------------------------------------------------------------------

def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect-padding's source index for `index` in -size+1 .. 2*size-2 (edge not repeated)."""
    index = index.abs()
    return (size - 1) - (size - 1 - index).abs()


def crop_flip(images: torch.Tensor, p: CropFlipParams, pad: int) -> torch.Tensor:
    """Random crop of the `pad`-padded image (reflect padding; zeros when pad >= size, where
    reflection is undefined) at (top, left), then a horizontal flip where `flip`."""
    b, c, h, w = images.shape
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = p.top[:, None] - pad + ar_h  # [B, H], in unpadded coordinates
    cols = p.left[:, None] - pad + torch.where(p.flip[:, None], ar_w.flip(0), ar_w)
    if pad < min(h, w):
        inside = None
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    else:
        inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    out = images.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    return out if inside is None else out * inside


def _inverse_affine(op: torch.Tensor, magnitude: torch.Tensor, size: int) -> torch.Tensor:
    """float32 [B, 2, 3]: torchvision's inverse affine matrix (`_get_inverse_affine_matrix`)
    of each image's geometric op as `_apply_image_or_video_transform` calls it; the identity
    for every other op. Computed in float64 like torchvision's Python floats."""
    m = magnitude
    zero, one = torch.zeros_like(m), torch.ones_like(m)
    half = size * 0.5
    # ShearX: F.affine(shear=[deg(atan(m)), 0], center=[0, 0]) -> [1, tan, -tan * cy; 0, 1, 0], cy = -size/2
    tan_x = torch.tan(torch.deg2rad(torch.rad2deg(torch.atan(m))))
    shear_x = torch.stack([one, tan_x, -tan_x * -half, zero, one, zero], -1)
    # ShearY: F.affine(shear=[0, deg(atan(m))], center=[0, 0])
    sy = torch.deg2rad(torch.rad2deg(torch.atan(m)))
    a = torch.cos(-sy) / torch.cos(sy)
    c = torch.sin(-sy) / torch.cos(sy)
    shear_y = torch.stack([one, zero, zero, -c, a, -half - (-c) * -half - a * -half], -1)
    # TranslateX/Y: F.affine(translate=[int(m), 0]); the inverse moves by -int(m)
    t = -torch.trunc(m)
    translate_x = torch.stack([one, zero, t, zero, one, zero], -1)
    translate_y = torch.stack([one, zero, zero, zero, one, t], -1)
    # Rotate: F.rotate(angle=m) -> affine of -(m mod 360) about the centre
    rot = torch.deg2rad(-torch.remainder(m, 360.0))
    rotate = torch.stack([torch.cos(rot), torch.sin(rot), zero, -torch.sin(rot), torch.cos(rot), zero], -1)
    identity = torch.stack([one, zero, zero, zero, one, zero], -1)
    matrix = identity
    for name, candidate in (("ShearX", shear_x), ("ShearY", shear_y), ("TranslateX", translate_x),
                            ("TranslateY", translate_y), ("Rotate", rotate)):
        matrix = torch.where((op == OP[name])[:, None], candidate, matrix)
    return matrix.float().view(-1, 2, 3)


def _affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """torchvision's `_affine_grid` + `_apply_grid_transform` (nearest, zero fill) with one
    matrix per image."""
    b, _, h, w = images.shape
    device = images.device
    base = torch.empty(1, h, w, 3, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    half_size = torch.stack([torch.full((), 0.5 * w, device=device), torch.full((), 0.5 * h, device=device)])
    scaled = theta.transpose(1, 2).div(half_size)  # built on the device: no host-to-device copy per batch
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
    out = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(torch.uint8)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """torchvision's float grayscale of uint8 pixels, floored as its uint8 colour ops floor it:
    [B, 1, H, W]. The channels stay uint8 as in torchvision: float and mixed-dtype adds round
    differently (fused multiply-add or not), and a floor turns that into a grey level."""
    r, g, b = x.to(torch.uint8).unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).floor_()


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a + b * c rounded once, as torchvision's `a.add_(b, alpha=c)` computes it (a fused
    multiply-add): the float32 product is exact in float64, so only the sum rounds."""
    return (a.double() + b.double() * c.double()).float()


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """torchvision's `autocontrast_image` on float pixels, without its boolean-mask writes
    (they read a count back to the host): channels with max == min stay as they are."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    inv_scale = torch.where(flat, 1.0, (hi - lo).mul_(1.0 / 255))
    lo = torch.where(flat, 0.0, lo)
    return (x - lo).div_(inv_scale).clamp_(0, 255).floor_()


def _sharpen_degenerate(x: torch.Tensor) -> torch.Tensor:
    """torchvision's `adjust_sharpness_image` blur: 3x3 (1, 5 centre)/13, rounded; the border
    keeps its pixels. The convolution sums integers (weights 1 and 5, pixels 0..255), exact in
    whatever precision the backend computes (cuDNN's TF32 would read 1/13 with a 10-bit
    mantissa, enough to move ~1 % of the rounded pixels); the one division by 13 then rounds as
    torchvision's float32 sum does, since an integer over 13 is never within 1/26 of a half."""
    # 5 in the centre, ones around it, made on the device: `kernel[1, 1] = 5.0` would copy a
    # host scalar there, which waits for every kernel queued before it
    kernel = F.pad(torch.full((1, 1), 5.0, device=x.device), (1, 1, 1, 1), value=1.0)
    kernel = kernel.expand(x.shape[1], 1, 3, 3)
    blurred = F.conv2d(x, kernel, groups=x.shape[1]).div_(13.0).round_()
    return F.pad(blurred, (1, 1, 1, 1)) + x * _border(x)


def _border(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    mask = torch.ones(h, w, device=x.device)
    mask[1:-1, 1:-1] = 0
    return mask


def apply_ops(images: torch.Tensor, p: OpParams) -> torch.Tensor:
    """Each image through its own op (OPS[p.op]) at its own magnitude."""
    op, m = p.op, p.magnitude
    size = images.shape[-1]
    x = _affine(images, _inverse_affine(op, m, size)).float()  # geometric ops; exact identity elsewhere

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.float()[:, None, None, None]

    def chosen(*names: str) -> torch.Tensor:
        hit = torch.zeros_like(op, dtype=torch.bool)
        for name in names:
            hit |= op == OP[name]
        return hit[:, None, None, None]

    # Brightness, Color, Contrast: torchvision's _blend(x, degenerate, 1 + m), truncated to uint8
    factor = 1.0 + m
    degenerate = torch.where(chosen("Color"), _grey(x), 0.0)
    degenerate = torch.where(chosen("Contrast"), _grey(x).mean(dim=(-3, -2, -1), keepdim=True), degenerate)
    blend = chosen("Brightness", "Color", "Contrast")
    blended = _fma(x.mul(per_image(factor)), degenerate, per_image(1.0 - factor)).clamp_(0, 255).trunc_()
    x = torch.where(blend, blended, x)
    # Sharpness: torchvision blends the interior as x + (1 - f) * (blur - x), then rounds down
    sharp = chosen("Sharpness")
    sharpened = _fma(x, _sharpen_degenerate(x) - x, per_image(1.0 - factor))
    x = torch.where(sharp, sharpened.clamp_(0, 255).trunc_(), x)
    # Posterize: keep the top int(m) bits; Solarize: invert pixels >= 255 * m
    bits = torch.where(op == OP["Posterize"], m.long(), 8).clamp(0, 8)
    mask = (((1 << bits) - 1) << (8 - bits))[:, None, None, None]
    x = (x.to(torch.uint8) & mask.to(torch.uint8)).float()
    threshold = torch.where(op == OP["Solarize"], 255.0 * m, 256.0)
    x = torch.where(x >= per_image(threshold), 255.0 - x, x)
    x = torch.where(chosen("AutoContrast"), _autocontrast(x), x)
    out = x.to(torch.uint8)
    from torchvision.transforms.v2.functional import equalize  # batched, sync-free
    return torch.where(chosen("Equalize"), equalize(out), out)


def erase(images: torch.Tensor, p: EraseParams) -> torch.Tensor:
    h, w = images.shape[-2:]
    rows = torch.arange(h, device=images.device)[None, :]
    cols = torch.arange(w, device=images.device)[None, :]
    in_rows = (rows >= p.top[:, None]) & (rows < (p.top + p.height)[:, None])
    in_cols = (cols >= p.left[:, None]) & (cols < (p.left + p.width)[:, None])
    box = (in_rows[:, :, None] & in_cols[:, None, :] & p.apply[:, None, None])[:, None]
    return torch.where(box, p.noise, images)


# --------------------------------------------------------------------------------------------
# The whole per-sample recipe
# --------------------------------------------------------------------------------------------

@dataclass
class BatchAugment:
    """The recipe's per-sample augmentation (`AugmentConfig`) for whole batches."""

    image_size: int
    crop_padding: int = 0
    hflip: float = 0.0
    auto_augment: str = "none"  # trivial | rand | none
    auto_augment_prob: float = 1.0  # the share of images that get it
    randaug_num_ops: int = 2
    randaug_magnitude: int = 9
    random_erasing: float = 0.0

    @classmethod
    def from_config(cls, aug, image_size: int) -> BatchAugment | None:
        """From an `AugmentConfig`; None when it augments nothing per sample."""
        made = cls(image_size, aug.crop_padding, aug.hflip, aug.auto_augment, aug.auto_augment_prob,
                   aug.randaug_num_ops, aug.randaug_magnitude, aug.random_erasing)
        return made if made.active else None

    def __post_init__(self) -> None:
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _op_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(magnitude table, signed mask) on `device`, copied there once."""
        key = str(device)
        if key not in self._tables:
            policy = "trivial" if self.auto_augment == "trivial" else "rand"
            self._tables[key] = (magnitude_table(policy, self.image_size).to(device), signed_ops().to(device))
        return self._tables[key]

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.hflip > 0 or self.augments or self.random_erasing > 0)

    @property
    def augments(self) -> bool:
        """Whether TrivialAugment / RandAugment touches any image."""
        return self.auto_augment != "none" and self.auto_augment_prob > 0

    def _sample_ops(self, n: int, gen: torch.Generator, device, keep: torch.Tensor | None,
                    magnitude_bin: int | None = None) -> OpParams:
        """`sample_ops`, with Identity for the images `keep` leaves out (None: all kept)."""
        ops = sample_ops(n, *self._op_tables(device), gen, magnitude_bin)
        if keep is None:
            return ops
        return OpParams(torch.where(keep, ops.op, 0), torch.where(keep, ops.magnitude, torch.zeros_like(ops.magnitude)))

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, c = images.shape[:2]
        device = images.device
        if self.crop_padding or self.hflip > 0:
            images = crop_flip(images, sample_crop_flip(n, self.crop_padding, self.hflip, gen, device),
                               self.crop_padding)
        if self.augments:
            # as RandomApply([op], p) per image: one draw, for all of RandAugment's ops; none at p = 1
            keep = torch.rand(n, generator=gen, device=device) < self.auto_augment_prob \
                if self.auto_augment_prob < 1 else None
            trivial = self.auto_augment == "trivial"  # one op at a random magnitude; RandAugment: N at m
            for _ in range(1 if trivial else self.randaug_num_ops):
                images = apply_ops(images, self._sample_ops(n, gen, device, keep,
                                                            None if trivial else self.randaug_magnitude))
        if self.random_erasing > 0:
            images = erase(images, sample_erasing(n, self.random_erasing, self.image_size, c, gen, device))
        return images
