"""The device-resident loader (`data/device_loader.py`): order, sharding, resumable batches,
the choice `loader: auto` makes, and runs that record it."""

import dataclasses
import json

import pytest
import torch

from mmlit_cli.checkpoint import load_checkpoint, save_checkpoint
from mmlit_cli.config import AugmentConfig
from mmlit_cli.data import BatchAugment, DeviceLoader, ImageData, build_loader, choose_loader, set_epoch
from mmlit_cli.errors import MmlitError
from mmlit_cli.train import run_training
from helpers import TINY, write_folder


def numbered(n: int, size: int = 8) -> ImageData:
    """Image i is filled with i % 256 in channel 0 and i // 256 in channel 1; its label is i."""
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    images[:, 0] = (torch.arange(n) % 256).view(-1, 1, 1).to(torch.uint8)
    images[:, 1] = (torch.arange(n) // 256).view(-1, 1, 1).to(torch.uint8)
    return ImageData(images, torch.arange(n), [str(i) for i in range(n)], "numbered", [])


def ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()


def epoch_of(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    set_epoch(loader, epoch)
    return list(loader)


def test_each_epoch_is_a_permutation_with_labels_aligned_and_fixed_by_seed_and_epoch():
    data = numbered(300)
    loader = DeviceLoader(data, 32, "cpu", shuffle=True, seed=4)
    orders = []
    for epoch in (0, 1, 0):
        batches = epoch_of(loader, epoch)
        seen = [i for images, labels in batches for i in ids(images)]
        assert sorted(seen) == list(range(300))
        assert all(ids(images) == labels.tolist() for images, labels in batches)
        orders.append(seen)
    assert orders[0] == orders[2] and orders[0] != orders[1]
    assert orders[0] != ids(epoch_of(DeviceLoader(data, 300, "cpu", shuffle=True, seed=5), 0)[0][0])
    assert ids(epoch_of(DeviceLoader(data, 300, "cpu"), 0)[0][0]) == list(range(300))  # unshuffled: in order


@pytest.mark.parametrize("n,batch,world,drop_last", [(300, 32, 1, False), (300, 32, 1, True), (301, 16, 2, True),
                                                     (301, 16, 2, False), (7, 4, 3, False)])
def test_shards_split_an_epoch_as_the_distributed_worker_loader_does(n, batch, world, drop_last):
    """Same number of batches per rank as `build_loader(distributed=True)`; ranks take
    disjoint shares that cover the split (trimmed with drop_last, padded from the start
    without)."""
    data = numbered(n)
    shares = []
    for rank in range(world):
        loader = DeviceLoader(data, batch, "cpu", shuffle=True, drop_last=drop_last, seed=1, rank=rank,
                              world_size=world)
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                                          seed=1, drop_last=drop_last)
            expected = len(torch.utils.data.DataLoader(range(n), batch_size=batch, sampler=sampler,
                                                       drop_last=drop_last))
        else:
            expected = len(build_loader(data, batch, None, shuffle=True, drop_last=drop_last, seed=1))
        assert len(loader) == expected == len(epoch_of(loader, 0))
        shares.append([i for images, _ in epoch_of(loader, 0) for i in ids(images)])
    flat = [i for share in shares for i in share]
    if drop_last:
        assert len(set(flat)) == len(flat)
    else:
        assert set(flat) == set(range(n))


def test_batches_from_any_start_are_the_ones_a_full_epoch_gives_augmentation_included():
    data = numbered(200)
    augment = BatchAugment.from_config(AugmentConfig(crop_padding=2, hflip=0.5, auto_augment="trivial",
                                                     random_erasing=0.5), 8)
    loader = DeviceLoader(data, 16, "cpu", augment, shuffle=True, drop_last=True, seed=7)
    set_epoch(loader, 3)
    full = list(loader)
    for start in (0, 5, len(full) - 1):
        tail = list(loader.batches(start))
        assert len(tail) == len(full) - start
        for (a, la), (b, lb) in zip(full[start:], tail):
            assert torch.equal(a, b) and torch.equal(la, lb)
    other = DeviceLoader(data, 16, "cpu", augment, shuffle=True, drop_last=True, seed=8)
    set_epoch(other, 3)
    assert not torch.equal(next(iter(other))[0], full[0][0])


def test_ranks_augment_differently_and_the_global_rng_is_left_alone():
    data = numbered(64)
    augment = BatchAugment.from_config(AugmentConfig(crop_padding=2, auto_augment="trivial"), 8)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = next(iter(DeviceLoader(data, 32, "cpu", augment, seed=1, rank=0, world_size=1)))[0]
    b = next(iter(DeviceLoader(data, 32, "cpu", augment, seed=1, rank=1, world_size=2)))[0]
    assert not torch.equal(a, b)
    assert torch.equal(before, torch.get_rng_state())


def test_auto_puts_the_split_on_a_gpu_when_it_fits_and_uses_workers_when_not(monkeypatch):
    assert choose_loader(torch.device("cpu"), 10**9)[0] == "device"
    assert choose_loader(torch.device("mps"), 10)[0] == "workers"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 80 * 2**30))
    assert choose_loader(torch.device("cuda"), 200 * 2**20)[0] == "device"
    kind, why = choose_loader(torch.device("cuda"), 4 * 2**30)
    assert kind == "workers" and "4096 MB" in why


# ---------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("data") / "colours")


def finetune(folder, out, **kw):
    return run_training("finetune", "xxs", str(folder), out=out, overrides=TINY, epochs=kw.pop("epochs", 2),
                        batch_size=8, quiet=True, **kw)


