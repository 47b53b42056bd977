"""The engine through `finetune`/`pretrain`/`eval`: run directory, checkpoints, resume,
--init, and torchrun with two CPU processes."""

import json
import math
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
from mmlit_cli.evaluate import evaluate_checkpoint
from mmlit_cli.model import MLiT
from mmlit_cli.train import run_training
from helpers import TINY, tensorboard_events, write_folder

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
    # 36 images, one per class held out: 33 to train on, 4 full batches of 8 an epoch
    assert [r["step"] for r in rows] == [4, 8] and result["global_step"] == 8

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
    # the balanced figures too: what eval reports on the split training validated on
    assert abs(d["balanced_accuracy"] - best_row["val_balanced_accuracy"]) < 1e-6
    assert abs(d["macro_f1"] - best_row["val_macro_f1"]) < 1e-6


def test_existing_output_dir_is_never_overwritten(folder, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MmlitError, match="already exists"):
        finetune(folder, out)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("loader", ["device", "workers"])
def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(folder, tmp_path, loader):
    full = tmp_path / "full"
    # crop, flip and TrivialAugment on: the resumed batches must be augmented as the uninterrupted ones
    aug = ["finetune.augment.crop_padding=2", "finetune.augment.hflip=0.5", "finetune.augment.auto_augment=trivial"]
    finetune(folder, full, epochs=3, seed=3, loader=loader, overrides=TINY + aug)
    part = tmp_path / "part"
    # stop in the middle of epoch 2 (each epoch has 4 steps of batch 8 over 32 images)
    stopped = finetune(folder, part, epochs=3, seed=3, max_steps=6, save_every=0, loader=loader,
                       overrides=TINY + aug)
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
    from mmlit_cli.engine import Trainer

    fit, start = Trainer.fit, {}

    def fit_recording_the_start(self):
        start.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return fit(self)

    ft = tmp_path / "ft"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "fit", fit_recording_the_start)
        run_training("finetune", "xxs", str(labelled), out=ft, overrides=TINY, epochs=1, batch_size=8,
                     init=pre / "last.safetensors", quiet=True)
    assert start.keys() == set(encoder) | {"head.weight", "head.bias"}
    for k, v in encoder.items():
        assert torch.equal(start[k], v), k
    trained = load_checkpoint(ft / "last.safetensors")
    assert trained.config.model.num_classes == 3 and not torch.equal(trained.tensors["blocks.0.attn.qkv.weight"],
                                                                     encoder["blocks.0.attn.qkv.weight"])


def test_init_says_what_it_changes(tmp_path):
    """`--init` says when it resamples the position embedding, the layer-wise lr decay it
    applies, and a normalisation other than the checkpoint's; a layer_decay set without
    --init is said to be unused (it has nothing to act on)."""
    import io

    from rich.console import Console

    def run(kind, data, out, overrides, **kw):
        text = io.StringIO()
        run_training(kind, "xxs", str(data), out=out, overrides=TINY + overrides, epochs=1, batch_size=8,
                     console=Console(file=text, width=400), **kw)
        return text.getvalue()

    images = write_folder(tmp_path / "images")
    said = run("pretrain", images, tmp_path / "pre", ["data.mean=[0.5,0.5,0.5]", "finetune.epochs=3"])
    assert "note: --set finetune.epochs is not read by mmlit pretrain, which reads pretrain.epochs\n" in said, said
    said = run("finetune", images, tmp_path / "ft", ["model.image_size=24"], init=tmp_path / "pre" / "last.safetensors")
    assert "position embedding resampled from 4x4 to 8x8 patches; layer-wise lr decay 0.75\n" in said, said
    assert "was trained on images normalised with mean [0.5, 0.5, 0.5]" in said
    said = run("finetune", images, tmp_path / "ft2", ["data.mean=[0.5,0.5,0.5]", "finetune.layer_decay=0.6"],
               init=tmp_path / "pre" / "last.safetensors")
    assert "resampled" not in said and "layer-wise lr decay 0.6\n" in said and "normalised" not in said, said
    said = run("finetune", images, tmp_path / "ft3", ["finetune.layer_decay=0.6"])
    assert "note: finetune.layer_decay 0.6 is unused: layer-wise lr decay applies to a fine-tuning run" in said
    said = run("finetune", images, tmp_path / "ft4", ["pretrain.epochs=2", "finetune.epochs=1"])  # one list for both
    assert "layer_decay" not in said and "not read" not in said  # the preset's own: nothing said


