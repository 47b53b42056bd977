"""`predict`: collecting files, decoding them as training does, batched top-k, failures, CSV."""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, write_folder

from mmlit_cli.data import load_split, normalize
from mmlit_cli.errors import CheckpointError, MmlitError
from mmlit_cli.evaluate import evaluate_checkpoint, load_classifier
from mmlit_cli.predict import collect_images, predict_paths, write_csv
from mmlit_cli.train import run_training

CLASSES = ["blue", "green", "red"]


def _odd_images(folder: Path) -> None:
    """Images training has to convert: grey, palette, RGBA, 16-bit, non-square, a JPEG."""
    rng = np.random.default_rng(1)
    red = np.zeros((9, 15, 3), dtype=np.uint8)
    red[..., 0] = 230
    Image.fromarray(red).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "red_palette.png")
    Image.fromarray(np.full((20, 11), 120, dtype=np.uint8), "L").save(folder / "red_grey.png")
    rgba = np.concatenate([red, np.full((9, 15, 1), 200, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(folder / "red_rgba.png")
    Image.fromarray((rng.integers(0, 65535, (13, 13))).astype(np.uint16)).save(folder / "red_16bit.png")
    Image.fromarray(red.repeat(4, 0).repeat(4, 1)).save(folder / "red_big.jpg", quality=90)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A split-layout image folder (train/ + val/ with awkward images) and a checkpoint."""
    root = tmp_path_factory.mktemp("predict") / "colours"
    write_folder(root / "train")
    write_folder(root / "val", per_class=4, size=14)
    _odd_images(root / "val" / "red")
    run = root.parent / "run"
    run_training("finetune", "xxs", str(root), out=run, overrides=TINY, epochs=2, batch_size=8, quiet=True)
    return root, run / "best.safetensors"


def test_prediction_shape_topk_and_probabilities(trained):
    root, ckpt = trained
    result = predict_paths(ckpt, [str(root / "val" / "blue")], top_k=2, device="cpu")
    data = json.loads(json.dumps(result.as_dict()))
    assert set(data) == {"predictions", "failures"} and data["failures"] == []
    assert len(data["predictions"]) == 4
    for p in data["predictions"]:
        assert set(p) == {"path", "top"} and Path(p["path"]).is_file()
        assert len(p["top"]) == 2
        assert all(set(t) == {"label", "prob"} and t["label"] in CLASSES for t in p["top"])
        probs = [t["prob"] for t in p["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    full = predict_paths(ckpt, [str(root / "val" / "blue")], top_k=50, device="cpu")  # capped at 3
    assert full.top_k == 3
    for p, q in zip(full.predictions, result.predictions):
        assert len(p["top"]) == 3 and {t["label"] for t in p["top"]} == set(CLASSES)
        assert math.isclose(sum(t["prob"] for t in p["top"]), 1.0, abs_tol=1e-5)
        assert p["top"][:2] == q["top"]


def test_predictions_match_eval_and_the_training_pipeline(trained):
    root, ckpt = trained
    pred = predict_paths(ckpt, [str(root / "val")], top_k=3, batch_size=5, device="cpu")
    assert pred.failures == [] and len(pred.predictions) == 12 + 5

    # Same decoded pixels as load_split (what training and eval see), same probabilities.
    model, meta = load_classifier(ckpt)
    data = load_split(str(root), "val", meta.image_size)
    with torch.inference_mode():
        probs = model(normalize(data.images, meta.mean, meta.std)).softmax(1)
    assert len(data) == len(pred.predictions)
    for p, row, label in zip(pred.predictions, probs, data.labels.tolist()):
        assert Path(p["path"]).parent.name == data.classes[label]  # same file order
        for t in p["top"]:
            assert abs(t["prob"] - row[meta.classes.index(t["label"])].item()) < 1e-5

    # Top-1 accuracy and confusion matrix equal eval's on the same folder.
    report = evaluate_checkpoint(ckpt, str(root), "val", device="cpu")
    confusion = torch.zeros(3, 3, dtype=torch.int64)
    for p in pred.predictions:
        confusion[CLASSES.index(Path(p["path"]).parent.name), CLASSES.index(p["top"][0]["label"])] += 1
    top1 = 100.0 * confusion.diag().sum().item() / len(pred.predictions)
    assert report.classes == CLASSES
    assert abs(top1 - report.result.top1) < 1e-6
    assert torch.equal(confusion, report.result.confusion)


def test_batch_size_does_not_change_predictions(trained):
    root, ckpt = trained
    a = predict_paths(ckpt, [str(root / "val")], top_k=3, batch_size=1, device="cpu")
    b = predict_paths(ckpt, [str(root / "val")], top_k=3, batch_size=256, device="cpu")
    assert [p["path"] for p in a.predictions] == [p["path"] for p in b.predictions]
    for p, q in zip(a.predictions, b.predictions):
        assert [t["label"] for t in p["top"]] == [t["label"] for t in q["top"]]
        assert max(abs(s["prob"] - t["prob"]) for s, t in zip(p["top"], q["top"])) < 1e-5


def test_unreadable_files_are_failures_and_the_rest_is_predicted(trained, tmp_path):
    _, ckpt = trained
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(folder / f"good_{i}.png")
    (folder / "notes.txt").write_text("not an image\n")
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    (folder / ".DS_Store").write_bytes(b"\0\1hidden")  # hidden: not even collected
    with Image.open(folder / "truncated.jpg") as im:  # the header is fine: only a full decode fails
        assert im.size == (64, 64)

    result = predict_paths(ckpt, [str(folder)], device="cpu")
    assert [Path(p["path"]).name for p in result.predictions] == ["good_0.png", "good_1.png", "good_2.png"]
    failed = {Path(p).name: reason for p, reason in result.failures}
    assert set(failed) == {"notes.txt", "truncated.jpg"}
    assert "not an image" in failed["notes.txt"]
    assert "truncated" in failed["truncated.jpg"]
    assert all(reason and "\n" not in reason for reason in failed.values())


def test_collect_images_folders_globs_and_errors(tmp_path):
    for rel in ("b.png", "a.jpg", "sub/c.png", "sub/deeper/d.png", ".hidden/e.png", "sub/.f.png", "z.txt"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    names = lambda files: [f.relative_to(tmp_path).as_posix() for f in files]  # noqa: E731

    files, errors, repeated = collect_images([str(tmp_path)])
    assert names(files) == ["a.jpg", "b.png", "sub/c.png", "sub/deeper/d.png", "z.txt"] and errors == []
    assert repeated == 0

    files, errors, _ = collect_images([str(tmp_path / "*.png")])
    assert names(files) == ["b.png"] and errors == []
    files, errors, _ = collect_images([str(tmp_path / "**" / "*.png")])
    assert names(files) == ["b.png", "sub/c.png", "sub/deeper/d.png"]

    files, errors, repeated = collect_images([str(tmp_path / "sub" / "c.png"), str(tmp_path / "sub"),
                                              str(tmp_path / "nope.png"), str(tmp_path / "*.gif"),
                                              str(tmp_path / "sub" / ".." / "b.png"), str(tmp_path / "b.png")])
    assert names(files)[:2] == ["sub/c.png", "sub/deeper/d.png"] and len(files) == 3  # each file once
    assert repeated == 2  # sub/c.png in sub, and b.png named twice (the caller says so)
    assert errors == [(str(tmp_path / "nope.png"), "no such file or folder"),
                      (str(tmp_path / "*.gif"), "no file matches this pattern")]
    (tmp_path / "empty").mkdir()
    assert collect_images([str(tmp_path / "empty")]) == ([], [(str(tmp_path / "empty"), "folder holds no files")], 0)


def test_write_csv(trained, tmp_path):
    root, ckpt = trained
    result = predict_paths(ckpt, [str(root / "val" / "green" / "*.png")], top_k=2, device="cpu")
    out = write_csv(result, tmp_path / "out" / "preds.csv")
    rows = list(csv.reader(out.open(newline="")))
    assert rows[0] == ["path", "label", "prob", "label_2", "prob_2"]
    assert len(rows) == 5 and all(len(r) == 5 for r in rows)
    for r, p in zip(rows[1:], result.predictions):
        assert r[0] == p["path"] and r[1] == p["top"][0]["label"]
        assert abs(float(r[2]) - p["top"][0]["prob"]) < 1e-6
    assert sorted(x.name for x in out.parent.iterdir()) == ["preds.csv"]  # no temp file left


def test_a_csv_file_that_appears_while_predicting_is_not_overwritten(trained, tmp_path):
    """`--csv` is checked before predicting; a file that takes the name meanwhile (or a link to
    nothing) was replaced at the end. An unwritable place is named as the user named it, not
    by the hidden temporary file mmlit writes first."""
    root, ckpt = trained
    result = predict_paths(ckpt, [str(root / "val" / "green" / "*.png")], top_k=1, device="cpu")
    theirs = tmp_path / "preds.csv"
    theirs.write_text("their own work")
    with pytest.raises(MmlitError, match=r"preds.csv already exists \(it was not there when predicting began\?\): "
                                         r"not overwritten"):
        write_csv(result, theirs)
    assert theirs.read_text() == "their own work"
    (tmp_path / "link.csv").symlink_to(tmp_path / "nowhere.csv")
    with pytest.raises(MmlitError, match="link.csv already exists"):
        write_csv(result, tmp_path / "link.csv")
    assert (tmp_path / "link.csv").is_symlink() and not (tmp_path / "nowhere.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "preds.csv"]  # no temporary file left
    with pytest.raises(MmlitError) as e:  # /proc takes no new file
        write_csv(result, "/proc/preds.csv")
    assert "'/proc/preds.csv'" in str(e.value) and ".tmp" not in str(e.value)


def test_user_mistakes_are_one_line_errors(trained, tmp_path):
    root, ckpt = trained
    with pytest.raises(MmlitError, match="top-k"):
        predict_paths(ckpt, [str(root / "val")], top_k=0)
    with pytest.raises(MmlitError, match="no file to predict"):
        predict_paths(ckpt, [str(tmp_path / "missing.png")])
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        predict_paths(tmp_path / "nope.safetensors", [str(root / "val")])
    from mmlit_cli import load_model  # a loaded model where the path goes: it was a raw TypeError
    with pytest.raises(MmlitError, match=r"takes the path of a checkpoint or ONNX file, not a MLiT; for a loaded "
                                         r"model, model\(preprocess\(images, model\)\) gives its logits"):
        predict_paths(load_model(ckpt), [str(root / "val")])


def test_mae_checkpoint_is_refused(trained, tmp_path):
    root, _ = trained
    run_training("pretrain", "xxs", str(root), out=tmp_path / "mae", overrides=TINY, epochs=1, batch_size=8,
                 quiet=True, max_steps=1)
    with pytest.raises(CheckpointError, match="MAE pre-training checkpoint"):
        predict_paths(tmp_path / "mae" / "last.safetensors", [str(root / "val")])


def test_compiled_eval_and_predict_match_eager(trained):
    """`--compile` for inference: same figures as eager, also for a partial last batch
    (17 images in batches of 5: a second, dynamic-shape graph)."""
    root, ckpt = trained
    eager = predict_paths(ckpt, [str(root / "val")], top_k=3, batch_size=5, device="cpu")
    compiled = predict_paths(ckpt, [str(root / "val")], top_k=3, batch_size=5, device="cpu", compile=True)
    for p, q in zip(eager.predictions, compiled.predictions, strict=True):
        assert [t["label"] for t in p["top"]] == [t["label"] for t in q["top"]]
        assert max(abs(s["prob"] - t["prob"]) for s, t in zip(p["top"], q["top"])) < 1e-5
    a = evaluate_checkpoint(ckpt, str(root), "val", batch_size=5, device="cpu")
    b = evaluate_checkpoint(ckpt, str(root), "val", batch_size=5, device="cpu", compile=True)
    assert torch.equal(a.result.confusion, b.result.confusion)
    assert abs(a.result.loss - b.result.loss) < 1e-5
    assert len(b.result.expert_usage) == len(a.result.expert_usage) == 3  # usage counting works compiled
    for la, lb in zip(a.result.expert_usage, b.result.expert_usage):
        assert sum(lb) == pytest.approx(1.0) and lb == pytest.approx(la)
    with pytest.raises(MmlitError, match="--compile-mode must be"):
        predict_paths(ckpt, [str(root / "val")], device="cpu", compile_mode="fastest")


def test_csv_of_a_file_name_that_is_not_utf8_holds_its_bytes(trained, tmp_path):
    """A Latin-1 name (b"caf\\xe9.png"): `predict --csv` stopped with an internal error; the
    CSV now holds the name's bytes as they are on disk, as a fresh process writes it."""
    import os
    import subprocess
    import sys

    root, ckpt = trained
    folder = tmp_path / "latin"
    folder.mkdir()
    first = sorted((root / "val" / "green").glob("*.png"))[0]
    name = os.fsdecode(b"caf\xe9.png")
    (folder / name).write_bytes(first.read_bytes())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "mmlit_cli", "predict", str(ckpt), str(folder), "--csv",
                           str(tmp_path / "p.csv")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    rows = (tmp_path / "p.csv").read_bytes().splitlines()
    assert len(rows) == 2 and rows[1].startswith(os.fsencode(str(folder / name)) + b",")


def test_a_fifo_in_a_folder_is_left_out_not_waited_on(trained, tmp_path):
    """Reading a FIFO blocks until a writer comes: `predict FOLDER` hung on one for ever."""
    import os
    import subprocess
    import sys

    root, ckpt = trained
    folder = tmp_path / "with-fifo"
    folder.mkdir()
    first = sorted((root / "val" / "green").glob("*.png"))[0]
    (folder / "a.png").write_bytes(first.read_bytes())
    os.mkfifo(folder / "pipe.png")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "mmlit_cli", "predict", str(ckpt), str(folder), "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [Path(p["path"]).name for p in json.loads(done.stdout)] == ["a.png"]


# ----------------------------------------------------------------------------- the Python API


def test_load_model_and_preprocess_give_predicts_probabilities(trained):
    """`mmlit_cli.load_model` + `preprocess` on files training has to convert (palette, grey,
    RGBA, 16-bit, non-square, a big JPEG) give what `predict` gives, image by image."""
    import mmlit_cli

    root, ckpt = trained
    files = sorted(str(p) for p in (root / "val").rglob("*") if p.is_file())
    model = mmlit_cli.load_model(ckpt)
    assert not model.training and model.class_names == CLASSES
    _, stored = load_classifier(ckpt)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 12, 12) and cfg["label_names"] == CLASSES and cfg["num_classes"] == 3
    assert cfg["mean"] == tuple(stored.mean) and cfg["std"] == tuple(stored.std) and cfg["interpolation"] == "bilinear"
    with torch.inference_mode():
        probs = model(mmlit_cli.preprocess(files, model)).softmax(dim=1)
    result = predict_paths(ckpt, files, top_k=3, device="cpu")
    assert [p["path"] for p in result.predictions] == files and not result.failures
    for row, p in zip(result.predictions, probs):
        by_label = {t["label"]: t["prob"] for t in row["top"]}
        assert torch.allclose(p, torch.tensor([by_label[c] for c in CLASSES]), atol=1e-6), row["path"]


def test_preprocess_reads_pillow_images_and_arrays_as_it_reads_files(trained, tmp_path):
    import mmlit_cli

    _, ckpt = trained
    model = mmlit_cli.load_model(ckpt)
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, (10, 17, 3), dtype=np.uint8)  # not square: resized and centre-cropped
    grey = rng.integers(0, 256, (15, 9), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    rgba = np.concatenate([wide, np.full((10, 17, 1), 99, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    from_files = mmlit_cli.preprocess([tmp_path / "wide.png", str(tmp_path / "grey.png"), tmp_path / "rgba.png"], model)
    assert from_files.shape == (3, 3, 12, 12) and from_files.dtype == torch.float32
    from_pillow = mmlit_cli.preprocess([Image.open(tmp_path / n) for n in ("wide.png", "grey.png", "rgba.png")], model)
    from_arrays = mmlit_cli.preprocess([wide, grey, rgba[..., :3]], model)
    assert torch.equal(from_files, from_pillow) and torch.equal(from_files, from_arrays)
    assert torch.equal(mmlit_cli.preprocess(wide, model), from_files[:1])  # one image, not in a list
    # not the same as a plain square resize: the aspect is kept
    square = mmlit_cli.preprocess(np.asarray(Image.fromarray(wide).resize((12, 12), Image.Resampling.BILINEAR)), model)
    assert not torch.equal(square, from_files[:1])
    half = mmlit_cli.load_model(ckpt).to(torch.bfloat16)  # timm's way to a bf16 model: preprocess follows it
    batch = mmlit_cli.preprocess([wide, grey], half)
    assert batch.dtype == torch.bfloat16 and torch.equal(batch, from_files[:2].to(torch.bfloat16))
    assert half(batch).shape == (2, len(CLASSES))


def test_preprocess_and_load_model_refuse_bad_input_by_name(trained, tmp_path):
    import mmlit_cli
    from mmlit_cli.model import MLiT

    root, ckpt = trained
    model = mmlit_cli.load_model(ckpt)
    (tmp_path / "notes.txt").write_text("not an image")
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:4000])
    cases = [([tmp_path / "missing.jpg"], "missing.jpg: file not found"),
             ([str(tmp_path / "notes.txt")], "notes.txt: not an image Pillow can read"),
             ([np.zeros((4, 4, 3), np.uint8), 3], "image 1: expected an image file path, a Pillow image or a uint8 "
                                                   "array, got int"),
             ([np.zeros((4, 4, 3), np.float32)], "image 0: expected a uint8 array of shape [H, W, 3] or [H, W], "
                                                 "got float32 [4, 4, 3]"),
             ([np.zeros((4, 4, 4), np.uint8)], "got uint8 [4, 4, 4]"), ([], "no image given"),
             (5, "expected an image or a list of images, got int"), (b"x", "got bytes"),
             ([np.zeros((0, 0, 3), np.uint8)], "image 0: empty (0x0 pixels)"),
             ([Image.new("La", (5, 5))], "image 0: cannot convert it"),
             ([Image.open(truncated)], "image 0: cannot convert it")]
    for images, needle in cases:
        with pytest.raises(MmlitError, match=re.escape(needle)):
            mmlit_cli.preprocess(images, model)
    with pytest.raises(MmlitError, match="needs a classifier from mmlit_cli.load_model"):
        mmlit_cli.preprocess([np.zeros((4, 4, 3), np.uint8)], MLiT(model.cfg))
    with pytest.raises(CheckpointError, match="not a checkpoint file"):
        mmlit_cli.load_model(root)
    with pytest.raises(MmlitError, match="not found: .*model.onnx"):
        mmlit_cli.load_model(tmp_path / "model.onnx")  # missing: said so, not "is an ONNX file"
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(MmlitError, match="is an ONNX file: run it with onnxruntime"):
        mmlit_cli.load_model(tmp_path / "model.onnx")
    grey = mmlit_cli.create_model("xxs", num_classes=3, in_chans=1, image_size=12, patch_size=3,
                                  overrides=["model.depth=1"])
    with pytest.raises(MmlitError, match=r"preprocess makes RGB batches \[N, 3, S, S\]; this model takes 1 "):
        mmlit_cli.preprocess([np.zeros((4, 4, 3), np.uint8)], grey)


def test_predict_paths_takes_the_devices_load_model_takes(trained):
    import mmlit_cli

    root, ckpt = trained
    files = sorted(str(p) for p in (root / "val").rglob("*.png"))[:3]
    on_cpu = mmlit_cli.predict_paths(ckpt, files, device="cpu").predictions
    for device in (None, torch.device("cpu")):
        assert mmlit_cli.predict_paths(ckpt, files, device=device).predictions == on_cpu


def test_create_model_says_what_it_takes():
    import mmlit_cli
    from mmlit_cli.config import load_config

    model = mmlit_cli.create_model("xxs", num_classes=7, image_size=24)
    preset = load_config("xxs")
    assert model.pretrained_cfg["input_size"] == (3, 24, 24) and model.pretrained_cfg["num_classes"] == 7
    assert model.pretrained_cfg["mean"] == tuple(preset.data.mean) and model.pretrained_cfg["label_names"] is None
    x = mmlit_cli.preprocess(np.zeros((30, 40, 3), np.uint8), model)
    assert model(x).shape == (1, 7)


def test_list_models_names_the_bundled_presets():
    import mmlit_cli

    assert mmlit_cli.list_models() == ["s", "xs", "xxs"] and mmlit_cli.list_models("x*") == ["xs", "xxs"]
    assert mmlit_cli.list_models(None) == mmlit_cli.list_models("") == ["s", "xs", "xxs"]  # as timm takes them
    assert mmlit_cli.list_models("vit*") == []


def test_csv_to_a_closed_standard_output_is_said_before_predicting(tmp_path):
    """`mmlit predict CKPT IMAGES --csv - >&-` was "internal error: TypeError: argument 1 must have a
    "write" method", after every prediction."""
    command = f"'{sys.executable}' -m mmlit_cli predict '{tmp_path / 'c.safetensors'}' '{tmp_path}' --csv - >&-"
    r = subprocess.run(["bash", "-c", command], capture_output=False, stderr=subprocess.PIPE, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (2, "error: --csv -: standard output is closed\n")
