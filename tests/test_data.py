"""Data layer: every loader on tiny files in the real formats, splits, errors, augmentation,
batch mixing and loaders. No network; the whole file runs in a few seconds."""

from __future__ import annotations

import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch

import datafixtures as fx
from mmlit_cli import data as D
from mmlit_cli.data import augment
from mmlit_cli.config import AugmentConfig
from mmlit_cli.data import DataError, load_split


def as_np(images: torch.Tensor) -> np.ndarray:
    return images.numpy()


def assert_bilinear(resized: torch.Tensor, original: np.ndarray) -> None:
    """`resized` [N, 3, S, S] is Pillow's bilinear resize of `original` [N, C, H, W] (C = 1 or 3),
    to within one grey level of rounding."""
    from PIL import Image

    size = resized.shape[-1]
    hwc = original.transpose(0, 2, 3, 1)
    expected = np.stack([np.asarray(Image.fromarray(a if a.shape[-1] == 3 else a[..., 0]).resize(
        (size, size), Image.Resampling.BILINEAR)).reshape(size, size, -1).transpose(2, 0, 1) for a in hwc])
    diff = np.abs(resized.numpy().astype(int) - np.broadcast_to(expected, resized.shape).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.5


# ------------------------------------------------------------------------------------ CIFAR

@pytest.mark.parametrize("protocol,legacy", [(2, True), (2, False), (pickle.HIGHEST_PROTOCOL, False)])
def test_cifar10_python(tmp_path, protocol, legacy):
    w = fx.write_cifar10_python(tmp_path, n_per_batch=4, n_test=6, protocol=protocol,
                                legacy_numpy=legacy)
    tr = load_split("cifar10", "train", 32, data_dir=tmp_path, holdout=False)  # the whole official split
    assert tr.images.dtype == torch.uint8 and tr.images.shape == (20, 3, 32, 32)
    assert tr.labels.dtype == torch.int64
    np.testing.assert_array_equal(as_np(tr.images), w["train"][0])
    np.testing.assert_array_equal(tr.labels.numpy(), w["train"][1])
    assert tr.classes == fx.CIFAR10_CLASSES and tr.skipped == []
    assert "cifar10 'train' split" in tr.source and "cifar-10-batches-py" in tr.source
    val = load_split("cifar10", "val", 32, data_dir=tmp_path, holdout=False)  # no official val: the test split
    te = load_split("cifar10", "test", 36, data_dir=tmp_path)
    np.testing.assert_array_equal(as_np(val.images), w["test"][0])
    assert "test split" in val.source and "(6 images)" in val.source
    assert te.images.shape == (6, 3, 36, 36) and te.images.dtype == torch.uint8
    assert_bilinear(te.images, w["test"][0])  # 32 -> 36: the minimal up-scaling
    assert te.labels.tolist() == w["test"][1].tolist()


def test_cifar10_binary_and_data_dir_env(tmp_path, monkeypatch):
    w = fx.write_cifar10_binary(tmp_path)
    monkeypatch.setenv("MMLIT_DATA", str(tmp_path))
    tr = load_split("cifar10", "train", 32, holdout=False)
    np.testing.assert_array_equal(as_np(tr.images), w["train"][0])
    assert tr.labels.tolist() == w["train"][1].tolist()
    assert tr.classes == fx.CIFAR10_CLASSES
    te = load_split("cifar10", "test", 32)
    np.testing.assert_array_equal(as_np(te.images), w["test"][0])


@pytest.mark.parametrize("writer", [fx.write_cifar100_python, fx.write_cifar100_binary])
def test_cifar100(tmp_path, writer):
    w = writer(tmp_path)
    tr = load_split("cifar100", "train", 32, data_dir=tmp_path)
    te = load_split("cifar100", "test", 32, data_dir=tmp_path)
    assert tr.images.shape == (8, 3, 32, 32) and te.images.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(as_np(tr.images), w["train"][0])
    assert tr.labels.tolist() == w["train"][1].tolist()  # fine labels, not coarse
    assert te.labels.tolist() == w["test"][1].tolist()
    assert tr.classes == fx.CIFAR100_CLASSES


@pytest.mark.parametrize("use_eval", [False, True])
def test_restricted_unpickler_refuses_malicious_pickle(tmp_path, use_eval):
    fx.write_cifar10_python(tmp_path)
    marker = tmp_path / "pwned"
    fx.write_malicious_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_1",
                              f"touch {marker}", use_eval=use_eval)
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_split("cifar10", "train", 32, data_dir=tmp_path)
    assert not marker.exists()


def test_malformed_cifar_pickle(tmp_path):
    fx.write_cifar10_python(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="test_batch"):
        load_split("cifar10", "test", 32, data_dir=tmp_path)


