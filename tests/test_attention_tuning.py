"""`runtime.tune_attention`: each attention layer gets the SDPA kernel layout measured fastest
for the run (heads zero-padded, K/V repeated: the same values), and a tuned run trains as an
untuned one does. The timings are faked here: which layout wins is the GPU's business."""

import dataclasses

import pytest
import torch
from rich.console import Console

from mmlit_cli import runtime
from mmlit_cli.config import load_config
from mmlit_cli.data import ImageData
from mmlit_cli.engine import RunOptions, Trainer
from mmlit_cli.mae import MaskedAutoencoder
from mmlit_cli.model import MLiT
from mmlit_cli.runtime import attention_inputs, tune_attention
from mmlit_cli.tasks import ClassifyTask, MAETask
from helpers import TINY


def tiny_config():
    return load_config("xxs", TINY)


def fake_timer(ms: dict, calls: list | None = None):
    """A `time_layout` giving each layout its seconds from `ms` (milliseconds); a layout that
    is missing raises as SDPA does when no kernel takes it."""
    def time_layout(module, layout):
        if calls is not None:
            calls.append((module, layout))
        if layout not in ms:
            raise RuntimeError("No available kernel. Aborting execution.")
        return ms[layout] / 1000
    return time_layout


def layouts(model):
    return {m.kernel_layout() for m in model.modules() if hasattr(m, "kernel_layouts")}


def test_the_fastest_layout_is_given_to_every_layer_of_that_shape_and_the_output_stays():
    torch.manual_seed(0)
    cfg = tiny_config().model  # 4 heads / 2 K/V heads x 6
    model = MLiT(cfg).eval()
    x = torch.randn(5, 3, cfg.image_size, cfg.image_size)
    before = model(x)
    calls = []
    note = tune_attention(model, x, None, time_layout=fake_timer({(6, False): 3.0, (8, False): 2.5,
                                                                   (6, True): 2.9, (8, True): 1.0}, calls))
    assert layouts(model) == {(8, True)}
    assert note == ("attention 4/2 heads x 6 (3 layers): heads padded to 8, K/V repeated, "
                    "1.00 ms fwd+bwd against 3.00 ms")
    assert len({id(m) for m, _ in calls}) == 1, "layers of one shape share one measurement"
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_a_layout_no_kernel_takes_is_skipped_and_a_small_gain_changes_nothing():
    model = MLiT(tiny_config().model)
    x = torch.zeros(2, 3, 12, 12)
    note = tune_attention(model, x, None, time_layout=fake_timer({(6, False): 3.0, (6, True): 1.5}))
    assert layouts(model) == {(6, True)} and "K/V repeated" in note and "padded" not in note

    model = MLiT(tiny_config().model)
    note = tune_attention(model, x, None, time_layout=fake_timer({(6, False): 3.0, (8, False): 2.85,
                                                                   (6, True): 2.9, (8, True): 2.8}))
    assert note == "" and layouts(model) == {(6, False)}  # 7 % faster: within the margin, kept as built


def test_mae_encoder_and_decoder_are_measured_at_their_own_shapes():
    cfg = tiny_config()
    mae = MaskedAutoencoder(cfg.model, cfg.mae)
    x = torch.zeros(4, 3, 12, 12)
    shapes = {(type(m).__name__, s) for m, (s, _) in attention_inputs(mae, x, None).items()}
    visible = int(16 * (1 - cfg.mae.mask_ratio))
    assert shapes == {("GroupedQueryAttention", (4, visible + 1, 24)), ("GroupedQueryAttention", (4, 17, 16))}
    measured = []
    tune_attention(mae, x, None, time_layout=fake_timer({(6, False): 3, (8, False): 1, (6, True): 3, (8, True): 2,
                                                         (16, False): 1, (16, True): 1}, measured))
    probes = {m.head_dim for m, _ in measured}
    assert probes == {6, 8}  # the encoder's 24/4 heads and the decoder's 16/2


def test_measuring_leaves_the_rng_streams_the_mode_and_the_gradients_alone():
    torch.manual_seed(3)
    model = MLiT(dataclasses.replace(tiny_config().model, drop_path=0.2))  # training mode: drop path draws
    state = torch.get_rng_state()
    tune_attention(model, torch.zeros(2, 3, 12, 12), None, calls=1, rounds=1)  # measured for real, on the CPU
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_a_layout_that_fails_is_left_out_and_a_failing_layout_as_built_is_replaced():
    """Out of memory at the layout as built (SDPA's math path keeps [B, H, T, T] scores) while a
    padded layout runs: the run takes the one that runs, and says why."""
    model = MLiT(tiny_config().model)
    x = torch.zeros(2, 3, 12, 12)

    def timer(module, layout):
        if layout == (6, False):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {(8, False): 0.002, (6, True): 0.003, (8, True): 0.0025}[layout]

    note = tune_attention(model, x, None, time_layout=timer)
    assert layouts(model) == {(8, False)}
    assert note.endswith("heads padded to 8, 2.00 ms fwd+bwd against the layout as built, which failed here "
                         "(OutOfMemoryError)"), note


