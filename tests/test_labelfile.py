"""Label files (`--dataset labels.csv`): the same images as a folder give the same pixels,
labels and splits; every bad row is reported with its line number; the commands take them."""

from __future__ import annotations

import csv
import random
import shutil
from pathlib import Path

import pytest
import torch

import datafixtures as fx
from helpers import TINY

from mmlit_cli.data import SAMPLE_DIR, DataError, load_split, train_split_size


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def sample_rows(base: Path, with_split: bool) -> list[list[str]]:
    """One row per image of the bundled sample, paths relative to `base`, rows shuffled."""
    rows = []
    for split in ("train", "val", "test") if with_split else ("train",):
        for image in sorted((SAMPLE_DIR / split).rglob("*.jpg")):
            rel = Path("..") / "sample-copy" / image.relative_to(SAMPLE_DIR)
            rows.append([str(rel), image.parent.name] + ([split] if with_split else []))
    random.Random(0).shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    shutil.copytree(SAMPLE_DIR, root / "sample-copy")
    (root / "csv").mkdir()
    with_split = write_csv(root / "csv" / "split.csv", ["path", "label", "split"], sample_rows(root / "csv", True))
    plain = write_csv(root / "csv" / "plain.csv", ["Filename", "Label"], sample_rows(root / "csv", False))
    return root, with_split, plain


def assert_same(a, b) -> None:
    assert a.classes == b.classes and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_label_file_with_splits_is_the_folder_it_describes(tables, split):
    _, with_split, _ = tables
    from_csv = load_split(str(with_split), split, 32)
    assert_same(from_csv, load_split("sample", split, 32))
    assert from_csv.source.startswith(f"label file {with_split} '{split}' split")


@pytest.mark.parametrize("split", ["train", "val"])
def test_without_a_split_column_validation_is_held_out_as_for_a_folder(tables, split):
    root, _, plain = tables
    assert_same(load_split(str(plain), split, 32), load_split(str(root / "sample-copy" / "train"), split, 32))
    assert train_split_size(str(plain)) == (900, 10)  # counted for --print-config: 1,000 less 10 % per class


def test_split_all_is_every_image_of_a_folder_or_label_file(tables, tmp_path):
    """A test set of one's own (a folder of class folders, or a label file) could only be
    scored in part: 'val' is a held-out 10 % of it, 'train' the rest. `--split all` is all of it;
    where the data has splits of its own it says which to use."""
    root, with_split, plain = tables
    folder = root / "sample-copy" / "train"
    every = load_split(str(folder), "all", 32)
    assert len(every) == 1000 and every.source.startswith(f"image folder {folder} every image (--split all")
    assert_same(every, load_split(str(folder), "train", 32, holdout=False))
    assert len(load_split(str(plain), "all", 32)) == 1000 and len(load_split(str(with_split), "all", 32)) == 1400
    val_only = write_csv(root / "csv" / "val-only.csv", ["path", "label", "split"],
                         [r for r in sample_rows(root / "csv", True) if r[2] == "val"])  # no train row: scored
    assert len(load_split(str(val_only), "all", 32)) == 200
    with pytest.raises(DataError, match=r"has test/, train/, val/: --split all is every image of a folder of class "
                                        r"folders; pass --split test or val here"):
        load_split(str(root / "sample-copy"), "all", 32)
    with pytest.raises(DataError, match="--split all is every image of an image folder or a label file; cifar10 has "
                                        "splits of its own"):
        load_split("cifar10", "all", 32, data_dir=tmp_path)
    shutil.copytree(root / "sample-copy" / "val", tmp_path / "only-val" / "val")  # timm's val/<class>/ alone
    with pytest.raises(DataError, match=r"holds only a val/ folder, no train/: to score its images, pass --dataset "
                                        r".*only-val/val --split all"):
        load_split(str(tmp_path / "only-val"), "val", 32)


def test_the_paper_protocol_validates_on_the_test_rows(tables):
    _, with_split, plain = tables
    assert_same(load_split(str(with_split), "val", 32, holdout=False), load_split("sample", "val", 32))
    assert len(load_split(str(plain), "train", 32, holdout=False)) == 1000
    with pytest.raises(DataError, match="no row is in the val or test split"):
        load_split(str(plain), "val", 32, holdout=False)


