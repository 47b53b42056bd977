#!/usr/bin/env python
"""kornia.augmentation against mmlit's own batched augmentation (`BatchAugment`), on one device.

kornia is the field's library for batched augmentation with per-sample parameters, so issue 24
asks whether mmlit should use it instead of its own tensor ops. Two questions, two tables:

1. Does it do what the recipe needs? Per image: its own op and magnitude (TrivialAugmentWide,
   RandAugment), and for crop/flip an exact crop of the reflect-padded image. Measured here:
   the number of distinct ops in one augmented batch (kornia's auto-augment policies choose
   their ops once per call, for the whole batch), and the share of kornia's crop+flip outputs
   that equal one of the 2 x (2p+1)^2 exact crops/flips torchvision's RandomCrop would give.
2. Is it faster? images/s of each stage on a batch of real images (uint8 in, as the device
   loader holds them; kornia works in float, so its figure includes the conversion).

    python benchmarks/bench_kornia.py --dataset /tmp/c10/s5k/train            # CPU
    python benchmarks/bench_kornia.py --dataset /tmp/cifar10/train --device cuda --batch 512

kornia is not a dependency of mmlit: `pip install kornia` to run this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (also puts the repository root on sys.path)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import format_table, machine_info, machine_line, median, pick_device, timed  # noqa: E402
from mmlit_cli.config import load_config  # noqa: E402
from mmlit_cli.data import BatchAugment, load_split  # noqa: E402
from mmlit_cli.data.batch_augment import OPS, sample_ops, magnitude_table, signed_ops  # noqa: E402


def kornia_stages(size: int, pad: int):
    """kornia's closest equivalent of each stage of the paper recipe, on float images in [0, 1]."""
    import kornia.augmentation as K
    from kornia.augmentation.auto import RandAugment, TrivialAugment
    return {
        "crop + flip": K.AugmentationSequential(
            K.RandomCrop((size, size), padding=pad, padding_mode="reflect"), K.RandomHorizontalFlip()),
        "TrivialAugment": K.AugmentationSequential(TrivialAugment()),
        "RandAugment n2 m9": K.AugmentationSequential(RandAugment(n=2, m=9)),
        "random erasing": K.RandomErasing(p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 3.3)),
    }


def mmlit_stages(size: int, pad: int):
    return {
        "crop + flip": BatchAugment(size, crop_padding=pad, hflip=0.5),
        "TrivialAugment": BatchAugment(size, auto_augment="trivial"),
        "RandAugment n2 m9": BatchAugment(size, auto_augment="rand", randaug_num_ops=2, randaug_magnitude=9),
        "random erasing": BatchAugment(size, random_erasing=0.25),
    }


def kornia_ops_per_batch(images: torch.Tensor, calls: int) -> list[int]:
    """Distinct ops kornia's TrivialAugment applies within one batch, over `calls` calls."""
    from kornia.augmentation.auto import TrivialAugment
    aug = TrivialAugment()
    counts = []
    for _ in range(calls):
        params = aug.forward_parameters(images.shape)
        counts.append(len({p.name for p in params}))
    return counts


def exact_crop_share(images: torch.Tensor, out: torch.Tensor, pad: int) -> float:
    """Share of rows of `out` equal (to within uint8 rounding) to some crop of the
    reflect-padded image, flipped or not: what torchvision's RandomCrop + flip produce."""
    size = images.shape[-1]
    padded = F.pad(images.float(), (pad,) * 4, mode="reflect")
    hits = 0
    for i in range(len(images)):
        target = (out[i] * 255).round()
        found = False
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                crop = padded[i, :, dy:dy + size, dx:dx + size]
                if torch.equal(crop, target) or torch.equal(crop.flip(-1), target):
                    found = True
                    break
            if found:
                break
        hits += found
    return hits / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True, help="an image folder (e.g. CIFAR-10 JPEGs)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per stage and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    try:
        import kornia
    except ImportError:
        sys.exit("bench_kornia needs kornia: pip install kornia")

    device = pick_device(args.device)
    cfg = load_config("xxs")
    size, pad = cfg.model.image_size, cfg.finetune.augment.crop_padding
    data = load_split(str(args.dataset), "train", size, holdout=False)
    images = data.images[:args.batch].to(device)
    print(machine_line(machine_info(device)) + f", kornia {kornia.__version__}")

    # 1. What each library does per image.
    ops_kornia = kornia_ops_per_batch(images, 50)
    gen = torch.Generator(device=device).manual_seed(0)
    ours = sample_ops(len(images), magnitude_table("trivial", size).to(device), signed_ops().to(device), gen)
    kcrop = kornia_stages(size, pad)["crop + flip"](images.float() / 255)
    mcrop = mmlit_stages(size, pad)["crop + flip"](images, gen).float() / 255
    print(format_table(
        ["check", "kornia", "mmlit", "torchvision (per image)"],
        [["distinct TrivialAugment ops in one batch (mean of 50 calls)",
          f"{sum(ops_kornia) / len(ops_kornia):.1f}", ours.op.unique().numel(), f"up to {len(OPS)}"],
         ["crop+flip rows equal to an exact reflect-pad crop", f"{100 * exact_crop_share(images.cpu(), kcrop.cpu(), pad):.1f} %",
          f"{100 * exact_crop_share(images.cpu(), mcrop.cpu(), pad):.1f} %", "100 %"]],
        title=f"Per-sample semantics, batch {len(images)}"))

    # 2. Speed: alternate the two libraries within each round.
    k_stages, m_stages = kornia_stages(size, pad), mmlit_stages(size, pad)
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name in m_stages:
            k, m = k_stages[name].to(device), m_stages[name]
            for lib, fn in (("kornia", lambda: k(images.float() / 255)), ("mmlit", lambda: m(images, gen))):
                fn()  # warm-up
                seconds = timed(fn, device, args.repeat) / args.repeat
                rates.setdefault((name, lib), []).append(len(images) / seconds)
    rows = []
    for name in m_stages:
        k, m = median(rates[(name, "kornia")]), median(rates[(name, "mmlit")])
        rows.append([name, f"{k:,.0f}", f"{m:,.0f}", f"{m / k:.2f}x"])
    print(format_table(["stage", "kornia img/s", "mmlit img/s", "mmlit / kornia"], rows,
                       title=f"Speed, batch {len(images)}, median of {args.rounds} rounds x {args.repeat} calls"))


if __name__ == "__main__":
    main()