@pytest.mark.parametrize("labels", [None, [[1, 2], [3]], ["cat"] * 6])
def test_cifar_labels_that_are_not_integers_are_a_data_error(tmp_path, labels):
    fx.write_cifar10_python(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    fx._dump({b"labels": labels, b"data": fx.rand_images(6, 32).reshape(6, 3072)}, batch, 2)
    with pytest.raises(DataError, match="test_batch is malformed: its 'labels' are not a list of integer labels"):
        load_split("cifar10", "test", 32, data_dir=tmp_path)


# ------------------------------------------------------------------------------------ SVHN

def test_svhn(tmp_path):
    w = fx.write_svhn(tmp_path / "svhn", n_train=7, n_test=12)
    tr = load_split("svhn", "train", 32, data_dir=tmp_path, holdout=False)  # found in data_dir/svhn too
    np.testing.assert_array_equal(as_np(tr.images), w["train"][0])
    assert tr.labels.tolist() == w["train"][1].tolist()  # label 10 -> digit 0
    assert 0 in tr.labels.tolist() and tr.labels.max() <= 9
    te = load_split("svhn", "val", 36, data_dir=tmp_path, holdout=False)
    assert te.images.shape == (12, 3, 36, 36) and te.classes == [str(i) for i in range(10)]
    assert "test split" in te.source


# ------------------------------------------------------------------------------------ Flowers102

def test_flowers102(tmp_path):
    w = fx.write_flowers102(tmp_path, n_train=4, n_val=3, n_test=5)
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        d = load_split("flowers102", split, 36, data_dir=tmp_path)
        ids = w["ids"][key]
        assert d.images.shape == (len(ids), 3, 36, 36) and d.images.dtype == torch.uint8
        assert d.labels.tolist() == w["labels"][ids - 1].tolist()
        assert len(d.classes) == 102 and d.skipped == []


# ------------------------------------------------------------------------------------ Fashion-MNIST

@pytest.mark.parametrize("gz,layout", [(True, "flat"), (False, "torchvision"), (True, "named")])
def test_fashion_mnist(tmp_path, gz, layout):
    w = fx.write_fashion_mnist(tmp_path, n_train=12, n_test=6, gz=gz, layout=layout)
    tr = load_split("fashion-mnist", "train", 28, data_dir=tmp_path, holdout=False)
    assert tr.images.shape == (12, 3, 28, 28)
    for c in range(3):  # grey -> 3 identical channels
        np.testing.assert_array_equal(as_np(tr.images[:, c]), w["train"][0])
    assert tr.labels.tolist() == w["train"][1].tolist()
    assert tr.classes == fx.FASHION_CLASSES
    te = load_split("fashion-mnist", "test", 36, data_dir=tmp_path)
    assert te.images.shape == (6, 3, 36, 36) and str(w["dir"]) in te.source
    assert_bilinear(te.images, w["test"][0][:, None])  # grey 28 -> 36, then three equal channels


def test_idx_bad_magic(tmp_path):
    fx.write_fashion_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x12\x34\x56\x78" + bytes(100))
    with pytest.raises(DataError, match="magic"):
        load_split("fashion-mnist", "test", 28, data_dir=tmp_path)
    fx.write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((6, 0, 28), np.uint8))  # images of height 0
    with pytest.raises(DataError, match=r"expected uint8 images \[N, H, W\].*\[6, 0, 28\]"):
        load_split("fashion-mnist", "test", 28, data_dir=tmp_path)


# ------------------------------------------------------------------------------------ Tiny-ImageNet

@pytest.mark.parametrize("words", [True, False])
def test_tiny_imagenet(tmp_path, words):
    w = fx.write_tiny_imagenet(tmp_path, n_train=3, n_val=2, words=words)
    tr = load_split("tiny-imagenet", "train", 32, data_dir=tmp_path)
    assert tr.images.shape == (9, 3, 32, 32) and tr.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert tr.skipped == []  # the *_boxes.txt files are not images
    expected = ["goldfish", "European fire salamander", "tabby"] if words else w["wnids"]
    assert tr.classes == expected
    val = load_split("tiny-imagenet", "val", 64, data_dir=tmp_path)
    assert val.images.shape == (6, 3, 64, 64) and val.labels.tolist() == w["val_labels"]
    te = load_split("tiny-imagenet", "test", 64, data_dir=tmp_path)
    assert te.labels.tolist() == w["val_labels"] and "no labelled test split" in te.source


# ------------------------------------------------------------------------------------ image folders

def test_folder_stratified_holdout(tmp_path):
    counts = {"cat": 10, "dog": 7, "eel": 2, "fox": 1}
    written = fx.write_image_folder(tmp_path, counts, size=20)
    tr = load_split(str(tmp_path), "train", 20, val_fraction=0.2)
    va = load_split(str(tmp_path), "val", 20, val_fraction=0.2)
    te = load_split(str(tmp_path), "test", 20, val_fraction=0.2)
    assert tr.classes == ["cat", "dog", "eel", "fox"]
    held = {0: 2, 1: 1, 2: 1}  # max(1, round(0.2 * n)); a 1-image class is never held out
    assert torch.bincount(va.labels, minlength=4).tolist() == [held[0], held[1], held[2], 0]
    assert torch.bincount(tr.labels, minlength=4).tolist() == [8, 6, 1, 1]
    assert torch.equal(va.images, te.images) and "held-out 20%" in va.source
    # disjoint, and together exactly the written images
    rows = lambda d: {bytes(x) for x in as_np(d.images).reshape(len(d), -1)}  # noqa: E731
    assert not rows(tr) & rows(va)
    everything = {bytes(a.transpose(2, 0, 1).reshape(-1)) for a in written.values()}
    assert rows(tr) | rows(va) == everything
    # deterministic (independent of any training seed)
    torch.manual_seed(123)
    again = load_split(str(tmp_path), "val", 20, val_fraction=0.2)
    assert torch.equal(again.images, va.images) and torch.equal(again.labels, va.labels)
    big = load_split(str(tmp_path), "train", 36)
    assert big.images.shape[1:] == (3, 36, 36)