def test_eval_refuses_an_mae_checkpoint(tmp_path, folder):
    images = write_folder(tmp_path / "u", labelled=False, per_class=4)
    run_training("pretrain", "xxs", str(images), out=tmp_path / "p", overrides=TINY, epochs=1, batch_size=4,
                 quiet=True)
    with pytest.raises(MmlitError, match="fine-tune it first"):
        evaluate_checkpoint(tmp_path / "p" / "last.safetensors", str(folder))


RANK_DUMP = """
import os, sys
from safetensors.torch import save_file
from mmlit_cli import cli, engine

fit = engine.Trainer.fit


def fit_and_dump(self):
    result = fit(self)
    weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
    save_file(weights, os.path.join(os.environ["RANK_DUMP"], f"rank{self.dist.rank}.safetensors"))
    return result


engine.Trainer.fit = fit_and_dump
sys.argv = ["mmlit", *sys.argv[1:]]
cli.main()
"""


def test_torchrun_two_cpu_processes_stay_in_sync(folder, tmp_path):
    """`mmlit finetune` under torchrun, each rank saving its own final weights (through a
    wrapper, not the engine's own check): the ranks hold identical weights, rank 0 wrote them,
    each rank took its share of the batches, and the logged validation is over every
    validation image (equal to a single-process eval of the best checkpoint)."""
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    dump.mkdir()
    script = tmp_path / "mmlit_dumping_ranks.py"
    script.write_text(RANK_DUMP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK_DUMP": str(dump)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "finetune", "--preset", "xxs", "--dataset", str(folder), "--out", str(out), "--epochs", "2",
           "--batch-size", "4", "--device", "cpu"]
    for o in TINY:
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file

    rank0, rank1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    ckpt = load_checkpoint(out / "last.safetensors")
    last = ckpt.tensors
    torch.manual_seed(ckpt.config.finetune.seed)  # the initial weights depend on the seed alone
    initial = MLiT(ckpt.config.model).state_dict()
    assert rank0.keys() == rank1.keys() == last.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
        assert torch.equal(rank0[k], last[k]), k
    assert all(not torch.equal(rank0[k], initial[k]) for k in rank0)  # trained: every tensor moved from its start
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in rows] == [2, 2]
    # 33 training images, 4 per rank and step: 16 images per rank and epoch -> 4 steps an epoch
    assert [r["step"] for r in rows] == [4, 8]
    best = max(rows, key=lambda r: r["val_top1"])
    report = evaluate_checkpoint(out / "best.safetensors", str(folder), "val", device="cpu")
    assert report.result.num_images == 3
    assert report.result.top1 == pytest.approx(best["val_top1"], abs=1e-9)
    assert report.result.loss == pytest.approx(best["val_loss"], rel=1e-5)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch):
    """The 7th step's loss is made NaN (4 steps an epoch, a checkpoint every step): the run
    stops there, last.safetensors holds the state after step 6 - the same weights as a run
    stopped at step 6 - and metrics.jsonl holds epoch 1 only."""
    from mmlit_cli.tasks import ClassifyTask

    reference = finetune(folder, tmp_path / "six", epochs=3, max_steps=6, save_every=0)
    assert reference["global_step"] == 6
    loss, calls = ClassifyTask.loss, []

    def nan_at_step_7(self, *args):
        calls.append(1)
        value = loss(self, *args)
        return value * float("nan") if len(calls) == 7 else value

    monkeypatch.setattr(ClassifyTask, "loss", nan_at_step_7)
    out = tmp_path / "nan"
    with pytest.raises(MmlitError, match="the loss became nan at step 7"):
        finetune(folder, out, epochs=3, save_every=1)
    last = load_checkpoint(out / "last.safetensors", with_train_state=True)
    assert (last.train_info["global_step"], last.train_info["epoch"], last.train_info["step_in_epoch"]) == (6, 1, 2)
    good = load_checkpoint(tmp_path / "six" / "last.safetensors").tensors
    assert last.tensors.keys() == good.keys()
    assert all(torch.equal(last.tensors[k], good[k]) for k in good)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and np.isfinite(rows[0]["train_loss"])
    assert load_checkpoint(out / "best.safetensors").info["epoch"] == 1