def test_an_interrupted_measurement_leaves_the_layouts_as_they_were():
    model = MLiT(tiny_config().model)

    def timer(module, layout):
        module.set_kernel_layout(*layout)  # as the real measurement does
        if layout == (8, False):
            raise KeyboardInterrupt
        return 0.001

    with pytest.raises(KeyboardInterrupt):
        tune_attention(model, torch.zeros(2, 3, 12, 12), None, time_layout=timer)
    assert layouts(model) == {(6, False)}


def trainer(tmp_path, name, tune, monkeypatch, batch, time_layout=None, task=ClassifyTask):
    cfg = tiny_config()
    recipe = dataclasses.replace(cfg.finetune, batch_size=8, loader="device")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=3, drop_path=0.2),
                              **{task.command: recipe})
    data = ImageData(*batch, ["a", "b", "c"], "test")
    torch.manual_seed(0)
    with monkeypatch.context() as m:
        m.setattr(runtime, "_time_layout",
                  time_layout or (lambda module, layout, *a: {(8, True): 0.001}.get(layout, 0.003)))
        return Trainer(task(cfg, ["a", "b", "c"]), cfg, data, None,
                       RunOptions(out_dir=tmp_path / name, dataset={}, device="cpu", tune_attention=tune, quiet=True),
                       Console(quiet=True))


def test_a_tuned_run_trains_as_the_untuned_one(tmp_path, monkeypatch):
    """Same seed, same batches: each step's loss and gradients (mixup, drop path and the router
    all draw from the RNG) in the tuned run equal the untuned run's; CPU runs are not tuned by
    default. (Weights are not compared: AdamW's first steps move a weight by ~lr whatever the
    sign of a gradient of ~1e-9, so rounding shows there.)"""
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=g),
             torch.tensor([0, 1, 2] * 2 + [0, 1]))
    losses, grads = {}, {}
    for name, tune in (("plain", None), ("tuned", True)):
        t = trainer(tmp_path, name, tune, monkeypatch, batch)  # seeds the RNG, then tunes
        if tune:
            assert layouts(t.model) == {(8, True)} and "heads padded to 8, K/V repeated" in t.attention_note
        else:
            assert t.attention_note == "" and layouts(t.model) == {(6, False)}
        t.model.train()
        step, grads[name] = t.optimizer.step, []
        t.optimizer.step = lambda *a, _step=step, _t=t, _g=grads[name], **k: (
            _g.append(torch.cat([p.grad.flatten() for p in _t.model.parameters()])), _step(*a, **k))[1]
        losses[name] = torch.stack([t._train_step(*batch) for _ in range(4)])
    torch.testing.assert_close(losses["tuned"], losses["plain"], rtol=1e-5, atol=1e-6)
    for i, (a, b) in enumerate(zip(grads["plain"], grads["tuned"])):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=f"step {i}")


def test_a_measurement_that_breaks_leaves_the_run_as_built_and_says_so(tmp_path, monkeypatch):
    """MAE: the encoder's layout is chosen, then the decoder's measurement breaks: the run goes on
    with every layer as built (the encoder's too) and its header says why."""
    batch = (torch.zeros(8, 3, 12, 12, dtype=torch.uint8), torch.tensor([0, 1, 2] * 2 + [0, 1]))

    def broken(module, layout, *args):
        module.set_kernel_layout(*layout)
        if module.head_dim == 8:  # the decoder's 16/2 heads
            raise TypeError("unexpected keyword argument 'enable_gqa'")  # as an older torch would say
        return 0.001 if layout == (8, False) else 0.003

    t = trainer(tmp_path, "broken", True, monkeypatch, batch, time_layout=broken, task=MAETask)
    assert layouts(t.model) == {(6, False), (8, False)}  # encoder 6 wide, decoder 8 wide, both as built
    assert t.attention_note == ("attention kernel layouts not measured (TypeError: unexpected keyword argument "
                                "'enable_gqa'); running them as built")
    t.model.train()
    assert torch.isfinite(t._train_step(*batch))
