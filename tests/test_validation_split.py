"""Model selection never looks at the reported split (issue 12, bug 4).

Datasets without an official validation split (cifar10, cifar100, svhn, fashion-mnist, image
folders with train/ + test/ but no val/) hold a stratified part of the training split out for
validation and best.safetensors; "test" stays the official test split. `--val test` is the
paper protocol: the whole training split, validation on the test split, no best.safetensors.
"""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from rich.console import Console

import datafixtures as fx
from helpers import TINY, write_folder

from mmlit_cli.checkpoint import load_checkpoint
from mmlit_cli.data import load_split
from mmlit_cli.errors import MmlitError
from mmlit_cli.evaluate import evaluate_checkpoint
from mmlit_cli.train import run_training


def rows_of(images: torch.Tensor) -> list[bytes]:
    return [bytes(x) for x in images.numpy().reshape(len(images), -1)]


def held_per_class(n: int, fraction: float = 0.1) -> int:
    """The documented rule: max(1, round(fraction * n)), at most n - 1, none of a 1-image class."""
    return 0 if n < 2 else min(n - 1, max(1, round(fraction * n)))


@pytest.mark.parametrize("name,write,n_train,n_test", [
    ("cifar10", lambda root: fx.write_cifar10_python(root, n_per_batch=10, n_test=6), 50, 6),
    ("svhn", lambda root: fx.write_svhn(root, n_train=40, n_test=5), 40, 5),
    ("fashion-mnist", lambda root: fx.write_fashion_mnist(root, n_train=30, n_test=6), 30, 6),
])
def test_named_datasets_without_a_val_split_hold_it_out_of_train(tmp_path, name, write, n_train, n_test):
    written = write(tmp_path)
    size = 28 if name == "fashion-mnist" else 32
    tr = load_split(name, "train", size, data_dir=tmp_path)
    va = load_split(name, "val", size, data_dir=tmp_path)
    te = load_split(name, "test", size, data_dir=tmp_path)
    whole = load_split(name, "train", size, data_dir=tmp_path, holdout=False)
    assert len(whole) == n_train and len(te) == n_test

    # val is a stratified part of the official train split; train is the rest; test is untouched
    counts = np.bincount(whole.labels.numpy(), minlength=10)
    assert np.bincount(va.labels.numpy(), minlength=10).tolist() == [held_per_class(int(n)) for n in counts]
    assert len(tr) + len(va) == n_train
    assert not set(rows_of(tr.images)) & set(rows_of(va.images))
    assert sorted(rows_of(tr.images) + rows_of(va.images)) == sorted(rows_of(whole.images))
    test_images = written["test"][0] if name != "fashion-mnist" else written["test"][0][:, None].repeat(3, 1)
    assert rows_of(te.images) == rows_of(torch.from_numpy(np.ascontiguousarray(test_images)))
    assert "held out" in tr.source and "held out of the train split" in va.source
    assert "test split is untouched" in va.source

    torch.manual_seed(7)  # independent of any training seed
    assert torch.equal(load_split(name, "val", size, data_dir=tmp_path).images, va.images)
    # the paper protocol: nothing held out, "val" is the test split
    assert torch.equal(load_split(name, "val", size, data_dir=tmp_path, holdout=False).images, te.images)


def test_datasets_with_an_official_val_split_are_unchanged(tmp_path):
    w = fx.write_flowers102(tmp_path, n_train=4, n_val=3, n_test=5)
    for holdout in (True, False):
        for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
            d = load_split("flowers102", split, 36, data_dir=tmp_path, holdout=holdout)
            assert len(d) == len(w["ids"][key])
    folder = tmp_path / "f"
    fx.write_image_folder(folder / "train", {"x": 4, "y": 4})
    fx.write_image_folder(folder / "val", {"x": 1, "y": 2}, seed=1)
    fx.write_image_folder(folder / "test", {"x": 2, "y": 1}, seed=2)
    for holdout in (True, False):
        assert len(load_split(str(folder), "train", 20, holdout=holdout)) == 8
        assert load_split(str(folder), "val", 20, holdout=holdout).labels.tolist() == [0, 1, 1]
        assert load_split(str(folder), "test", 20, holdout=holdout).labels.tolist() == [0, 0, 1]