def test_a_validation_loss_that_is_not_finite_stops_the_run_and_is_never_the_best(folder, tmp_path, monkeypatch):
    """Finite weights whose outputs overflow (an MAE at lr 1e6 did it): the epoch's validation
    loss is nan. That epoch became best.safetensors (and a bare NaN made metrics.jsonl invalid
    JSON); now the run stops as it does when the training loss is nan, nothing of that epoch
    written, the epoch before it the best and the last."""
    from mmlit_cli.tasks import ClassifyTask

    validate, calls = ClassifyTask.validate, []

    def nan_at_epoch_2(self, *args):
        calls.append(1)
        row = validate(self, *args)
        return {**row, "val_loss": float("nan")} if len(calls) == 2 else row

    monkeypatch.setattr(ClassifyTask, "validate", nan_at_epoch_2)
    out = tmp_path / "valnan"
    with pytest.raises(MmlitError, match=r"the validation loss became nan after epoch 2 \(step \d+\), its weights "
                                         r"diverged; stopped, the last good checkpoint is .*last.safetensors"):
        finetune(folder, out, epochs=3)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert load_checkpoint(out / "best.safetensors").info["epoch"] == 1
    assert load_checkpoint(out / "last.safetensors").info["epoch"] == 1


def test_a_diverging_run_writes_no_checkpoint_of_its_diverged_state(folder, tmp_path):
    """lr 1e12: the first update blows the weights up and the next forward overflows, inside
    the first epoch; with no in-epoch checkpoints the only good state is the start's
    last.safetensors (step 0), and nothing diverged is written."""
    out = tmp_path / "diverged"
    with pytest.raises(MmlitError, match="the loss became"):
        finetune(folder, out, overrides=TINY + ["finetune.grad_clip=0", "finetune.warmup_epochs=0"], lr=1e12,
                 epochs=5, batch_size=4, save_every=0)
    written = sorted(p.name for p in out.iterdir())
    assert [n for n in written if not n.startswith("events.out.tfevents.")] == ["config.yaml", "last.safetensors"]
    last = load_checkpoint(out / "last.safetensors", with_train_state=True)
    assert last.train_info["global_step"] == 0 and all(t.isfinite().all() for t in last.tensors.values())
    if len(written) > 1:  # with TensorBoard installed: its event file holds the config and no figure
        scalars, images, _ = tensorboard_events(out)
        assert scalars == {} and images == set()


def _groups_by_name(model, groups) -> dict[str, tuple[float, float]]:
    """{parameter name: (lr_scale, weight_decay)}, checking each parameter is in one group only."""
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, tuple[float, float]] = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in found, names[id(p)]
            found[names[id(p)]] = (g.get("lr_scale", 1.0), g["weight_decay"])
    assert found.keys() == set(names.values())
    return found


