"""The training loop's per-step work on a GPU neither reads a value back to the host nor copies
between host and device: either makes the host wait for every kernel queued before it, and the
tiny presets, launch-bound, lose the lead the host needs. Checked on the CPU: under torch's
FakeTensorMode tensors claim cuda:0 with no GPU present, and a dispatch mode sees every aten
call made on them. Left out: the backward pass (the autograd engine needs a real CUDA context;
mmlit defines no backward of its own, only the traced ops' derivatives run there) and
torchvision's MixUp/CutMix, whose draws are host-side numbers (fake mode would fake their CPU
tensors too)."""

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from mmlit_cli.config import load_config
from mmlit_cli.data import DeviceLoader, ImageData, Normalize
from mmlit_cli.data.batch_augment import BatchAugment
from mmlit_cli.optim import ModelEMA, build_adamw, param_groups, set_schedule
from mmlit_cli.runtime import forward_batch
from mmlit_cli.tasks import ClassifyTask, MAETask

CUDA = torch.device("cuda", 0)
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")


class DeviceTraffic(TorchDispatchMode):
    """The aten calls that would stall a GPU: a device value read on the host
    (`_local_scalar_dense`, which `.item()`, `float()` and `bool()` call) and a call taking a
    host tensor with a device one (a copy, or an op on a host tensor) other than a host 0-dim
    value, which the host reads itself (`fill_`, a scalar operand)."""

    def __init__(self):
        super().__init__()
        self.stalls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None:  # .to(device), .cpu()
            devices.add(torch.device(kwargs["device"]).type)
        copies = func in (torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default)
        host_array = any(t.device.type == "cpu" and t.dim() > 0 for t in tensors)
        if "cuda" in devices and ("_local_scalar_dense" in str(func) or
                                  ("cpu" in devices and (copies or host_array))):
            self.stalls.append(f"{func}: {[(str(t.device), tuple(t.shape)) for t in tensors][:3]}")
        return func(*args, **kwargs)


def traced(fn) -> list[str]:
    traffic = DeviceTraffic()
    with traffic:
        fn()
    return traffic.stalls


@pytest.mark.parametrize("policy", ["trivial", "rand"])
def test_batched_augmentation_stalls_nothing(policy):
    augment = BatchAugment(32, crop_padding=4, hflip=0.5, auto_augment=policy, auto_augment_prob=0.7,
                           random_erasing=0.25)
    with FakeTensorMode(allow_non_fake_inputs=True):
        images = torch.empty(8, 3, 32, 32, dtype=torch.uint8, device=CUDA)
        augment(images, torch.Generator())  # the first batch copies the op tables to the device, once
        assert traced(lambda: augment(images, torch.Generator())) == []


@pytest.mark.parametrize("balanced", [False, True])
def test_device_loader_batches_stall_nothing(balanced, monkeypatch):
    """An epoch's shuffled (or class-balanced) order, each batch's gather and augmentation."""
    labels = torch.arange(40) % 4
    data = ImageData(torch.zeros(40, 3, 32, 32, dtype=torch.uint8), labels, list("abcd"), "fake", [])
    loader = DeviceLoader(data, 8, "cpu", BatchAugment(32, 4, 0.5, "trivial", random_erasing=0.25), shuffle=True,
                          drop_last=True, balanced=balanced)
    monkeypatch.setattr(torch, "Generator", lambda device=None: torch._C.Generator())  # fake mode has no CUDA one
    with FakeTensorMode(allow_non_fake_inputs=True):
        # as the constructor leaves it on a GPU: the split and its class weights moved there once
        loader.device, loader.images, loader.labels = CUDA, loader.images.to(CUDA), loader.labels.to(CUDA)
        if balanced:
            loader.weights = loader.weights.to(CUDA)
        loader.set_epoch(1)
        next(iter(loader.batches(0)))  # the first batch copies the op tables to the device, once
        assert traced(lambda: list(loader.batches(1))) == []


def step_of(task, cfg, steps=2):
    """The engine's step as `Trainer._train_step` takes it (schedule, forward and loss, clip,
    fused AdamW, EMA), the backward's gradients stood in by zeros; the traffic of the last
    step (the first may move the loss's class weights to the device, once)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = task.model.to(CUDA)
        ema = ModelEMA(model, 0.999)
        optimizer = build_adamw(param_groups(model, 0.05), 1e-3, (0.9, 0.999), CUDA)
        normalize = Normalize(cfg.data.mean, cfg.data.std, CUDA)
        size = cfg.model.image_size
        images = torch.zeros(8, 3, size, size, dtype=torch.uint8, device=CUDA)
        labels = torch.zeros(8, dtype=torch.long, device=CUDA)

        def step(i):
            set_schedule(optimizer, 0.5, i, 100, 5, 1e-3, 1e-5, (0.9, 0.999))
            loss = forward_batch(lambda x: task.loss(model, x, labels), images, normalize, CUDA, None)
            optimizer.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ema.update()
            return loss.detach()

        for i in range(steps - 1):
            step(i)
        return traced(lambda: step(steps - 1))


def tiny(preset, **model):
    cfg = load_config(preset)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


@pytest.mark.parametrize("balance", [None, "logit-adjust", "inverse-frequency"])
def test_a_classification_step_stalls_nothing(balance):
    cfg = tiny("xxs", num_classes=4, aux_loss_weight=0.01, router_noise=0.1, drop_path=0.1)
    if balance:
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, class_balance="loss",
                                                                    balance_loss=balance))
    task = ClassifyTask(cfg, list("abcd"), class_counts=[10, 20, 30, 40])
    task.mix = None  # host-side draws (see the module's docstring)
    assert step_of(task, cfg) == []


def test_an_mae_step_stalls_nothing():
    cfg = tiny("xxs")
    assert step_of(MAETask(cfg, []), cfg) == []