def test_folder_split_layouts(tmp_path):
    fx.write_image_folder(tmp_path / "a" / "train", {"x": 3, "y": 4}, ext="jpg")
    fx.write_image_folder(tmp_path / "a" / "val", {"y": 2}, ext="jpg", seed=1)
    va = load_split(str(tmp_path / "a"), "val", 20)
    assert va.classes == ["x", "y"] and va.labels.tolist() == [1, 1]
    assert "(2 images, 1 of the 2 classes)" in va.source, va.source  # it said "2 classes", with no x in it
    te = load_split(str(tmp_path / "a"), "test", 20)  # no test folder: the val folder
    assert torch.equal(te.images, va.images) and "using val/" in te.source
    assert len(load_split(str(tmp_path / "a"), "train", 20)) == 7  # nothing held out

    fx.write_image_folder(tmp_path / "b" / "train", {"x": 3, "y": 3})
    fx.write_image_folder(tmp_path / "b" / "test", {"x": 1, "y": 1})
    va = load_split(str(tmp_path / "b"), "val", 20)  # no val folder: held out of train, not test/
    # 10% of 3 images a class rounds to one each: the line says what was taken (it said 10%)
    assert va.labels.tolist() == [0, 1] and "held-out 33.3% (2 of 6 images; 10% asked, rounded per class, at least " \
        "one each) of train" in va.source, va.source
    assert len(load_split(str(tmp_path / "b"), "train", 20)) == 4
    assert "'test' split, test/" in load_split(str(tmp_path / "b"), "test", 20).source

    fx.write_image_folder(tmp_path / "b" / "notes", {"stray": 1})  # ignored next to train/ + test/
    assert load_split(str(tmp_path / "b"), "test", 20).classes == ["x", "y"]

    fx.write_image_folder(tmp_path / "c" / "train", {"x": 3, "y": 3})
    fx.write_image_folder(tmp_path / "c" / "val", {"zebra": 1})
    with pytest.raises(DataError, match="zebra"):
        load_split(str(tmp_path / "c"), "val", 20)


def test_split_folders_named_in_capitals_and_a_stray_folder_beside_train(tmp_path):
    """Train/ and Val/ (as Kaggle names them) are the splits, not two classes; train/ with a
    folder beside it that is no split is refused (its classes would be 'notes' and 'train'),
    while a class that is named train (its images directly in it) stays a class."""
    fx.write_image_folder(tmp_path / "k" / "Train", {"x": 3, "y": 4}, ext="jpg")
    fx.write_image_folder(tmp_path / "k" / "Val", {"x": 1, "y": 2}, ext="jpg", seed=1)
    tr, va = load_split(str(tmp_path / "k"), "train", 20), load_split(str(tmp_path / "k"), "val", 20)
    assert tr.classes == ["x", "y"] and len(tr) == 7 and va.labels.tolist() == [0, 1, 1]

    fx.write_image_folder(tmp_path / "s" / "train", {"x": 3, "y": 3})
    fx.write_image_folder(tmp_path / "s" / "notes", {"stray": 1})
    with pytest.raises(DataError, match="looks like a training split, but notes beside it"):
        load_split(str(tmp_path / "s"), "train", 20)

    fx.write_image_folder(tmp_path / "v", {"train": 3, "bus": 3})  # vehicles: a class named train
    assert load_split(str(tmp_path / "v"), "train", 20).classes == ["bus", "train"]


def test_a_test_or_val_folder_of_class_folders_beside_classes_is_no_class(tmp_path):
    """root/cat/, root/dog/, root/test/{cat,dog}/ (no train/): test/ is a split, not a third
    class whose images are trained on under the label 'test'; for --split all too. A class
    named test (its images directly in it) stays a class, and val/ alone keeps its advice."""
    for name in ("test", "Validation"):
        root = tmp_path / name
        fx.write_image_folder(root, {"cat": 3, "dog": 3})
        fx.write_image_folder(root / name, {"cat": 2, "dog": 2}, seed=1)
        for split in ("train", "all"):
            with pytest.raises(DataError, match=f"looks like a {name.lower()} split, but .* has no train/"):
                load_split(str(root), split, 20)
        with pytest.raises(DataError, match="has no train/"):
            load_split(str(root), "train", 20, require_labels=False)
    fx.write_image_folder(tmp_path / "exam", {"test": 3, "quiz": 3})  # a class named test
    assert load_split(str(tmp_path / "exam"), "train", 20).classes == ["quiz", "test"]
    # classes named valid and invalid (or test), their images in sub-folders of their own: classes
    fx.write_image_folder(tmp_path / "parts", {"valid/2021": 3, "invalid/2021": 3, "test/batch1": 3})
    assert load_split(str(tmp_path / "parts"), "all", 20).classes == ["invalid", "test", "valid"]
    fx.write_image_folder(tmp_path / "only" / "val", {"cat": 2, "dog": 2})
    with pytest.raises(DataError, match="--split all"):
        load_split(str(tmp_path / "only"), "all", 20)


@pytest.mark.skipif(sys.platform != "linux", reason="names that are not UTF-8: a Linux file system keeps the bytes")
def test_class_folders_named_with_bytes_that_are_not_utf8(tmp_path):
    """A folder from a legacy archive named b'cl\\xe9' is the class 'cl\\ufffd': matplotlib,
    TensorBoard and ONNX cannot hold the name Python reads (a lone surrogate); two folders
    that would share a name are refused."""
    root = tmp_path / "legacy"
    fx.write_image_folder(root, {"a": 3, os.fsdecode(b"cl\xe9"): 3})
    data = load_split(str(root), "all", 20)
    assert data.classes == ["a", "cl\ufffd"] and sorted(data.labels.tolist()) == [0] * 3 + [1] * 3
    fx.write_image_folder(root, {os.fsdecode(b"cl\xe8"): 3})
    with pytest.raises(DataError, match="differ only in bytes that are not UTF-8"):
        load_split(str(root), "train", 20)


