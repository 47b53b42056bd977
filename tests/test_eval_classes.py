"""`eval` checks the dataset's classes against the checkpoint's by name, not only their count
(issue 12, bug 3): different names are a one-line error, the same names in another order are
matched, and --classes-by-position scores a relabelled dataset in order on request."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

from helpers import TINY, write_folder

from mmlit_cli.checkpoint import Checkpoint, save_checkpoint
from mmlit_cli.config import load_config
from mmlit_cli.errors import MmlitError
from mmlit_cli.evaluate import EvalReport, evaluate_checkpoint
from mmlit_cli.model import MLiT


def constant_classifier(path, classes):
    """A checkpoint whose model predicts its first class for every image."""
    cfg = load_config("xxs", TINY)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=len(classes)))
    model = MLiT(cfg.model)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([5.0] + [0.0] * (len(classes) - 1)))
    save_checkpoint(path, Checkpoint(model.state_dict(), cfg, "classify", list(classes), {}))
    return path


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    """2 'kitten' and 6 'puppy' images; one of each class is held out, so the 'train' split
    has 1 kitten and 5 puppies."""
    root = tmp_path_factory.mktemp("pets") / "pets"
    write_folder(root, classes=("kitten",), per_class=2)
    write_folder(root, classes=("puppy",), per_class=6)
    return root


def test_different_class_names_are_an_error_naming_them(pets, tmp_path):
    ckpt = constant_classifier(tmp_path / "c.safetensors", ["cat", "dog"])
    with pytest.raises(MmlitError, match=r"has 'kitten', 'puppy' where the checkpoint has 'cat', 'dog'"):
        evaluate_checkpoint(ckpt, str(pets), "train", device="cpu")

    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "eval", str(ckpt), "--dataset", str(pets), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'kitten', 'puppy' where the checkpoint has 'cat', 'dog'" in " ".join(r.stderr.split())
    assert "--classes-by-position" in " ".join(r.stderr.split())


def test_only_the_differing_names_are_listed(tmp_path):
    root = write_folder(tmp_path / "f", classes=("ant", "bee", "cow"), per_class=2)
    ckpt = constant_classifier(tmp_path / "c.safetensors", ["ant", "bat", "cow"])
    with pytest.raises(MmlitError, match=r"has 'bee' where the checkpoint has 'bat'"):
        evaluate_checkpoint(ckpt, str(root), "train", device="cpu")


def test_the_same_names_in_another_order_are_matched_by_name(pets, tmp_path):
    # trained with 'puppy' as class 0 (the folder lists 'kitten' first): every image is
    # predicted 'puppy', so exactly the puppies are right
    ckpt = constant_classifier(tmp_path / "c.safetensors", ["puppy", "kitten"])
    report = evaluate_checkpoint(ckpt, str(pets), "train", device="cpu")
    assert report.result.num_images == 6
    assert report.result.top1 == pytest.approx(100 * 5 / 6)
    assert report.as_dict()["per_class"] == {"puppy": 100.0, "kitten": 0.0}
    assert "matched by name" in report.source


def test_a_folder_with_some_of_the_checkpoints_classes_is_scored_by_name(tmp_path):
    """A test folder without one of the classes was "the checkpoint predicts 4 classes but f has
    3", naming none; it is scored, the missing class with no images (null in the JSON, where
    a label file's split without that class said 0.0 %)."""
    root = write_folder(tmp_path / "f", classes=("bee", "cow"), per_class=2)
    ckpt = constant_classifier(tmp_path / "c.safetensors", ["cow", "ant", "bee"])  # predicts 'cow' always
    report = evaluate_checkpoint(ckpt, str(root), "train", device="cpu")
    assert report.result.top1 == pytest.approx(50.0) and report.classes == ["cow", "ant", "bee"]
    assert "2 of the checkpoint's 3 ('ant' not in" in report.source
    shown = report.as_dict()
    assert shown["per_class"] == {"cow": 100.0, "ant": None, "bee": 0.0}
    assert shown["images"] == {"cow": 1, "ant": 0, "bee": 1}
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "eval", str(ckpt), "--dataset", str(root)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"│ ant +│ no images │ +0 │", r.stdout), r.stdout


def test_eval_split_all_scores_every_image_of_a_test_folder(tmp_path):
    """`mmlit eval CKPT --dataset my-test-set --split all`: all 8 images (--split val scored the
    2 a training run would have held out)."""
    root = write_folder(tmp_path / "test-set", classes=("bee", "cow"), per_class=4)
    ckpt = constant_classifier(tmp_path / "c.safetensors", ["bee", "cow"])
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "eval", str(ckpt), "--dataset", str(root), "--split",
                        "all", "--json"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["num_images"] == 8 and shown["images"] == {"bee": 4, "cow": 4} and shown["top1"] == 50.0


def test_a_test_set_of_one_class_is_scored_with_split_all(tmp_path):
    """A folder of only the cat photos, or a label file whose rows are all 'cow': "a classifier
    needs at least 2 class sub-folders" was right for training, not for a test set."""
    root = write_folder(tmp_path / "cows", classes=("cow",), per_class=3)
    (tmp_path / "cows.csv").write_text("path,label\n" + "".join(f"cows/cow/cow_{i:03d}.png,cow\n" for i in range(3)))
    ckpt = constant_classifier(tmp_path / "c.safetensors", ["cow", "bee"])  # predicts 'cow' always
    for dataset in (root, tmp_path / "cows.csv"):
        report = evaluate_checkpoint(ckpt, str(dataset), "all", device="cpu")
        assert report.result.top1 == 100.0 and report.as_dict()["images"] == {"cow": 3, "bee": 0}
        with pytest.raises(MmlitError, match="at least 2"):  # val: what a training run would hold out
            evaluate_checkpoint(ckpt, str(dataset), "val", device="cpu")