def test_param_groups_layer_decay_and_weight_decay_exclusions():
    """BEiT/MAE layer decay: lr scale 0.5 ** (depth + 1 - layer), layer 0 = embeddings, 1..depth
    = blocks, depth + 1 = final norm and head. No weight decay on norms, biases, the class token
    and position embeddings."""
    from mmlit_cli import create_mae, create_model
    from mmlit_cli.optim import param_groups

    model = create_model("xxs", num_classes=5, overrides=TINY)  # depth 3
    got = _groups_by_name(model, param_groups(model, weight_decay=0.05, layer_decay=0.5))
    expected = {
        "patch_embed.proj.weight": (0.5 ** 4, 0.05), "patch_embed.proj.bias": (0.5 ** 4, 0.0),
        "cls_token": (0.5 ** 4, 0.0), "pos_embed": (0.5 ** 4, 0.0),
        "blocks.0.attn.qkv.weight": (0.5 ** 3, 0.05), "blocks.0.attn.qkv.bias": (0.5 ** 3, 0.0),
        "blocks.0.norm1.weight": (0.5 ** 3, 0.0), "blocks.0.norm1.bias": (0.5 ** 3, 0.0),
        "blocks.1.ffn.router.weight": (0.5 ** 2, 0.05), "blocks.1.ffn.router.bias": (0.5 ** 2, 0.0),
        "blocks.2.ffn.w1v.weight": (0.5, 0.05), "blocks.2.ffn.w2.weight": (0.5, 0.05),
        "blocks.2.norm2.weight": (0.5, 0.0), "blocks.2.attn.proj.weight": (0.5, 0.05),
        "norm.weight": (1.0, 0.0), "norm.bias": (1.0, 0.0), "head.weight": (1.0, 0.05), "head.bias": (1.0, 0.0),
    }
    for name, scale_and_decay in expected.items():
        assert got[name] == pytest.approx(scale_and_decay), name
    for name, (scale, decay) in got.items():  # the same rules for every other parameter
        layer = 0 if name.startswith(("patch_embed.", "cls_token", "pos_embed")) else \
            int(name.split(".")[1]) + 1 if name.startswith("blocks.") else 4
        no_decay = name.endswith(".bias") or ".norm" in f".{name}" or name in ("cls_token", "pos_embed")
        assert (scale, decay) == pytest.approx((0.5 ** (4 - layer), 0.0 if no_decay else 0.05)), name

    flat = _groups_by_name(model, param_groups(model, weight_decay=0.05))
    assert {scale for scale, _ in flat.values()} == {1.0}  # no layer decay by default
    assert {n for n, (_, d) in flat.items() if d == 0} == {n for n, (_, d) in got.items() if d == 0}

    mae = create_mae("xxs", overrides=TINY)
    got = _groups_by_name(mae, param_groups(mae, weight_decay=0.05))
    for name in ("mask_token", "decoder_pos_embed", "encoder.cls_token", "encoder.pos_embed",
                 "decoder_norm.weight", "decoder_pred.bias", "encoder.blocks.0.norm1.weight"):
        assert got[name][1] == 0.0, name
    for name in ("decoder_embed.weight", "decoder_pred.weight", "decoder_blocks.0.ffn.w1v.weight",
                 "encoder.patch_embed.proj.weight", "encoder.blocks.2.ffn.w1v.weight"):
        assert got[name][1] == 0.05, name