def test_a_folder_with_train_and_test_but_no_val_holds_val_out_of_train(tmp_path):
    fx.write_image_folder(tmp_path / "train", {"x": 10, "y": 6})
    fx.write_image_folder(tmp_path / "test", {"x": 2, "y": 3}, seed=1)
    tr, va, te = (load_split(str(tmp_path), s, 20) for s in ("train", "val", "test"))
    assert va.labels.tolist() == [0] * held_per_class(10) + [1] * held_per_class(6)
    assert len(tr) == 16 - len(va) and not set(rows_of(tr.images)) & set(rows_of(va.images))
    assert te.labels.tolist() == [0, 0, 1, 1, 1]  # the test folder, whole
    assert not set(rows_of(te.images)) & set(rows_of(va.images))
    # paper protocol: all of train/, validation on test/
    assert len(load_split(str(tmp_path), "train", 20, holdout=False)) == 16
    assert torch.equal(load_split(str(tmp_path), "val", 20, holdout=False).images, te.images)


def test_a_plain_folder_has_no_test_split_without_a_held_out_part(tmp_path):
    fx.write_image_folder(tmp_path, {"x": 3, "y": 3})
    assert len(load_split(str(tmp_path), "train", 20, holdout=False)) == 6
    with pytest.raises(MmlitError, match="no val/ or test/ folder"):
        load_split(str(tmp_path), "test", 20, holdout=False)


@pytest.fixture(scope="module")
def train_test(tmp_path_factory):
    """train/ with 12 images per class (1 held out each: 33 left), test/ with 4 per class."""
    root = tmp_path_factory.mktemp("tt") / "colours"
    write_folder(root / "train", per_class=12)
    fx.write_image_folder(root / "test", {"blue": 4, "green": 4, "red": 4}, size=10, seed=5)
    return root


def finetune(folder, out, **kw):
    return run_training("finetune", "xxs", str(folder), out=out, overrides=TINY, batch_size=3, **kw)


