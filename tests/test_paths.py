"""Paths as users type them, each command in a fresh process: `~` in `--opt=~/x` (which the
shell leaves alone), `--resume` given the run's last.safetensors (as YOLO takes it), and
folders whose class folders are links."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import TINY, write_folder

SETS = [x for o in TINY for x in ("--set", o)]


def mmlit(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=600)
    assert r.returncode == 0, (args, r.stderr[-2000:])
    return r


def test_a_tilde_in_any_path_option_is_the_home_folder(tmp_path):
    """`--out=~/runs/mine` used to make a folder named `~` in the working folder (and said
    "done: ~/runs/mine/..."), as did eval's --out, predict's --csv and export's --out."""
    home, cwd = tmp_path / "home", tmp_path / "work"
    cwd.mkdir()
    write_folder(home / "colours", per_class=8)
    mmlit("finetune", "--dataset=~/colours", "--out=~/runs/mine", "--epochs", "1", "--batch-size", "8", *SETS,
          cwd=cwd, home=home)
    run = home / "runs" / "mine"
    assert (run / "last.safetensors").is_file()
    mmlit("finetune", "--resume=~/runs/mine/last.safetensors", "--epochs", "2", cwd=cwd, home=home)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # the run's folder, from its checkpoint
    mmlit("eval", "~/runs/mine/best.safetensors", "--out=~/eval", cwd=cwd, home=home)
    mmlit("predict", "--csv=~/predictions.csv", "~/runs/mine/best.safetensors", "~/colours/red", cwd=cwd, home=home)
    mmlit("export", "~/runs/mine/best.safetensors", "--out=~/model.onnx", cwd=cwd, home=home)
    mmlit("plot", "~/runs/mine", cwd=cwd, home=home)
    assert (home / "eval" / "confusion.png").is_file()
    assert len((home / "predictions.csv").read_text().splitlines()) == 1 + 8
    assert (home / "model.onnx").is_file() and (run / "curves.png").is_file()
    assert list(cwd.iterdir()) == []  # no `~` folder, nothing else either


def test_predict_follows_linked_class_folders_as_training_does(tmp_path):
    """A folder whose class folders are links: `predict` used to skip them (and say nothing),
    where `finetune` and `eval` read them. A link back up the tree is walked once, not forever."""
    from mmlit_cli.data import load_split
    from mmlit_cli.files import walk_files

    real = write_folder(tmp_path / "real", per_class=4)
    linked = tmp_path / "linked"
    linked.mkdir()
    for c in ("red", "green"):
        (linked / c).symlink_to(real / c, target_is_directory=True)
    write_folder(linked, classes=("blue",), per_class=4)
    (linked / "blue" / "again").symlink_to(linked, target_is_directory=True)  # a loop
    files = walk_files(linked)
    assert [f.relative_to(linked).parts[0] for f in files] == ["blue"] * 4 + ["green"] * 4 + ["red"] * 4
    assert len(load_split(str(linked), "train", 12, holdout=False)) == 12  # what training reads: the same 12
    mmlit("finetune", "--dataset", str(real), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4",
          *SETS, cwd=tmp_path, home=tmp_path)
    r = mmlit("predict", str(tmp_path / "run" / "best.safetensors"), str(linked), "--json", cwd=tmp_path, home=tmp_path)
    assert r.stdout.count('"path"') == 12
