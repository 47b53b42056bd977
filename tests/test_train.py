"""The engine through `finetune`/`pretrain`/`eval`: run directory, checkpoints, resume,
--init, and torchrun with two CPU processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mmlit_cli.checkpoint import load_checkpoint
from mmlit_cli.errors import MmlitError
from mmlit_cli.inference import evaluate_checkpoint
from mmlit_cli.train import run_training
from helpers import TINY, write_folder

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("data") / "colours")


def finetune(folder, out, **kw):
    kw.setdefault("overrides", TINY)
    kw.setdefault("epochs", 2)
    kw.setdefault("batch_size", 8)
    return run_training("finetune", kw.pop("preset", "xxs"), str(folder), out=out, quiet=True, **kw)


def test_finetune_writes_the_run_directory_and_eval_reads_it(folder, tmp_path):
    out = tmp_path / "run"
    result = finetune(folder, out)
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "last.safetensors", "best.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("val_top1" in r and "val_top5" in r for r in rows)
    assert result["global_step"] == rows[-1]["step"]

    ckpt = load_checkpoint(out / "best.safetensors")
    assert ckpt.task == "classify" and ckpt.classes == ["blue", "green", "red"]
    assert ckpt.config.model.num_classes == 3 and ckpt.image_size == 12 and ckpt.config.name == "xxs"
    with safe_open(str(out / "best.safetensors"), "pt") as f:
        meta = f.metadata()
        assert {"mmlit_version", "mean", "std", "image_size", "preset", "task"} <= set(meta)
        assert not any(k.startswith("train_state/") for k in f.keys())
    with safe_open(str(out / "last.safetensors"), "pt") as f:
        assert any(k.startswith("train_state/opt/") for k in f.keys())

    report = evaluate_checkpoint(out / "best.safetensors", str(folder), "val")
    d = report.as_dict()
    assert {"top1", "top5", "loss", "per_class", "num_images"} <= set(d)
    assert d["num_images"] == 3 * round(0.1 * 12)
    best_row = max(rows, key=lambda r: r["val_top1"])
    assert abs(d["top1"] - best_row["val_top1"]) < 1e-6


def test_existing_output_dir_is_never_overwritten(folder, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MmlitError, match="already exists"):
        finetune(folder, out)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(folder, tmp_path):
    full = tmp_path / "full"
    finetune(folder, full, epochs=3, seed=3)
    part = tmp_path / "part"
    # stop in the middle of epoch 2 (each epoch has 4 steps of batch 8 over 32 images)
    stopped = finetune(folder, part, epochs=3, seed=3, max_steps=6, save_every=0)
    assert stopped["stopped"] == "max_steps" and stopped["global_step"] == 6
    state = load_checkpoint(part / "last.safetensors", with_train_state=True).train_info
    assert state["epoch"] == 1 and state["step_in_epoch"] == 2
    run_training("finetune", None, None, resume=part, quiet=True)

    a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-5)
    wa = load_checkpoint(full / "last.safetensors").tensors
    wb = load_checkpoint(part / "last.safetensors").tensors
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_resume_refuses_a_different_preset_and_a_missing_run(folder, tmp_path):
    out = tmp_path / "r"
    finetune(folder, out, epochs=1)
    with pytest.raises(MmlitError, match="preset 'xxs', not 's'"):
        run_training("finetune", "s", None, resume=out, quiet=True)
    with pytest.raises(MmlitError, match="nothing to resume"):
        run_training("finetune", None, None, resume=tmp_path / "nope", quiet=True)


def test_pretrain_on_unlabelled_folder_then_init_loads_exactly_the_encoder(tmp_path):
    images = write_folder(tmp_path / "unlabelled", labelled=False)
    pre = tmp_path / "pre"
    result = run_training("pretrain", "xxs", str(images), out=pre, overrides=TINY, epochs=2, batch_size=8, quiet=True)
    assert result["epoch"] == 2 and (pre / "reconstruction.png").is_file()
    mae = load_checkpoint(pre / "last.safetensors")
    assert mae.task == "mae"

    labelled = write_folder(tmp_path / "labelled")
    from mmlit_cli.checkpoint import load_weights_into
    from mmlit_cli.model import MLiT
    import dataclasses

    model = MLiT(dataclasses.replace(mae.config.model, num_classes=3))
    report = load_weights_into(model, mae)
    encoder = {k[len("encoder."):]: v for k, v in mae.tensors.items() if k.startswith("encoder.")}
    assert set(report.loaded) == set(encoder)
    assert report.skipped and all(not k.startswith("encoder.") for k in report.skipped)
    assert any(k.startswith("decoder") for k in report.skipped) and "mask_token" in report.skipped
    assert set(report.missing) == {"head.weight", "head.bias"}
    for k, v in encoder.items():
        assert torch.equal(model.state_dict()[k], v), k

    # and through the command: fine-tuning from the MAE checkpoint starts from those weights
    ft = tmp_path / "ft"
    run_training("finetune", "xxs", str(labelled), out=ft, overrides=TINY, epochs=1, batch_size=8,
                 init=pre / "last.safetensors", quiet=True)
    assert load_checkpoint(ft / "last.safetensors").config.model.num_classes == 3


def test_eval_refuses_an_mae_checkpoint(tmp_path, folder):
    images = write_folder(tmp_path / "u", labelled=False, per_class=4)
    run_training("pretrain", "xxs", str(images), out=tmp_path / "p", overrides=TINY, epochs=1, batch_size=4,
                 quiet=True)
    with pytest.raises(MmlitError, match="fine-tune it first"):
        evaluate_checkpoint(tmp_path / "p" / "last.safetensors", str(folder))


def test_torchrun_two_cpu_processes_stay_in_sync(folder, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mmlit_cli", "finetune", "--preset", "xxs", "--dataset", str(folder), "--out", str(out),
           "--epochs", "2", "--batch-size", "4", "--device", "cpu"]
    for o in TINY:
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(row["world_size"] == 2 and row["ranks_in_sync"] is True for row in rows)
    # each rank took 4 images a step: 32 training images -> 4 steps an epoch
    assert rows[-1]["step"] == 2 * 4


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(folder, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(MmlitError, match="the loss became"):
        finetune(folder, out, overrides=TINY + ["finetune.grad_clip=0", "finetune.warmup_epochs=0"], lr=1e12,
                 epochs=5, batch_size=4, save_every=1)
    if (out / "last.safetensors").exists():  # whatever was saved is finite and loadable
        ckpt = load_checkpoint(out / "last.safetensors", with_train_state=True)
        assert all(torch.isfinite(t).all() for t in ckpt.tensors.values())
    assert not (out / "metrics.jsonl").exists() or all(
        np.isfinite(json.loads(x)["train_loss"]) for x in (out / "metrics.jsonl").read_text().splitlines())


def test_atomic_write_keeps_the_old_file_when_writing_fails_and_uses_normal_permissions(tmp_path):
    from mmlit_cli.checkpoint import atomic_write, atomic_write_text

    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def broken(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_pretrain_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    images = write_folder(tmp_path / "unlabelled", labelled=False)
    kw = dict(overrides=TINY, epochs=2, batch_size=8, seed=5, quiet=True)
    run_training("pretrain", "xxs", str(images), out=tmp_path / "full", **kw)
    stopped = run_training("pretrain", "xxs", str(images), out=tmp_path / "part", max_steps=5, save_every=0, **kw)
    assert stopped["stopped"] == "max_steps"
    run_training("pretrain", None, None, resume=tmp_path / "part", quiet=True)
    a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-5)
    wa = load_checkpoint(tmp_path / "full" / "last.safetensors").tensors
    wb = load_checkpoint(tmp_path / "part" / "last.safetensors").tensors
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_ema_is_what_gets_validated_and_saved_as_best(folder, tmp_path):
    """EMA on (with the load-balancing loss, whose tensor a model copy must not trip over):
    best.safetensors holds the averaged weights, not the live ones, and validation counts
    expert usage on the model it runs."""
    out = tmp_path / "ema"
    finetune(folder, out, epochs=1, overrides=TINY + ["finetune.ema=true", "finetune.ema_decay=0.9",
                                                      "model.aux_loss_weight=0.01"])
    best = load_checkpoint(out / "best.safetensors").tensors
    last = load_checkpoint(out / "last.safetensors", with_train_state=True)
    ema = {k[len("ema/"):]: v for k, v in last.train_tensors.items() if k.startswith("ema/")}
    assert ema.keys() == best.keys()
    assert all(torch.equal(best[k], ema[k]) for k in best)
    assert any(not torch.equal(best[k], last.tensors[k]) for k in best)  # averaged, not the live weights

    pre = tmp_path / "ema-mae"
    run_training("pretrain", "xxs", str(folder), out=pre, overrides=TINY + ["pretrain.ema=true"], epochs=1,
                 batch_size=8, quiet=True)
    row = json.loads((pre / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(sum(layer) == pytest.approx(1.0) for layer in row["expert_usage"])