def test_unlabeled_folder(tmp_path):
    fx.write_unlabeled_folder(tmp_path, n=5)
    d = load_split(str(tmp_path), "train", 16, require_labels=False)
    assert d.classes == [] and d.labels.tolist() == [-1] * 4  # one image held out for val
    val = load_split(str(tmp_path), "val", 16, require_labels=False)
    assert val.labels.tolist() == [-1] and "(at random, seed 0)" in val.source  # no classes to stratify by
    with pytest.raises(DataError, match="no class sub-folders"):
        load_split(str(tmp_path), "train", 16)


def test_grey_rgba_palette_and_corrupt(tmp_path):
    grey = fx.write_grey_png(tmp_path / "train" / "a" / "grey.png")
    rgba = fx.write_rgba_png(tmp_path / "train" / "a" / "rgba.png")
    pal = fx.write_palette_png(tmp_path / "train" / "b" / "pal.png")
    fx.write_corrupt_jpeg(tmp_path / "train" / "b" / "zz_broken.jpg")
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image, silently ignored")
    (tmp_path / "train" / "b" / ".hidden.png").write_bytes(b"hidden files are ignored")
    fx.write_grey_png(tmp_path / "val" / "a" / "g.png", value=7)
    d = load_split(str(tmp_path), "train", 20)
    assert d.images.shape == (3, 3, 20, 20) and d.labels.tolist() == [0, 0, 1]
    assert d.skipped == [str((tmp_path / "train" / "b" / "zz_broken.jpg").resolve())]
    img = as_np(d.images)
    np.testing.assert_array_equal(img[0], np.stack([grey] * 3))  # "grey.png" sorts first
    np.testing.assert_array_equal(img[1], rgba[..., :3].transpose(2, 0, 1))
    np.testing.assert_array_equal(img[2], pal.transpose(2, 0, 1))
    v = load_split(str(tmp_path), "val", 36)
    assert v.images.shape == (1, 3, 36, 36) and bool((v.images == 7).all())


def test_a_16_bit_image_comes_down_to_8_bits_whatever_its_values(tmp_path):
    """A 16-bit grey PNG (or TIFF) is scaled by 255/65535 always: two near-identical dark images,
    one with a single pixel above 255, decode to the same 8-bit image."""
    from PIL import Image
    from mmlit_cli.data.decode import decode_one

    dark = np.full((20, 20), 200 * 257, np.uint16)  # 8-bit 200, as 16 bits
    brighter_corner = dark.copy()
    brighter_corner[0, 0] = 65535
    for name, pixels in (("dark.png", dark), ("corner.png", brighter_corner), ("dark.tif", dark)):
        Image.fromarray(pixels).save(tmp_path / name)
        assert decode_one(str(tmp_path / name), 20)[5, 5].tolist() == [200, 200, 200], name
    Image.fromarray(np.full((20, 20), 200, np.uint16)).save(tmp_path / "faint.png")
    assert decode_one(str(tmp_path / "faint.png"), 20)[5, 5].tolist() == [1, 1, 1]  # 200 of 65535, not of 255


def test_a_float_image_in_0_to_1_is_scaled_to_8_bits(tmp_path):
    """A mode-F TIFF holding [0, 1] decoded almost black (0.8 -> 1 of 255)."""
    from PIL import Image
    from mmlit_cli.data.decode import decode_one

    Image.fromarray(np.full((20, 20), 0.8, np.float32)).save(tmp_path / "unit.tif")
    assert decode_one(str(tmp_path / "unit.tif"), 20)[5, 5].tolist() == [204, 204, 204]
    Image.fromarray(np.full((20, 20), 200.0, np.float32)).save(tmp_path / "levels.tif")  # 0-255 floats: as they are
    assert decode_one(str(tmp_path / "levels.tif"), 20)[5, 5].tolist() == [200, 200, 200]


@pytest.mark.parametrize("ext", ["jpg", "png", "tif", "webp"])
def test_a_photo_stored_sideways_is_read_as_a_viewer_shows_it(tmp_path, ext):
    """A phone stores a portrait photo sideways with an EXIF Orientation tag: training, eval and
    predict read it upright, as a viewer shows it (it was read lying on its side). Pillow turns a
    TIFF itself (and drops the tag): that case checks it is not turned twice."""
    from PIL import Image
    from mmlit_cli.data.decode import decode_one, fit_image

    upright = np.zeros((24, 16, 3), np.uint8)  # portrait: red top, blue bottom
    upright[:12, :, 0] = upright[12:, :, 2] = 255
    Image.fromarray(upright).save(tmp_path / f"upright.{ext}")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": stored turned the other way
    sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    sideways.save(tmp_path / f"phone.{ext}", exif=exif.tobytes())
    sideways.save(tmp_path / f"untagged.{ext}")
    read = {name: decode_one(str(tmp_path / f"{name}.{ext}"), 16).astype(int)
            for name in ("upright", "phone", "untagged")}
    assert np.abs(read["phone"] - read["upright"]).mean() < 3  # JPEG/WebP rounding only
    assert np.abs(read["untagged"] - read["upright"]).mean() > 50  # without the tag: on its side, as stored
    with Image.open(tmp_path / f"phone.{ext}") as im:  # an opened image, as the API's preprocess takes it
        assert np.abs(fit_image(im, 16).astype(int) - read["upright"]).mean() < 3


