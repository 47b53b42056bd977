"""EMA warm-up (issue 12, bug 8): the decay follows timm's exponential warm-up,
min(decay, 1 - (1 + n)^(-2/3)) for the update after n earlier ones, so a short run's average
is not its initial weights; the update count is training state and survives --resume."""

import json

import pytest
import torch

from helpers import TINY, write_folder

from mmlit_cli.checkpoint import load_checkpoint
from mmlit_cli.model import MLiT
from mmlit_cli.train import run_training

EMA = TINY + ["finetune.ema=true", "finetune.ema_decay=0.9998"]


def expected_decay(decay: float, n: int) -> float:
    return min(decay, 1.0 - (1.0 + n) ** (-2.0 / 3.0))


def test_the_decay_schedule():
    from mmlit_cli.optim import ema_decay_at

    assert ema_decay_at(0.9998, 0) == 0.0  # the first update copies the weights
    assert ema_decay_at(0.9998, 1) == pytest.approx(1 - 2 ** (-2 / 3), abs=1e-15)  # 0.370
    assert ema_decay_at(0.9998, 7) == pytest.approx(0.75, abs=1e-15)  # 1 - 8^(-2/3) = 1 - 1/4
    assert ema_decay_at(0.9998, 999) == pytest.approx(0.99, abs=1e-12)  # 1 - 1000^(-2/3)
    for n in (2, 10, 100, 10_000, 300_000, 400_000, 10**7):
        assert ema_decay_at(0.9998, n) == pytest.approx(expected_decay(0.9998, n), abs=1e-15)
    assert ema_decay_at(0.9998, 10**7) == 0.9998  # capped once the warm-up has caught up
    assert ema_decay_at(0.5, 5) == 0.5


def test_updates_lerp_with_the_warmed_up_decay():
    from mmlit_cli.optim import ModelEMA

    model = torch.nn.Linear(3, 2)
    ema = ModelEMA(model, 0.9998)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        d = expected_decay(0.9998, n)
        expected = {k: d * expected[k] + (1 - d) * v for k, v in model.state_dict().items()}
        for k in expected:
            torch.testing.assert_close(ema.shadow[k], expected[k], rtol=1e-6, atol=1e-6)
    assert ema.updates == 4


def test_a_short_run_averages_its_trained_weights_not_its_initial_ones(tmp_path):
    data = write_folder(tmp_path / "colours")
    out = tmp_path / "run"
    run_training("finetune", "xxs", str(data), out=out, overrides=EMA, epochs=1, batch_size=8, seed=4,
                 quiet=True)
    last = load_checkpoint(out / "last.safetensors", with_train_state=True)
    torch.manual_seed(4)  # the initial weights depend on the seed alone
    initial = MLiT(last.config.model).state_dict()
    best = load_checkpoint(out / "best.safetensors").tensors
    live = {k[len("model/"):]: v for k, v in last.train_tensors.items() if k.startswith("model/")}
    moved = sum((best[k] - initial[k]).norm() ** 2 for k in initial) ** 0.5
    trained = sum((live[k] - initial[k]).norm() ** 2 for k in initial) ** 0.5
    assert moved > 0.5 * trained  # without the warm-up: ~0.001 x (4 steps of decay 0.9998)


def test_resume_keeps_the_update_count_and_the_average(tmp_path):
    data = write_folder(tmp_path / "colours")
    kw = dict(overrides=EMA, epochs=2, batch_size=8, seed=2, quiet=True)
    run_training("finetune", "xxs", str(data), out=tmp_path / "full", **kw)
    stopped = run_training("finetune", "xxs", str(data), out=tmp_path / "part", max_steps=3, save_every=0, **kw)
    assert stopped["stopped"] == "max_steps"
    assert load_checkpoint(tmp_path / "part" / "last.safetensors", with_train_state=True).train_info[
        "ema_updates"] == 3
    run_training("finetune", None, None, resume=tmp_path / "part", quiet=True)

    full = load_checkpoint(tmp_path / "full" / "last.safetensors", with_train_state=True)
    part = load_checkpoint(tmp_path / "part" / "last.safetensors", with_train_state=True)
    assert part.train_info["ema_updates"] == full.train_info["ema_updates"] == full.train_info["global_step"]
    for k, v in full.train_tensors.items():
        if k.startswith("model/"):  # the weights trained; the checkpoint's own are the EMA (below)
            torch.testing.assert_close(part.train_tensors[k], v, rtol=1e-5, atol=1e-6)
    a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in b] == pytest.approx([r["val_loss"] for r in a], rel=1e-5)


def test_a_checkpoint_of_the_older_layout_resumes_as_the_new_one(tmp_path):
    """Checkpoints written before last.safetensors held the EMA kept the trained weights as the
    checkpoint's and the EMA as ema/... in the training state: such a run resumes to the same
    figures as the same run saved in the new layout."""
    import shutil

    from mmlit_cli.checkpoint import save_checkpoint

    data = write_folder(tmp_path / "colours")
    kw = dict(overrides=EMA, epochs=2, batch_size=8, seed=2, quiet=True)
    run_training("finetune", "xxs", str(data), out=tmp_path / "new", max_steps=3, save_every=0, **kw)
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    ckpt = load_checkpoint(tmp_path / "old" / "last.safetensors", with_train_state=True)
    live = {k[len("model/"):]: v for k, v in ckpt.train_tensors.items() if k.startswith("model/")}
    assert live
    ckpt.train_tensors = {k: v for k, v in ckpt.train_tensors.items() if not k.startswith("model/")}
    ckpt.train_tensors.update({f"ema/{k}": v for k, v in ckpt.tensors.items()})
    ckpt.tensors = live
    save_checkpoint(tmp_path / "old" / "last.safetensors", ckpt)
    for run in ("new", "old"):
        run_training("finetune", None, None, resume=tmp_path / run, quiet=True)
    rows = {run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("new", "old")}
    assert [r["val_loss"] for r in rows["old"]] == pytest.approx([r["val_loss"] for r in rows["new"]], rel=1e-6)
    a, b = (load_checkpoint(tmp_path / run / "last.safetensors").tensors for run in ("new", "old"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
