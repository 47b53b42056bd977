"""Resuming a fine-tune that started from an MAE encoder (issue 12, bug 2): --init gives the run
layer-wise lr decay groups, and `finetune --resume` in a new process must rebuild exactly
those groups (it has no --init to go by)."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import TINY, write_folder

from mmlit_cli.checkpoint import load_checkpoint
from mmlit_cli.train import run_training

DECAY = TINY + ["finetune.layer_decay=0.75"]


def lr_scales(run):
    info = load_checkpoint(run / "last.safetensors", with_train_state=True).train_info
    return [g["lr_scale"] for g in info["optimizer"]["param_groups"]]


def test_finetune_from_an_mae_encoder_resumes_in_a_new_process(tmp_path):
    data = write_folder(tmp_path / "colours")
    run_training("pretrain", "xxs", str(data), out=tmp_path / "mae", overrides=TINY, epochs=1, batch_size=8,
                 quiet=True)
    init = tmp_path / "mae" / "last.safetensors"
    kw = dict(overrides=DECAY, epochs=2, batch_size=8, seed=1, init=init, quiet=True)
    run_training("finetune", "xxs", str(data), out=tmp_path / "full", **kw)
    stopped = run_training("finetune", "xxs", str(data), out=tmp_path / "ft", max_steps=3, save_every=0, **kw)
    assert stopped["stopped"] == "max_steps"
    first = lr_scales(tmp_path / "ft")
    assert len(set(first)) > 2 and min(first) < 0.75 ** 3  # layer-wise decay groups: one per depth

    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "finetune", "--resume", str(tmp_path / "ft"),
                        "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert lr_scales(tmp_path / "ft") == first
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["train_loss"] for r in rows] == pytest.approx([r["train_loss"] for r in full], rel=1e-5)
    a = load_checkpoint(tmp_path / "full" / "last.safetensors").tensors
    b = load_checkpoint(tmp_path / "ft" / "last.safetensors").tensors
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_a_run_saved_without_the_layer_decay_field_still_resumes(tmp_path):
    """Checkpoints written before the choice was stored: the lr scales of their saved groups
    say whether the recipe's decay was in use."""
    from mmlit_cli.config import TrainConfig
    from mmlit_cli.engine import layer_decay_of_run

    recipe = TrainConfig(layer_decay=0.75)
    scaled = {"optimizer": {"param_groups": [{"lr_scale": 0.5}, {"lr_scale": 1.0}]}}
    plain = {"optimizer": {"param_groups": [{"lr_scale": 1.0}, {"lr_scale": 1.0}]}}
    assert layer_decay_of_run(scaled, recipe) == 0.75
    assert layer_decay_of_run(plain, recipe) == 1.0
    assert layer_decay_of_run({**plain, "layer_decay": 0.9}, recipe) == 0.9