def test_every_bad_row_is_reported_with_its_line_number(tmp_path):
    fx.write_image_folder(tmp_path / "img", {"a": 3, "b": 3}, ext="png")
    fx.write_corrupt_jpeg(tmp_path / "img" / "a" / "broken.jpg")
    fx.write_corrupt_jpeg(tmp_path / "img" / "a" / "0broken.jpg")  # first by path, last by line
    good = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "img").rglob("*.png"))
    rows = [[good[0], "a", "train"], [good[1], "a", "train"],
            ["img/a/missing.png", "a", "train"],  # line 4: no such file
            [good[2], "", "train"],  # line 5: empty label
            [good[3], "b", "dev"],  # line 6: unknown split
            ["", "b", "train"],  # line 7: no path
            [good[4], "b", "train"], [good[5], "b", "val"]]
    bad = write_csv(tmp_path / "bad.csv", ["image", "label", "split"], rows)
    with pytest.raises(DataError) as e:
        load_split(str(bad), "train", 16)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{bad}: 4 bad row(s): ")
    for needle in ("line 4: img/a/missing.png not found", "line 5: empty label",
                   "line 6: split 'dev' is not train, val or test", "line 7: no image path"):
        assert needle in message
    undecodable = write_csv(tmp_path / "undecodable.csv", ["file", "label"],
                            [[good[0], "a"], ["img/a/broken.jpg", "a"], [good[4], "b"], [good[5], "b"],
                             ["img/a/0broken.jpg", "a"]])
    with pytest.raises(DataError, match=r"2 bad row\(s\): line 3: img/a/broken.jpg does not decode as an image; "
                                        r"line 6: img/a/0broken.jpg does not"):
        load_split(str(undecodable), "train", 16, holdout=False)  # never skipped: the run would not say
    with pytest.raises(DataError, match="no image column in the header"):
        load_split(str(write_csv(tmp_path / "h.csv", ["picture", "label"], [[good[0], "a"]])), "train", 16)
    with pytest.raises(DataError, match="no 'label' column"):
        load_split(str(write_csv(tmp_path / "l.csv", ["path"], [[good[0]]])), "train", 16)
    unlabelled = load_split(str(tmp_path / "l.csv"), "train", 16, require_labels=False, holdout=False)
    assert unlabelled.classes == [] and unlabelled.labels.tolist() == [-1]  # pre-training needs no labels
    rows = write_csv(tmp_path / "u.csv", ["path"], [[good[0]], [good[1]], [good[4]]])
    held = load_split(str(rows), "val", 16, require_labels=False)  # no classes to stratify by
    assert held.labels.tolist() == [-1] and "held-out" in held.source and "(at random, seed 0)" in held.source


def test_a_row_or_header_the_reader_would_misread_is_named(tmp_path):
    """csv.DictReader keeps the last of two 'label' columns, drops a row's extra fields and calls a
    folder "not found": each is named instead (a label column given twice, an unquoted comma in a
    path) and nothing trains on a guess."""
    fx.write_image_folder(tmp_path / "img", {"a": 2, "b": 2}, ext="png")
    good = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "img").rglob("*.png"))
    twice = tmp_path / "twice.csv"
    twice.write_text("path,label,Label\n" + "".join(f"{g},{g[4]},x\n" for g in good))
    with pytest.raises(DataError, match=r"twice.csv: the header names 'label' more than once"):
        load_split(str(twice), "train", 16)
    notes = tmp_path / "notes.csv"  # a column mmlit does not read may repeat, and empty names too
    notes.write_text("path,label,note,note,,\n" + "".join(f"{g},{g[4]},x,y,,\n" for g in good))
    assert len(load_split(str(notes), "train", 16, holdout=False).labels) == len(good)
    rows = tmp_path / "rows.csv"
    extra = tmp_path / "img" / "a" / "extra.png"
    shutil.copy(tmp_path / good[0], extra)
    rows.write_text("path,label\n" + "".join(f"{g},{g[4]}\n" for g in good) + f"{good[0]},a,extra\n"
                    "img/a/extra.png,a,\n" + "img/a,a\n")  # line 7: an empty trailing field is no field
    with pytest.raises(DataError) as e:
        load_split(str(rows), "train", 16)
    assert str(e.value).endswith("2 bad row(s): line 6: 3 fields where the header has 2 (a path or label with a comma "
                                 "must be in double quotes); line 8: img/a is a folder, not an image file"), str(e.value)