def test_lr_at_warmup_then_cosine_at_exact_steps():
    """`lr_at(step, total_steps, warmup_steps, lr, min_lr)` as it is now: step s of the warm-up
    uses lr * (s + 1) / warmup; then a cosine from lr down to min_lr at total_steps."""
    from mmlit_cli.optim import lr_at

    lr, min_lr = 1e-3, 1e-5
    at = [lr_at(s, 110, 10, lr, min_lr) for s in range(120)]
    assert at[0] == pytest.approx(1e-4, rel=1e-12)  # the first step already has one increment
    assert at[4] == pytest.approx(5e-4, rel=1e-12)
    assert at[9] == pytest.approx(lr, rel=1e-12)  # warm-up ends at the peak
    assert at[10] == pytest.approx(lr, rel=1e-12)  # and the cosine starts there
    assert at[60] == pytest.approx(min_lr + (lr - min_lr) / 2, rel=1e-12)  # half-way down the cosine
    assert at[35] == pytest.approx(min_lr + (lr - min_lr) * (1 + math.cos(math.pi / 4)) / 2, rel=1e-12)
    assert at[110] == pytest.approx(min_lr, rel=1e-12) and at[119] == pytest.approx(min_lr, rel=1e-12)
    assert all(a > b for a, b in zip(at[10:110], at[11:111]))  # strictly decreasing after the warm-up
    assert lr_at(0, 100, 0, lr, min_lr) == pytest.approx(lr, rel=1e-12)  # no warm-up: the peak at once
    low = [lr_at(s, 110, 10, 5e-6, min_lr) for s in range(120)]  # a peak below min_lr (a batch of 1 image)
    assert max(low) == pytest.approx(5e-6, rel=1e-12) and low[10:] == [low[10]] * 110  # flat: it never rises


def test_atomic_write_keeps_the_old_file_when_writing_fails_and_uses_normal_permissions(tmp_path):
    from mmlit_cli.files import atomic_write, atomic_write_text

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
    with pytest.raises(OSError):  # nor the folders made for it (`export --out new/sub/m.onnx`)
        atomic_write(tmp_path / "new" / "sub" / "m.onnx", broken)
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_errors_name_the_users_file_alone(tmp_path):
    """`mmlit plot RUN` with a folder named curves.png there said "cannot write ... ([Errno 21]
    Is a directory: '.../curves.png' -> None)": the temporary file's name was swapped for the
    user's, and str() still showed the second name's slot."""
    from mmlit_cli.files import atomic_write

    (tmp_path / "curves.png").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        atomic_write(tmp_path / "curves.png", lambda tmp: Path(tmp).write_text("png"))
    assert str(e.value) == f"[Errno 21] Is a directory: '{tmp_path / 'curves.png'}'"