def test_a_run_records_the_loader_auto_chose_and_its_resume_keeps_it(folder, tmp_path):
    out = tmp_path / "run"
    finetune(folder, out, epochs=1)
    assert "loader: device" in (out / "config.yaml").read_text()
    assert load_checkpoint(out / "last.safetensors").config.finetune.loader == "device"
    with pytest.raises(MmlitError, match="--loader device; a resumed run keeps it"):
        run_training("finetune", None, None, resume=out, epochs=2, loader="workers", quiet=True)


def test_a_run_from_before_the_device_loader_resumes_on_loader_workers(folder, tmp_path):
    """Its checkpoint's config says `loader: auto` (the key's default when it did not exist):
    its batches came from loader workers, and the resume must draw the same ones."""
    full, part = tmp_path / "full", tmp_path / "part"
    finetune(folder, full, epochs=2, loader="workers")
    finetune(folder, part, epochs=2, loader="workers", max_steps=6, save_every=0)
    last = part / "last.safetensors"
    ckpt = load_checkpoint(last, with_train_state=True)
    ckpt.config = dataclasses.replace(ckpt.config, finetune=dataclasses.replace(ckpt.config.finetune, loader="auto"))
    save_checkpoint(last, ckpt)
    run_training("finetune", None, None, resume=part, quiet=True)
    assert load_checkpoint(part / "last.safetensors").config.finetune.loader == "workers"
    a = [json.loads(x)["train_loss"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["train_loss"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert a == pytest.approx(b, rel=1e-5)


# --------------------------------------------------------------------------- GPU defaults


def _plan_on(tmp_path, device_type: str, train_images: int, **shortcuts):
    """A new finetune run's config as `run_training` fits it on a `device_type` device."""
    from mmlit_cli.tasks import TASKS
    from mmlit_cli.train import _new_run
    full = dict(epochs=None, batch_size=None, lr=None, seed=None, workers=None, recipe=None, loader=None) | shortcuts
    # probe=False: a plan, as --print-config makes it, that no run follows (nothing made or locked)
    plan = _new_run("finetune", TASKS["finetune"], "xxs", "unused", None, False, None, None, full, tmp_path / "run",
                    probe=False)
    return plan.fit_to("finetune", train_images, device_type).cfg.finetune


def test_cuda_raises_an_unset_batch_and_the_lr_follows(tmp_path):
    cpu = _plan_on(tmp_path, "cpu", 45_000)
    cuda = _plan_on(tmp_path, "cuda", 45_000)
    assert cpu.batch_size == 128 and cuda.batch_size == 512
    assert cuda.lr == pytest.approx(cpu.lr * 4)  # rule 1: lr_base per 256 images x global batch
    assert cuda.workers >= cpu.workers


def test_cuda_keeps_the_batch_when_the_epoch_would_be_too_short_or_it_was_set(tmp_path):
    assert _plan_on(tmp_path, "cuda", 128 * 32 - 1).batch_size == 128  # under 32 steps at 128: stays
    assert _plan_on(tmp_path, "cuda", 512 * 31).batch_size == 496  # as far as the epoch keeps 32 steps
    assert _plan_on(tmp_path, "cuda", 512 * 32).batch_size == 512
    assert _plan_on(tmp_path, "cuda", 45_000, batch_size=256).batch_size == 256
    assert _plan_on(tmp_path, "cuda", 45_000, workers=1).workers == 1


def test_a_short_cuda_run_gets_the_batch_rules_smaller_batch(tmp_path):
    """The device's 512 is the top of the batch rule: round(45,000 x epochs / 1,500) within
    64..512, so a short GPU run keeps its steps (2 epochs: 60 -> 64; 12: 360; 30: 900 -> 512)."""
    assert [_plan_on(tmp_path, "cuda", 45_000, epochs=e).batch_size for e in (2, 12, 30)] == [64, 360, 512]
    assert _plan_on(tmp_path, "cpu", 45_000, epochs=2).batch_size == 64
    assert _plan_on(tmp_path, "cuda", 45_000, epochs=2, batch_size=512).batch_size == 512  # set: kept


def test_compile_is_on_by_default_only_on_cuda_for_long_runs():
    from mmlit_cli.engine import COMPILE_PAYS_AFTER_STEPS, compile_pays
    assert compile_pays(torch.device("cuda"), COMPILE_PAYS_AFTER_STEPS)
    assert not compile_pays(torch.device("cuda"), COMPILE_PAYS_AFTER_STEPS - 1)
    assert not compile_pays(torch.device("cpu"), 10 ** 6)


def test_the_cuda_batch_ramps_with_the_training_images(tmp_path):
    """No jump between neighbouring dataset sizes: the device's batch grows with the images
    (1/32 a training image) as the batch rule does (epochs / 1,500), where it once switched
    from 128 to 512 at 16,384 images (20 epochs: 128 at 16,383 images, 218 at 16,384)."""
    sizes = range(3_000, 20_001, 61)
    batches = [_plan_on(tmp_path, "cuda", n, epochs=20).batch_size for n in sizes]
    assert batches[0] == 64 and batches[-1] == 266  # the batch rule: 3,000 x 20 / 1,500 = 40 -> 64; 19,958 x 20 / 1,500
    for n, (a, b) in zip(sizes, zip(batches, batches[1:])):
        assert 0 <= b - a <= 61 / 32 + 1, (n, a, b)