def test_one_error_names_every_bad_row_of_every_split(tmp_path):
    """Missing files, empty labels and files that do not decode, in train and in val: one run
    names them all, whichever split it was loading, so the user mends the CSV once."""
    fx.write_image_folder(tmp_path / "img", {"a": 3, "b": 3}, ext="png")
    fx.write_corrupt_jpeg(tmp_path / "img" / "a" / "broken.jpg")
    fx.write_corrupt_jpeg(tmp_path / "img" / "b" / "broken.jpg")
    good = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "img").rglob("*.png"))
    rows = [[good[0], "a", "train"], ["img/a/broken.jpg", "a", "train"],  # line 3: train, does not decode
            [good[1], "a", "train"], [good[3], "b", "train"], [good[4], "b", "train"],
            ["img/b/broken.jpg", "b", "val"],  # line 7: val, does not decode
            [good[2], "a", "val"], ["img/a/gone.png", "a", "train"],  # line 9: no such file
            [good[5], "", "val"]]  # line 10: empty label
    table = write_csv(tmp_path / "t.csv", ["path", "label", "split"], rows)
    every = [f"{table}: 4 bad row(s): line 3: img/a/broken.jpg does not decode as an image; line 7: "
             f"img/b/broken.jpg does not decode as an image; line 9: img/a/gone.png not found; line 10: empty label"]
    for split in ("train", "val"):
        with pytest.raises(DataError) as e:
            load_split(str(table), split, 16)
        assert [str(e.value)] == every
    del rows[7:]  # the rows that are bad before decoding: the files that do not decode are still named
    with pytest.raises(DataError) as e:
        load_split(str(write_csv(tmp_path / "d.csv", ["path", "label", "split"], rows)), "val", 16)
    assert str(e.value).endswith("2 bad row(s): line 3: img/a/broken.jpg does not decode as an image; line 7: "
                                 "img/b/broken.jpg does not decode as an image")


def test_a_file_listed_twice_is_a_bad_row_and_valid_is_val(tmp_path):
    """A file on two rows could be in train and val, or have two labels: the second row is a bad
    row, however its path is written. `valid` and `validation` name the val split, as folders do."""
    fx.write_image_folder(tmp_path / "img", {"a": 3, "b": 3}, ext="png")
    good = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "img").rglob("*.png"))
    rows = [[g, g.split("/")[1], "train"] for g in good]
    twice = rows + [[good[0], "a", "val"], ["./" + good[1].replace("/a/", "/b/../a/"), "b", "train"]]
    with pytest.raises(DataError) as e:
        load_split(str(write_csv(tmp_path / "twice.csv", ["path", "label", "split"], twice)), "train", 16)
    assert str(e.value).endswith(f"2 bad row(s): line 8: {good[0]} is listed again (first on line 2); line 9: "
                                 f"./img/b/../a/{good[1].split('/')[-1]} is listed again (first on line 3)")
    rows[2][2], rows[5][2] = "valid", "Validation"
    val = load_split(str(write_csv(tmp_path / "valid.csv", ["path", "label", "split"], rows)), "val", 16)
    assert val.labels.tolist() == [0, 1] and "'val' split" in val.source


def test_finetune_eval_and_print_config_take_a_label_file(tables, tmp_path):
    from mmlit_cli.evaluate import evaluate_checkpoint
    from mmlit_cli.train import resolved_config, run_training

    _, with_split, _ = tables
    run_training("finetune", "xxs", str(with_split), out=tmp_path / "run", overrides=TINY, epochs=1,
                 batch_size=50, quiet=True)
    report = evaluate_checkpoint(tmp_path / "run" / "best.safetensors", None, "test", device="cpu")
    same = evaluate_checkpoint(tmp_path / "run" / "best.safetensors", "sample", "test", device="cpu")
    assert report.result.num_images == 200 and report.result.top1 == same.result.top1
    assert resolved_config("finetune", "xxs", str(with_split)).startswith(
        f"# {with_split}: 1,000 training images, 10 classes (counted, not read)")