def test_a_batch_larger_than_the_split_is_the_whole_split(tmp_path):
    """`--batch-size 99999999999999999999` was "internal error: ValueError: Stop argument for
    islice()"; a batch larger than the split takes it whole."""
    root = write_folder(tmp_path / "f", classes=("bee", "cow"), per_class=2)
    ckpt = constant_classifier(tmp_path / "c.safetensors", ["bee", "cow"])
    assert evaluate_checkpoint(ckpt, str(root), "all", batch_size=10**20, device="cpu").result.top1 == 50.0


def test_json_output_is_strict_json_with_null_for_a_figure_that_is_not_finite():
    from mmlit_cli.cli import json_text

    text = json_text({"loss": float("nan"), "top1": 50.0, "per_class": {"a": float("inf"), "b": None}, "x": (1, 2.5)})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == \
        {"loss": None, "top1": 50.0, "per_class": {"a": None, "b": None}, "x": [1, 2.5]}


def test_a_class_the_checkpoint_does_not_predict_is_named(tmp_path):
    root = write_folder(tmp_path / "f", classes=("ant", "bee", "cow"), per_class=2)
    write_folder(root, classes=("dog",), per_class=2)
    ckpt = constant_classifier(tmp_path / "c.safetensors", ["ant", "bee", "cow"])
    with pytest.raises(MmlitError, match=r"has the checkpoint's 3 classes and 'dog', which it does not predict: leave "
                                         r"that class out of the data"):
        evaluate_checkpoint(ckpt, str(root), "train", device="cpu")
    with pytest.raises(MmlitError, match=r"--classes-by-position: the checkpoint predicts 3 classes but .* has 4"):
        evaluate_checkpoint(ckpt, str(root), "train", device="cpu", classes_by_position=True)


def test_classes_by_position_scores_a_relabelled_folder_in_order(pets, tmp_path):
    ckpt = constant_classifier(tmp_path / "c.safetensors", ["cat", "dog"])  # 'cat' = the folder's 'kitten'
    report = evaluate_checkpoint(ckpt, str(pets), "train", device="cpu", classes_by_position=True)
    assert report.result.top1 == pytest.approx(100 * 1 / 6)  # only the kitten is class 0
    assert "'kitten' = 'cat'" in report.source and "'puppy' = 'dog'" in report.source


def test_balanced_accuracy_and_macro_f1_from_a_hand_computed_confusion_matrix():
    """3 classes, rows = true class, columns = predicted; the third class has no images but is
    predicted once (it counts in macro-F1, as scikit-learn counts it, not in balanced accuracy)."""
    import torch

    from mmlit_cli.metrics import EvalResult

    confusion = torch.tensor([[8, 2, 0],   # class 0: 10 images, recall 0.8
                              [3, 6, 1],   # class 1: 10 images, recall 0.6
                              [0, 0, 0]])  # class 2: none
    r = EvalResult(0.0, 70.0, 100.0, 20, confusion, [], 1.0)
    assert r.balanced_accuracy == pytest.approx(100 * (0.8 + 0.6) / 2)
    # precision: 8/11, 6/8, 0/1; F1 = 2PR/(P+R): 2*8/(10+11), 2*6/(10+8), 0
    assert r.macro_f1 == pytest.approx(100 * (16 / 21 + 12 / 18 + 0) / 3)
    assert r.per_class_precision() == pytest.approx([100 * 8 / 11, 100 * 6 / 8, 0.0])
    imbalanced = EvalResult(0.0, 90.0, 100.0, 100, torch.tensor([[90, 0], [10, 0]]), [], 1.0)
    assert imbalanced.top1 == 90.0 and imbalanced.balanced_accuracy == 50.0  # the rare class ignored
    assert imbalanced.macro_f1 == pytest.approx(100 * (2 * 90 / 190) / 2)
    # a class with no images has no recall, and one never predicted no precision: null in eval's
    # JSON (it said 0.0 %, "never right", next to a balanced accuracy that left the class out)
    report = EvalReport(r, ["ant", "bee", "cow"], "test")
    shown = json.loads(json.dumps(report.as_dict()))
    assert shown["per_class"] == shown["recall"] == {"ant": 80.0, "bee": 60.0, "cow": None}
    assert shown["images"] == {"ant": 10, "bee": 10, "cow": 0}
    assert EvalReport(imbalanced, ["a", "b"], "test").as_dict()["precision"] == {"a": 90.0, "b": None}


def test_predict_csv_to_a_terminal_that_is_not_utf8_is_utf8_as_the_file_is(tmp_path):
    """`predict --csv -` through a cp1252 stdout wrote '?' for a class named 狗 (and before that
    crashed): the CSV on a pipe is UTF-8, as `--csv FILE` is."""
    import os

    ckpt = constant_classifier(tmp_path / "c.safetensors", ["狗", "cat"])
    images = write_folder(tmp_path / "imgs", classes=("狗",), per_class=1)
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "predict", str(ckpt), str(images), "--csv", "-"],
                       capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "cp1252"})
    assert r.returncode == 0, r.stderr
    rows = r.stdout.decode("utf-8").splitlines()
    assert rows[0].startswith("path,label,prob") and rows[1].split(",")[1] == "狗" and "狗_000.png" in rows[1]