def test_pillows_pixel_limit_counts_the_pixels_decoded_not_the_photos(tmp_path, monkeypatch):
    """A JPEG is decoded downscaled (libjpeg's draft), so a photo above Pillow's limit (a
    200-megapixel phone camera's) decodes, without Pillow's warning; a PNG, decoded whole,
    is still refused above twice the limit, and decodes quietly below it. Here the limit is
    lowered to 20,000 pixels (refused above 40,000) so that small files stand for big ones."""
    import warnings

    from PIL import Image

    from mmlit_cli.data.decode import decode_one, is_image_candidate

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (400, 480, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.jpg", quality=90)
    photo.save(tmp_path / "photo_no_extension", format="JPEG", quality=90)
    photo.save(tmp_path / "big.png")
    photo.resize((180, 150)).save(tmp_path / "mid.png")  # 27,000 pixels: above the limit, below twice it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    unlimited = decode_one(str(tmp_path / "photo.jpg"), 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jpeg = decode_one(str(tmp_path / "photo.jpg"), 32)
        mid = decode_one(str(tmp_path / "mid.png"), 32)
        big = decode_one(str(tmp_path / "big.png"), 32)
        candidate = is_image_candidate(str(tmp_path / "photo_no_extension"))
    assert jpeg is not None and np.array_equal(jpeg, unlimited)
    assert mid is not None and mid.shape == (32, 32, 3)
    assert big is None and candidate
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == 20_000  # Pillow's limit is as it was


def test_decoding_in_threads_leaves_pillows_limit_as_it_was(tmp_path):
    """`predict_paths` or `preprocess` called from several threads (a web service): two threads
    lifting Pillow's decompression-bomb limit at once left it off for the whole process, and a
    thread reading it while another had lifted it decoded a bomb."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from mmlit_cli.data.decode import decode_one

    limit = Image.MAX_IMAGE_PIXELS
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    paths = [str(p) for p in sorted(tmp_path.glob("*.png"))] * 150
    with ThreadPoolExecutor(8) as pool:
        decoded = list(pool.map(lambda p: decode_one(p, 16), paths))
    assert all(d is not None for d in decoded) and Image.MAX_IMAGE_PIXELS == limit


def test_class_lost_to_corrupt_files(tmp_path):
    fx.write_image_folder(tmp_path, {"ok": 2})
    fx.write_corrupt_jpeg(tmp_path / "broken" / "a.jpg")
    with pytest.raises(DataError, match="broken"):
        load_split(str(tmp_path), "train", 20)


def test_a_held_out_class_whose_one_file_does_not_decode_is_scored_on_none(tmp_path):
    """With few images a class, the one file held out for validation can be the broken one: the
    validation split then has none of that class (the file is skipped with the others), and
    training reads the rest. Only a training split that loses a class is an error."""
    from mmlit_cli.data.folders import folder_split

    fx.write_image_folder(tmp_path, {"cat": 10, "dog": 10})
    held_cat = [f for f, lab in zip(*(lambda p: (p.files, p.labels))(folder_split(tmp_path, "val", 0.1, True)))
                if lab == 0]
    assert len(held_cat) == 1
    fx.write_corrupt_jpeg(held_cat[0])
    val = load_split(str(tmp_path), "val", 20)
    assert val.labels.tolist() == [1] and val.skipped == held_cat and val.classes == ["cat", "dog"]
    train = load_split(str(tmp_path), "train", 20)
    assert torch.bincount(train.labels).tolist() == [9, 9] and train.skipped == []


def test_an_empty_split_is_an_error_not_a_score(tmp_path):
    """A dataset file with no rows (an empty CIFAR test batch) is refused: scored, it read as
    0 % of 1 image. An empty dataset name is not the current folder."""
    fx.write_cifar10_python(tmp_path, n_per_batch=4, n_test=0)
    with pytest.raises(DataError, match="the 'test' split has no images"):
        load_split("cifar10", "test", 32, data_dir=tmp_path)
    assert len(load_split("cifar10", "train", 32, data_dir=tmp_path)) > 0
    with pytest.raises(DataError, match="empty string"):
        load_split(" ", "train", 32)


def test_decode_pool_matches_inline(tmp_path, monkeypatch):
    shutil.copytree(D.SAMPLE_DIR / "val", tmp_path / "val")  # 200 real CIFAR-10 JPEGs, 10 classes
    fx.write_corrupt_jpeg(tmp_path / "val" / "cat" / "x.jpg")
    monkeypatch.setenv("MMLIT_DECODE_WORKERS", "1")
    inline = load_split(str(tmp_path / "val"), "train", 16, holdout=False)
    monkeypatch.setenv("MMLIT_DECODE_WORKERS", "2")
    pooled = load_split(str(tmp_path / "val"), "train", 16, holdout=False)
    assert torch.equal(inline.images, pooled.images) and inline.skipped == pooled.skipped
    assert len(inline.skipped) == 1 and len(inline) == 200


def test_the_bundled_sample_is_a_train_val_test_folder_of_real_cifar10():
    """`--dataset sample`: the package's own folder, whatever the data directory, in any
    spelling; its three splits are disjoint files, 100/20/20 per class, decoded like any folder."""
    splits = {s: load_split("sample", s, 32, data_dir="/nonexistent") for s in ("train", "val", "test")}
    assert load_split("Sample", "val", 32).images.equal(splits["val"].images)
    for name, per_class in (("train", 100), ("val", 20), ("test", 20)):
        data = splits[name]
        assert data.classes == fx.CIFAR10_CLASSES and data.images.shape == (10 * per_class, 3, 32, 32)
        assert torch.bincount(data.labels).tolist() == [per_class] * 10
        assert data.source.startswith(f"sample (bundled CIFAR-10 subset) '{name}' split")
    files = {s: {p.relative_to(D.SAMPLE_DIR / s) for p in (D.SAMPLE_DIR / s).rglob("*.jpg")} for s in splits}
    assert not (files["train"] & files["val"] or files["train"] & files["test"] or files["val"] & files["test"])
    # 32x32 JPEGs decoded at their own size: the pixels Pillow gives, not a resize
    from PIL import Image

    first = sorted((D.SAMPLE_DIR / "test" / "airplane").glob("*.jpg"))[0]
    assert np.array_equal(splits["test"].images[0].permute(1, 2, 0).numpy(), np.asarray(Image.open(first).convert("RGB")))
    paper = load_split("sample", "val", 32, holdout=False)  # --val test keeps the sample's own splits
    assert paper.images.equal(splits["val"].images)
    assert D.is_sample("SAMPLE") and not D.is_sample("./sample-images") and not D.is_sample(None)


# ------------------------------------------------------------------------------------ errors

def test_missing_dataset_message(tmp_path):
    with pytest.raises(DataError) as e:
        load_split("cifar10", "train", 32, data_dir=tmp_path)
    msg = str(e.value)
    assert f"{tmp_path}/cifar-10-batches-py/data_batch_1" in msg and "--download" in msg
    assert f"extract it into {tmp_path}" in msg and "\n" not in msg and "data_batch_3 and 3 more. " in msg
    for name in ("cifar100", "svhn", "flowers102", "fashion-mnist", "tiny-imagenet"):
        with pytest.raises(DataError, match=f"{name} not found: expected {tmp_path}"):
            load_split(name, "test", 32, data_dir=tmp_path)


def test_a_named_dataset_and_a_folder_mistaken_for_each_other_are_pointed_out(tmp_path, monkeypatch):
    """`--dataset cifar10` not found, with a ./cifar10 folder here: the error says how to read
    that folder. cifar-10-batches-py/ (or another named dataset's folder) given as an image
    folder: the error says which --dataset and --data-dir read it."""
    fx.write_image_folder(tmp_path / "cifar10", {"a": 2, "b": 2})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"cifar10 is also a folder here: --dataset \./cifar10 reads it as an image"):
        load_split("cifar10", "train", 32, data_dir=tmp_path / "elsewhere")
    w = fx.write_cifar10_python(tmp_path / "dl")
    with pytest.raises(DataError, match=f"holds cifar10's files: pass --dataset cifar10 --data-dir {w['dir']}$"):
        load_split(str(w["dir"]), "train", 32)
    assert len(load_split("cifar10", "test", 32, data_dir=w["dir"])) == 6  # and that reads it
    with pytest.raises(DataError, match=f"holds cifar10's files: pass --dataset cifar10 --data-dir {tmp_path / 'dl'}$"):
        load_split(str(tmp_path / "dl"), "train", 32)  # the folder above it, as torchvision lays it out
    assert len(load_split("cifar10", "test", 32, data_dir=tmp_path / "dl")) == 6
    fx.write_fashion_mnist(tmp_path / "fm", gz=True)
    with pytest.raises(DataError, match="holds fashion-mnist's files"):
        load_split(str(tmp_path / "fm"), "train", 28)
    fx.write_fashion_mnist(tmp_path / "tv" / "FashionMNIST" / "raw", gz=True)
    with pytest.raises(DataError, match=f"holds fashion-mnist's files: pass --dataset fashion-mnist --data-dir "
                                        f"{tmp_path / 'tv'}$"):
        load_split(str(tmp_path / "tv"), "train", 28)


def test_a_partly_missing_dataset_names_only_what_is_missing_and_how_to_fetch_it(tmp_path):
    """One file gone of three: the message names that one (it named every expected file), and
    says which commands download (eval takes no --download; the message used to tell it to)."""
    fx.write_tiny_imagenet(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError) as e:
        load_split("tiny-imagenet", "val", 32, data_dir=tmp_path)
    msg = str(e.value)
    assert "val_annotations.txt" in msg and "wnids.txt" not in msg
    assert msg.endswith("or pass --download to mmlit finetune or pretrain.")
    fx.write_fashion_mnist(tmp_path / "fm")
    gone = next((tmp_path / "fm").rglob("t10k-labels*"))
    gone.unlink()
    with pytest.raises(DataError) as e:
        load_split("fashion-mnist", "test", 32, data_dir=tmp_path / "fm")
    expected = str(e.value).split(". ")[0]  # before the how-to, which names a file as an example
    assert "t10k-labels-idx1-ubyte(.gz)" in expected and "t10k-images" not in expected


def test_tiny_imagenet_text_files_with_a_byte_order_mark_and_two_synsets_of_one_name(tmp_path):
    """wnids.txt, words.txt and val_annotations.txt saved with a BOM (as Windows editors do) read
    as without; two wnids whose words are the same text (ImageNet's two cranes) stay two names."""
    w = fx.write_tiny_imagenet(tmp_path)
    for name in ("wnids.txt", "words.txt", "val/val_annotations.txt"):
        path = w["dir"] / name
        path.write_text("\ufeff" + path.read_text(), encoding="utf-8")
    words = w["dir"] / "words.txt"
    words.write_text(words.read_text(encoding="utf-8").replace("European fire salamander", "goldfish, Carassius "
                                                                "auratus"), encoding="utf-8")
    val = load_split("tiny-imagenet", "val", 64, data_dir=tmp_path)
    assert val.labels.tolist() == w["val_labels"]
    assert val.classes == ["goldfish, Carassius auratus (n01443537)", "goldfish, Carassius auratus (n01629819)",
                           "tabby"]


def test_a_class_listed_twice_in_wnids_is_an_error(tmp_path):
    """It made a second class of that name with no image, and loaded the first one's images twice."""
    fx.write_tiny_imagenet(tmp_path, wnids=("n01443537", "n01629819", "n01443537"))
    with pytest.raises(DataError, match="wnids.txt lists n01443537 more than once"):
        load_split("tiny-imagenet", "train", 32, data_dir=tmp_path)


def test_unknown_name_and_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'imagenet21k'.*cifar10.*tiny-imagenet"):
        load_split("imagenet21k", "train", 32)
    with pytest.raises(DataError, match="does not exist"):
        load_split(str(tmp_path / "nope"), "train", 32)
    with pytest.raises(DataError, match="unknown split"):
        load_split("cifar10", "dev", 32, data_dir=tmp_path)
    with pytest.raises(DataError, match="val_fraction"):
        load_split(str(tmp_path), "val", 32, val_fraction=1.0)


def test_one_class_and_empty_folders(tmp_path):
    fx.write_image_folder(tmp_path / "one", {"only": 3})
    with pytest.raises(DataError, match="only one class folder"):
        load_split(str(tmp_path / "one"), "train", 20)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_split(str(tmp_path / "empty"), "train", 20)
    fx.write_image_folder(tmp_path / "hollow", {"a": 2})
    (tmp_path / "hollow" / "b").mkdir()
    with pytest.raises(DataError, match="has no images"):
        load_split(str(tmp_path / "hollow"), "train", 20)


def test_download_failure_is_a_data_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    from torchvision.datasets import utils as tvu

    def boom(*args, **kwargs):
        raise OSError("Network is unreachable\n(errno 101)")

    monkeypatch.setattr(tvd, "CIFAR10", boom)
    monkeypatch.setattr(tvu, "download_and_extract_archive", boom)
    with pytest.raises(DataError) as e:
        load_split("cifar10", "train", 32, data_dir=tmp_path / "dl", download=True)
    msg = str(e.value)
    assert "download failed" in msg and "Network is unreachable" in msg and "\n" not in msg
    assert "Put the files in by hand" in msg and str(tmp_path / "dl") in msg
    with pytest.raises(DataError, match="tiny-imagenet download failed.*tiny-imagenet-200.zip"):
        load_split("tiny-imagenet", "val", 32, data_dir=tmp_path / "dl", download=True)


# ------------------------------------------------------------------------------------ augmentation

@pytest.mark.parametrize("auto", ["trivial", "rand", "none"])
def test_train_transform(auto):
    aug = AugmentConfig(auto_augment=auto, random_erasing=1.0)
    t = D.build_train_transform(aug, 36)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 36, 36), dtype=torch.uint8)
    outs = [t(x) for _ in range(5)]
    assert all(y.shape == (3, 36, 36) and y.dtype == torch.uint8 for y in outs)
    assert all(not torch.equal(y, x) for y in outs)  # erasing at p=1 changes every draw
    assert len({y.numpy().tobytes() for y in outs}) == 5  # and every draw differently
    plain = D.build_train_transform(AugmentConfig(crop_padding=0, hflip=0, auto_augment="none",
                                                  random_erasing=0), 36)
    assert torch.equal(plain(x), x)


def test_each_augmentation_does_what_it_says():
    torch.manual_seed(1)
    x = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8)
    only = dict(crop_padding=0, hflip=0, auto_augment="none", random_erasing=0)
    flip = D.build_train_transform(AugmentConfig(**{**only, "hflip": 1.0}), 12)
    assert torch.equal(flip(x), x.flip(-1))
    crop = D.build_train_transform(AugmentConfig(**{**only, "crop_padding": 4}), 12)
    padded = torch.nn.functional.pad(x.float()[None], (4, 4, 4, 4), mode="reflect")[0].to(torch.uint8)
    windows = {padded[:, i:i + 12, j:j + 12].numpy().tobytes() for i in range(9) for j in range(9)}
    crops = [crop(x) for _ in range(20)]
    assert all(c.numpy().tobytes() in windows for c in crops)  # a 12x12 window of the padded image
    assert len({c.numpy().tobytes() for c in crops}) > 1  # at random places
    erase = D.build_train_transform(AugmentConfig(**{**only, "random_erasing": 1.0}), 12)
    for _ in range(10):
        changed = (erase(x) != x).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        box = torch.zeros_like(changed)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert not (changed & ~box).any()  # one box of noise, the rest untouched