def history(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_validates_and_picks_best_on_the_held_out_part(train_test, tmp_path):
    out = tmp_path / "run"
    shown = io.StringIO()
    finetune(train_test, out, epochs=1, console=Console(file=shown, width=400))
    first = shown.getvalue().splitlines()[0]
    assert first.startswith("data: ") and "validation: " in first
    data_line = " ".join(shown.getvalue().split("\nclassify")[0].split())  # wrapped at 400 columns
    assert "held-out 8.33% (3 of 36 images; 10% asked, rounded per class, at least one each) of train (stratified, " \
        "seed 0; test/ untouched)" in data_line, data_line

    rows = history(out)
    assert rows[-1]["step"] == (36 - 3) // 3  # trained on train/ minus the 3 held-out images
    best = evaluate_checkpoint(out / "best.safetensors", str(train_test), "val", device="cpu")
    assert best.result.num_images == 3
    assert best.result.loss == pytest.approx(rows[-1]["val_loss"], rel=1e-5)
    test = evaluate_checkpoint(out / "best.safetensors", str(train_test), "test", device="cpu")
    assert test.result.num_images == 12  # the official test/ folder, untouched by training and selection


def test_the_paper_protocol_validates_on_test_keeps_no_best_and_survives_resume(train_test, tmp_path):
    out = tmp_path / "paper"
    stopped = finetune(train_test, out, epochs=2, validation="test", max_steps=15, save_every=0, quiet=True)
    assert stopped["stopped"] == "max_steps"  # 12 steps an epoch: the whole train/ folder
    state = load_checkpoint(out / "last.safetensors", with_train_state=True).train_info
    assert state["dataset"]["validation"] == "test" and state["step_in_epoch"] == 3
    with pytest.raises(MmlitError, match="--val test"):
        run_training("finetune", None, None, resume=out, validation="auto", quiet=True)

    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "finetune", "--resume", str(out), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert "validation: " in first and "'test' split" in first and "paper protocol" in first
    assert "no best.safetensors" in first
    done = [line for line in r.stdout.splitlines() if line.startswith("done: ")]
    assert len(done) == 1 and "best.safetensors, " not in done[0] and "no best.safetensors" in done[0]
    assert not (out / "best.safetensors").exists()

    rows = history(out)
    assert [r["step"] for r in rows] == [12, 24]
    last = evaluate_checkpoint(out / "last.safetensors", str(train_test), "test", device="cpu")
    assert last.result.num_images == 12
    assert last.result.loss == pytest.approx(rows[-1]["val_loss"], rel=1e-5)

    # `eval` as a user runs it, no --split: the run's "val" is the test split it validated on,
    # not a part held out of the train/ images it trained on
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "eval", str(out / "last.safetensors"), "--json",
                        "--device", "cpu", "--out", str(tmp_path / "ev")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    scored = json.loads(r.stdout)
    assert scored["num_images"] == 12 and scored["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-5)
    train = evaluate_checkpoint(out / "last.safetensors", None, "train", device="cpu")
    assert train.result.num_images == 36  # all of train/, as the run trained on it


def test_an_unknown_validation_choice_is_refused(train_test, tmp_path):
    with pytest.raises(MmlitError, match="--val must be auto or test"):
        finetune(train_test, tmp_path / "x", epochs=1, validation="train", quiet=True)


@pytest.mark.parametrize("layout", ["folder", "label file"])
def test_images_added_since_a_run_change_its_hold_out_and_are_said(tmp_path, layout):
    """Which files the hold-out picks depends on every file of a class: 20 red images hold out
    positions 4 and 19, 21 hold out 10 and 18, both trained on before. Each checkpoint records
    which files its run held out: `eval` then warns (in its JSON too), and `--resume` is refused;
    an image that leaves the hold-out as it was (a class of 25 holds out 19 and 4 again) is
    trained on, and nothing is said."""
    images = write_folder(tmp_path / "d", per_class=20)
    dataset = images
    if layout == "label file":
        dataset = tmp_path / "labels.csv"
        rows = ["path,label"] + [f"{p.relative_to(tmp_path).as_posix()},{p.parent.name}"
                                 for p in sorted(images.rglob("*.png"))]
        dataset.write_text("\n".join(rows) + "\n")

    def add(names):
        from PIL import Image

        for name in names:
            Image.new("RGB", (10, 10), (200, 0, 0)).save(images / "red" / name)
            if layout == "label file":
                with dataset.open("a") as f:
                    f.write(f"d/red/{name},red\n")

    def train(epochs):
        return run_training("finetune", "xxs", str(dataset), out=tmp_path / "run", overrides=TINY, epochs=epochs,
                            batch_size=8, device="cpu", quiet=True, resume=tmp_path / "run" if epochs > 1 else None)

    train(1)
    best = tmp_path / "run" / "best.safetensors"
    assert evaluate_checkpoint(best, None, device="cpu").warnings == []
    add([f"red_{i:03d}.png" for i in range(20, 25)])  # 25: the same two held out
    assert evaluate_checkpoint(best, None, device="cpu").warnings == []
    train(2)
    add(["red_025.png"])  # 26: three held out, 10 among them
    for split in ("val", "train"):
        report = evaluate_checkpoint(best, None, split, device="cpu")
        assert len(report.warnings) == 1 and "may hold images the model trained on" in report.warnings[0]
        assert report.as_dict()["warnings"] == report.warnings
    assert evaluate_checkpoint(best, None, "val", device="cpu").result.num_images == 7
    assert evaluate_checkpoint(best, str(dataset), "val", device="cpu").warnings == report.warnings  # named too
    from mmlit_cli.deploy_benchmark import run_benchmark
    from mmlit_cli.export import load_int8_data

    assert run_benchmark(best, None, calls=1, limit=4, formats=["pytorch-eager"]).warnings == report.warnings
    assert load_int8_data(load_checkpoint(best), str(dataset))[-1] == [  # export --calibrate's
        report.warnings[0].replace("best.safetensors", "the checkpoint")]
    # another dataset's hold-out is its own: a copy of the folder elsewhere says nothing
    other = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "d", other / "d")
    if layout == "label file":
        shutil.copy(dataset, other / "labels.csv")
    copy = other / ("d" if layout == "folder" else "labels.csv")
    assert evaluate_checkpoint(best, str(copy), "val", device="cpu").warnings == []
    with pytest.raises(MmlitError, match=r"validated on images its data no longer holds out .* resumed, it would "
                                         r"validate on images it trained on. Put the data back as it was to resume it$"):
        train(3)
    (images / "red" / "red_025.png").unlink()  # put back as it was
    if layout == "label file":  # and written again, each path spelled another way: the same files
        lines = dataset.read_text().splitlines()[:-1]
        dataset.write_text("\n".join([lines[0]] + [f"./{line}" for line in lines[1:]]) + "\n")
    assert evaluate_checkpoint(best, None, "val", device="cpu").warnings == []
    assert train(3)["epoch"] == 3
