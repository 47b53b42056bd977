"""`--class-balance loss|sampler`: the loss sees the training split's class frequencies, the
sampler draws every class alike (on both loader paths, sharded, the same again on --resume),
and a run on imbalanced data says so."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

from helpers import TINY, write_folder

from mmlit_cli.config import load_config
from mmlit_cli.data import DeviceLoader, ImageData, build_loader, set_epoch
from mmlit_cli.tasks import ClassifyTask
from mmlit_cli.train import run_training

COUNTS = [400, 100, 25]  # imbalance ratio 16


def imbalanced(size: int = 4) -> ImageData:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    images = torch.arange(len(labels), dtype=torch.int64).remainder(256).to(torch.uint8).view(-1, 1, 1, 1)
    return ImageData(images.expand(-1, 3, size, size).contiguous(), labels, ["a", "b", "c"], "test")


def drawn_labels(loader, epochs: int) -> torch.Tensor:
    out = []
    for e in range(epochs):
        set_epoch(loader, e)
        out += [labels for _, labels in loader]
    return torch.cat(out)


@pytest.mark.parametrize("path", ["device", "workers"])
def test_the_sampler_draws_every_class_alike(path):
    data = imbalanced()
    if path == "device":
        loader = DeviceLoader(data, 25, "cpu", shuffle=True, seed=3, balanced=True)
    else:
        loader = build_loader(data, 25, shuffle=True, seed=3, balanced=True)
    labels = drawn_labels(loader, 20)  # 20 epochs of 525 draws
    freq = torch.bincount(labels, minlength=3).double() / len(labels)
    expected = len(labels) / 3
    chi2 = float(((torch.bincount(labels, minlength=3) - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, freq  # 2 degrees of freedom, p = 0.001; unbalanced draws give chi2 in the thousands
    again = DeviceLoader(data, 25, "cpu", shuffle=True, seed=3, balanced=True) if path == "device" else \
        build_loader(data, 25, shuffle=True, seed=3, balanced=True)
    assert torch.equal(drawn_labels(again, 2), labels[: 2 * len(data)])  # a function of (seed, epoch)


def test_sharded_ranks_split_the_same_balanced_draw():
    data = imbalanced()
    whole = DeviceLoader(data, 1, "cpu", shuffle=True, seed=1, balanced=True)
    ranks = [DeviceLoader(data, 1, "cpu", shuffle=True, seed=1, balanced=True, rank=r, world_size=3) for r in range(3)]
    order = whole._order()
    for r, loader in enumerate(ranks):
        assert torch.equal(loader._order(), order[r::3])


@pytest.mark.parametrize("method", ["logit-adjust", "inverse-frequency"])
def test_the_balanced_loss_is_the_formula(method):
    cfg = load_config("xxs", TINY + ["model.num_classes=3", "finetune.class_balance=loss",
                                     f"finetune.balance_loss={method}", "finetune.augment.mix_prob=0"])
    task = ClassifyTask(cfg, ["a", "b", "c"], COUNTS)
    torch.manual_seed(0)
    with torch.no_grad():  # the head starts at zero: give it logits that differ
        task.model.head.weight.normal_()
        task.model.head.bias.normal_()
    images = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8).float()
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    torch.manual_seed(0)
    got = task.loss(task.model.eval(), images, labels)
    logits = task.model(images).float()
    prior = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
    if method == "logit-adjust":
        want = F.cross_entropy(logits + prior.log(), labels, label_smoothing=0.1)
    else:
        weight = torch.tensor([sum(COUNTS) / (3 * n) for n in COUNTS])
        want = F.cross_entropy(logits, labels, weight=weight, label_smoothing=0.1)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert got.item() != pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-3)


def test_a_run_on_imbalanced_data_says_so_and_balanced_runs_resume_exactly(tmp_path):
    data = write_folder(tmp_path / "data", per_class=4)
    for extra in range(12):  # red gets 16 images, the others 4
        (data / "red" / f"red_copy_{extra:03d}.png").write_bytes((data / "red" / "red_000.png").read_bytes())
    out = Console(record=True, width=300)
    run_training("finetune", "xxs", str(data), out=tmp_path / "plain", overrides=TINY, epochs=1, batch_size=4,
                 console=out)
    assert "imbalanced classes (14 images in the largest, 3 in the smallest); --class-balance loss or " \
           "sampler" in out.export_text()  # 16 and 4, less the 10 % held out
    for balance in ("sampler", "loss"):
        kw = dict(overrides=TINY + ["finetune.augment.mix_prob=1.0", "finetune.augment.mixup_alpha=0.8"],
                  epochs=2, batch_size=4, class_balance=balance, quiet=True, save_every=3)
        run_training("finetune", "xxs", str(data), out=tmp_path / f"{balance}-full", **kw)
        run_training("finetune", "xxs", str(data), out=tmp_path / f"{balance}-cut", max_steps=5, **kw)
        run_training("finetune", "xxs", None, resume=tmp_path / f"{balance}-cut", quiet=True)
        full = load_file(tmp_path / f"{balance}-full" / "last.safetensors")
        cut = load_file(tmp_path / f"{balance}-cut" / "last.safetensors")
        weights = [k for k in full if not k.startswith("train_state/")]
        assert all(torch.equal(full[k], cut[k]) for k in weights), balance