def test_atomic_write_takes_a_name_of_255_bytes(tmp_path):
    """The temporary file added 14 bytes to the name: an export or CSV named with 242-255 bytes,
    which the filesystem takes, was "File name too long" (for --csv, after predicting)."""
    from mmlit_cli.files import atomic_write

    for name in ("y" * 250 + ".onnx", "é" * 125 + ".csv", "y" + "é" * 126 + ".x"):  # 255, 254 and 255 bytes
        atomic_write(tmp_path / name, lambda tmp: Path(tmp).write_text("ok"))
        assert (tmp_path / name).read_text() == "ok"
    assert len(list(tmp_path.iterdir())) == 3


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
    best.safetensors and last.safetensors hold the averaged weights, the ones validation scored
    (with --val test, last is the run's only model), not the live ones, which last keeps in its
    training state to resume; validation counts expert usage on the model it runs."""
    out = tmp_path / "ema"
    finetune(folder, out, epochs=1, overrides=TINY + ["finetune.ema=true", "finetune.ema_decay=0.9",
                                                      "model.aux_loss_weight=0.01"])
    best = load_checkpoint(out / "best.safetensors").tensors
    last = load_checkpoint(out / "last.safetensors", with_train_state=True)
    live = {k[len("model/"):]: v for k, v in last.train_tensors.items() if k.startswith("model/")}
    assert live.keys() == best.keys() == last.tensors.keys()
    assert all(torch.equal(best[k], last.tensors[k]) for k in best)  # one epoch: best is last, both the EMA
    assert any(not torch.equal(best[k], live[k]) for k in best)  # averaged, not the live weights
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    scored = evaluate_checkpoint(out / "last.safetensors", str(folder), "val", device="cpu").result
    assert scored.loss == pytest.approx(row["val_loss"], rel=1e-5)  # last.safetensors is the model scored

    pre = tmp_path / "ema-mae"
    run_training("pretrain", "xxs", str(folder), out=pre, overrides=TINY + ["pretrain.ema=true"], epochs=1,
                 batch_size=8, quiet=True)
    row = json.loads((pre / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(sum(layer) == pytest.approx(1.0) for layer in row["expert_usage"])


def test_wait_for_device_waits_for_a_gpu_only(monkeypatch):
    from mmlit_cli import runtime

    waited = []
    monkeypatch.setattr(runtime.torch.cuda, "synchronize", lambda device=None: waited.append(device))
    runtime.wait_for_device(torch.device("cpu"))
    assert waited == []
    runtime.wait_for_device(torch.device("cuda", 0))
    assert waited == [torch.device("cuda", 0)]


def test_an_epochs_time_ends_when_the_device_has_run_its_steps(tmp_path, monkeypatch):
    """A GPU runs behind the host: an epoch's clock (its img/s, the run's training time) is read
    after waiting for the device, once an epoch."""
    from mmlit_cli import engine, run_record

    events = []
    monkeypatch.setattr(engine, "wait_for_device", lambda device: events.append(("wait", device.type)))
    bank = run_record.RunRecord.bank_elapsed
    monkeypatch.setattr(run_record.RunRecord, "bank_elapsed", lambda self: events.append("bank") or bank(self))
    run_training("finetune", "xxs", str(write_folder(tmp_path / "data")), out=tmp_path / "run", overrides=TINY,
                 epochs=2, batch_size=8, quiet=True)
    assert events == [("wait", "cpu"), "bank"] * 2


def test_from_python_numpy_numbers_and_paths_are_taken_and_other_types_refused(folder, tmp_path):
    """`run_training` takes what a script has at hand (numpy integers from a sweep's grid, Path
    objects) as the CLI's values; a value of another type is a one-line MmlitError naming the
    argument, before any file is written. epochs=1.5 trained 2 epochs; a numpy seed or a Path
    dataset failed after the run's first files."""
    result = run_training(np.str_("finetune"), "xxs", Path(folder), out=tmp_path / "np", overrides=TINY,
                          epochs=np.int64(1), batch_size=np.int32(8), seed=np.int64(3), lr=np.float64(1e-3),
                          quiet=True)
    assert result["epoch"] == 1 and load_checkpoint(tmp_path / "np" / "last.safetensors").config.finetune.seed == 3
    for bad, message in ((dict(epochs=1.5), "epochs must be a whole number, got 1.5"),
                         (dict(patience=0.5), "patience must be a whole number"),
                         (dict(seed=True), "seed must be a whole number, got True"),
                         (dict(lr="1e-3"), "lr must be a number, got '1e-3'"),
                         (dict(overrides="model.depth=2"), "overrides: expected a list of key.path=value strings"),
                         (dict(init=3), "init must be a path or name, got 3")):
        with pytest.raises(MmlitError, match=message):
            run_training("finetune", "xxs", str(folder), out=tmp_path / "bad", **{"overrides": TINY, **bad})
        assert not (tmp_path / "bad").exists()
    with pytest.raises(MmlitError, match="kind must be one of finetune, pretrain, got 'train'"):
        run_training("train", "xxs", str(folder))


def test_a_class_count_the_data_overrides_is_said(folder, tmp_path):
    """`--set model.num_classes=3` on data of another class count: the head follows the data (as
    Ultralytics overrides `nc`), and now says so; it was silent."""
    import io

    from rich.console import Console

    screen = io.StringIO()
    run_training("finetune", "xxs", str(folder), out=tmp_path / "run", overrides=TINY + ["model.num_classes=7"],
                 epochs=1, batch_size=8, console=Console(file=screen, width=300))
    classes = load_checkpoint(tmp_path / "run" / "last.safetensors").config.model.num_classes
    assert classes != 7 and f"note: --set model.num_classes=7 overridden: the head has one output per class of " \
                            f"the data, {classes}" in screen.getvalue()