def _distinct_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 images told apart by value range (image i lies in [10 i, 10 i + 1)), label i."""
    return torch.rand(8, 3, 12, 12) + 10 * torch.arange(8.0).view(8, 1, 1, 1), torch.arange(8)


def test_mixup_mixes_the_images_as_it_mixes_the_targets():
    torch.manual_seed(2)
    images, labels = _distinct_batch()
    mix = D.build_batch_mix(AugmentConfig(mixup_alpha=0.8, cutmix_alpha=0.0), 10)
    for _ in range(5):
        out, target = mix(images, labels)
        assert target.dtype == torch.float32 and target.shape == (8, 10)
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        assert (target[:, 8:] == 0).all()
        for i in range(8):
            others = target[i].clone()
            others[i] = 0
            j = int(others.argmax())  # the partner image (label j is image j)
            torch.testing.assert_close(out[i], target[i, i] * images[i] + target[i, j] * images[j], rtol=0, atol=1e-5)
        assert (target.max(1).values < 1 - 1e-4).all()  # every image is a blend


def test_cutmix_pastes_as_much_of_the_partner_as_the_target_says():
    torch.manual_seed(3)
    images, labels = _distinct_batch()
    mix = D.build_batch_mix(AugmentConfig(mixup_alpha=0.0, cutmix_alpha=1.0), 10)
    pasted = 0
    for _ in range(5):
        out, target = mix(images, labels)
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        for i in range(8):
            source = (out[i, 0] // 10).long()  # which image each pixel came from
            assert len(source.unique()) <= 2 and (source == i).any()
            for j in source.unique().tolist():
                where = source == j
                assert torch.equal(out[i][:, where], images[j][:, where])  # pixels copied, not blended
                assert target[i, j].item() == pytest.approx(where.float().mean().item(), abs=1e-6)
                pasted += j != i
    assert pasted > 0


def test_batch_mix_off_and_probability():
    images, labels = _distinct_batch()
    never = augment._BatchMix(lambda x, y: (_ for _ in ()).throw(AssertionError), 0.0, 10)
    out, target = never(images, labels)
    assert torch.equal(out, images) and torch.equal(target, torch.nn.functional.one_hot(labels, 10).float())
    assert D.build_batch_mix(AugmentConfig(mix_prob=0.0), 10) is None
    assert D.build_batch_mix(AugmentConfig(mixup_alpha=0, cutmix_alpha=0), 10) is None
    torch.manual_seed(4)
    half = D.build_batch_mix(AugmentConfig(mixup_alpha=0.8, cutmix_alpha=0.0, mix_prob=0.5), 10)
    mixed = [not torch.equal(half(images, labels)[0], images) for _ in range(40)]
    assert 8 < sum(mixed) < 32  # about half of the batches


def test_normalize():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(2, 3, 1, 2)
    y = D.normalize(x, (0.5, 0.5, 0.5), (0.5, 0.25, 1.0))
    assert y.dtype == torch.float32 and y.shape == (2, 3, 1, 2)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([-1.0, -2.0, -0.5]))
    assert torch.allclose(y[0, :, 0, 1], torch.tensor([1.0, 2.0, 0.5]))


# ------------------------------------------------------------------------------------ loaders

def _toy(n: int = 40) -> D.ImageData:
    images = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8)
    return D.ImageData(images, torch.arange(n) % 4, ["a", "b", "c", "d"], "toy", [])


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_loader_deterministic_shuffle_and_augmentation():
    data = _toy()
    t = D.build_train_transform(AugmentConfig(), 12)
    a = D.build_loader(data, 8, transform=t, shuffle=True, seed=1)
    b = D.build_loader(data, 8, transform=t, shuffle=True, seed=1)
    c = D.build_loader(data, 8, transform=t, shuffle=True, seed=2)
    xa, ya = _epoch(a)
    torch.manual_seed(999)  # the caller's RNG does not matter
    xb, yb = _epoch(b)
    assert xa.dtype == torch.uint8 and xa.shape == (40, 3, 12, 12) and ya.dtype == torch.int64
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(ya, _epoch(c)[1])
    assert sorted(ya.tolist()) == sorted(data.labels.tolist())
    xa1, ya1 = _epoch(a)  # a second pass without set_epoch advances to epoch 1
    D.set_epoch(b, 1)
    xb1, yb1 = _epoch(b)
    assert torch.equal(ya1, yb1) and torch.equal(xa1, xb1) and not torch.equal(ya1, ya)
    D.set_epoch(a, 0)
    assert torch.equal(_epoch(a)[0], xa)


def test_loader_plain_and_drop_last():
    data = _toy(10)
    loader = D.build_loader(data, 4, drop_last=True)
    x, y = _epoch(loader)
    assert torch.equal(x, data.images[:8]) and y.tolist() == data.labels[:8].tolist()


def test_loader_same_batches_with_workers():
    data = _toy(24)
    t = D.build_train_transform(AugmentConfig(), 12)
    inline = D.build_loader(data, 6, transform=t, shuffle=True, seed=5, workers=0)
    multi = D.build_loader(data, 6, transform=t, shuffle=True, seed=5, workers=2)
    assert multi.persistent_workers
    for epoch in (0, 1):
        D.set_epoch(inline, epoch)
        D.set_epoch(multi, epoch)
        x0, y0 = _epoch(inline)
        x2, y2 = _epoch(multi)
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    del multi


def test_loader_distributed(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = D.build_loader(_toy(20), 5, shuffle=True, seed=3, distributed=True)
        assert isinstance(loader.sampler.base, torch.utils.data.DistributedSampler)
        loader.sampler.set_epoch(0)
        y0 = _epoch(loader)[1]
        loader.sampler.set_epoch(1)
        y1 = _epoch(loader)[1]
        assert sorted(y0.tolist()) == sorted(y1.tolist()) and not torch.equal(y0, y1)
    finally:
        dist.destroy_process_group()
