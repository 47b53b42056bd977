"""The card's commands, exactly as written, cold, in an empty folder (issue 25).

A new user runs `mmlit pretrain --preset xs`, `mmlit finetune --preset xxs`, then evaluates and
predicts with what they wrote, with no data and no network: each command runs as its own
process, with nothing appended, in an empty folder, at the preset's defaults (the CPU: CUDA is
hidden, as on the machine the README's figures come from). No `--dataset` means the sample
bundled with mmlit. The last test builds the wheel, installs it (not editable) and runs the
sample from that copy.
"""

from __future__ import annotations

import json
import re
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from helpers import TINY

from mmlit_cli.recipe import SAMPLE_EPOCHS

ROOT = Path(__file__).resolve().parent.parent

# The README's Quick start runs these, in this order (test_journeys checks that every README
# command is run by a test).
FINETUNE = "mmlit finetune --preset xxs"
EVAL = "mmlit eval runs/finetune/xxs/best.safetensors"
PREDICT = "mmlit predict runs/finetune/xxs/best.safetensors"
PRETRAIN = "mmlit pretrain --preset xs"
COUNT = "mmlit count-params --preset xxs"
CARD_COMMANDS = [FINETUNE, EVAL, PREDICT, PRETRAIN]
# Named on the card, not in the README: a named dataset that is not there.
EVAL_CIFAR100 = "mmlit eval runs/finetune/xxs/best.safetensors --dataset cifar100"

SAMPLE_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def card_env(pythonpath: str = str(ROOT)) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MMLIT_DATA", "MMLIT_DEBUG", "MMLIT_DECODE_WORKERS")}
    env.update(PYTHONPATH=pythonpath, CUDA_VISIBLE_DEVICES="", COLUMNS="100")
    return env


def run(command: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    assert words[0] == "mmlit"
    return subprocess.run([sys.executable, "-m", "mmlit_cli", *words[1:]], cwd=cwd, env=env or card_env(),
                          capture_output=True, text=True, timeout=600)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"$ {shlex.join(r.args)}\n(exit {r.returncode})\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    return r


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    """An empty folder in which the card's commands ran, one after the other; their results."""
    home = tmp_path_factory.mktemp("card") / "empty"
    home.mkdir()
    results = {}
    for command in CARD_COMMANDS + [COUNT, EVAL_CIFAR100]:
        results[command] = run(command, home)
    return home, results


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def info(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["info"])


def test_finetune_without_dataset_trains_on_the_bundled_sample_and_says_so(card):
    home, results = card
    out = ok(results[FINETUNE]).stdout
    first = out.splitlines()[0]
    assert first.startswith("no --dataset: training on the bundled sample") and "--dataset" in first[5:]
    assert "sample (bundled CIFAR-10 subset) 'train' split" in out and "(1000 images, 10 classes)" in out
    run_dir = home / "runs" / "finetune" / "xxs"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    n = SAMPLE_EPOCHS["finetune"]
    assert cfg["finetune"]["epochs"] == n == 4  # the sample's length
    # the batch rule: 1,000 images x 4 epochs / 1,500 = 2.7, so the floor, 64 (not the preset's
    # 128), and the loader runs it: 15 full batches an epoch (the partial last one is dropped)
    assert cfg["finetune"]["batch_size"] == 64 and "15 steps/epoch x 4 epochs, batch 64 x 1" in out
    assert f"{n} epochs" in first
    epochs = [m for m in jsonl(run_dir / "metrics.jsonl") if "val_top1" in m]
    assert [m["epoch"] for m in epochs] == list(range(1, n + 1))
    assert [m["step"] for m in epochs] == [15, 30, 45, 60]
    assert max(m["val_top1"] for m in epochs) > 15.0  # ten classes: above chance after 15 steps an epoch
    assert info(run_dir / "best.safetensors")["dataset"]["dataset"] == "sample"
    assert sorted(p.name for p in home.iterdir()) == ["runs"]  # no ./data, nothing downloaded


def test_eval_without_dataset_scores_the_split_training_validated_on(card):
    home, results = card
    r = ok(results[EVAL])
    assert r.stdout.splitlines()[0] == "no --dataset: using sample, the dataset best.safetensors was trained on"
    assert "sample (bundled CIFAR-10 subset) 'val' split" in r.stdout
    best = max((m for m in jsonl(home / "runs" / "finetune" / "xxs" / "metrics.jsonl") if "val_top1" in m),
               key=lambda m: m["val_top1"])
    assert f"top-1 {best['val_top1']:.2f}%" in r.stdout  # what training logged for the epoch it kept
    assert (home / "runs" / "eval" / "xxs" / "confusion.png").is_file()


def test_predict_without_images_predicts_one_sample_image_per_class(card):
    _, results = card
    r = ok(results[PREDICT])
    assert r.stderr.startswith("no images given: predicting one test image per class of the bundled sample")
    rows = [line for line in r.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 10
    assert [row.split("│")[1].strip().split("/")[0] for row in rows] == SAMPLE_CLASSES
    assert all("%" in row for row in rows)


def test_pretrain_without_dataset_pretrains_on_the_sample(card):
    home, results = card
    out = ok(results[PRETRAIN]).stdout
    n = SAMPLE_EPOCHS["pretrain"]
    assert out.startswith("no --dataset: training on the bundled sample") and f"{n} epochs" in out.splitlines()[0]
    run_dir = home / "runs" / "pretrain" / "xs"
    assert [m["epoch"] for m in jsonl(run_dir / "metrics.jsonl") if "val_loss" in m] == list(range(1, n + 1))
    with safe_open(str(run_dir / "last.safetensors"), "pt") as f:
        assert f.metadata()["task"] == "mae"


def readme_output(command: str) -> list[str]:
    """The lines the README's Quick start shows under `$ command`."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(f"$ {command}") + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(("$ ", "```")))
    return lines[start:end]


@pytest.mark.parametrize("command", CARD_COMMANDS)
def test_the_readme_shows_what_the_command_prints(card, command):
    """The lines that do not depend on timing or floating point are the README's, word for
    word (the sample's folder aside: it is wherever mmlit is installed)."""
    _, results = card
    r = ok(results[command])
    shown = readme_output(command)
    printed = (r.stderr + r.stdout).splitlines()
    folder = re.compile(r"\S*/mmlit_cli/sample")
    fixed = [line for line in printed  # not timings, figures, or table lines (their widths follow the figures)
             if not re.search(r"\d+ img/s|\d%|%  | loss \d", line) and not line.startswith(tuple("┏┃┡│├└"))]
    assert fixed, command
    for line in fixed:
        assert folder.sub("SAMPLE", line) in [folder.sub("SAMPLE", x) for x in shown], (command, line)


def test_count_params_runs_in_an_empty_folder(card):
    _, results = card
    assert "658,637" in ok(results[COUNT]).stdout


def test_a_named_dataset_that_is_not_there_is_still_a_one_line_error(card):
    home, results = card
    r = results[EVAL_CIFAR100]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cifar100 not found")
    assert f"extract it into {home / 'data'}" in lines[0]


def test_the_wheel_ships_the_sample_and_an_installed_copy_trains_on_it(tmp_path):
    """Build the wheel, install it (not editable) and run the sample from that copy alone."""
    # from a copy of the sources: a build/ folder left by an earlier build would ship its stale files
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "runs", ".venv*", "venv", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("mmlit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        sample = [i for i in z.infolist() if i.filename.startswith("mmlit_cli/sample/")]
    jpgs = [i.filename for i in sample if i.filename.endswith(".jpg")]
    assert len(jpgs) == 1400 and "mmlit_cli/sample/README.md" in {i.filename for i in sample}
    assert {p.split("/")[2] for p in jpgs} == {"train", "val", "test"}
    assert sum(i.compress_size + 30 + 46 + 2 * len(i.filename) for i in sample) <= 1.5e6  # its bytes in the wheel

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    home = tmp_path / "empty"
    home.mkdir()
    env = card_env(str(site))
    where = subprocess.run([sys.executable, "-c", "import mmlit_cli; print(mmlit_cli.__file__)"], cwd=home,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).parent == site / "mmlit_cli"  # the installed copy, not this checkout
    tiny = " ".join(f"--set {o}" for o in TINY)
    r = ok(run(f"mmlit finetune --preset xxs --epochs 1 {tiny}", home, env))
    assert f"bundled sample ({site / 'mmlit_cli' / 'sample'};" in r.stdout.splitlines()[0]
    r = ok(run("mmlit predict runs/finetune/xxs/best.safetensors --json", home, env))
    paths = [p["path"] for p in json.loads(r.stdout)]
    assert len(paths) == 10 and all(p.startswith(str(site / "mmlit_cli" / "sample" / "test")) for p in paths)


def test_eval_without_dataset_finds_the_run_s_data_from_any_folder(tmp_path, monkeypatch):
    """A checkpoint records its dataset with absolute paths: a relative image folder, and a
    named dataset in the default ./data, are found again from another working directory."""
    import datafixtures as fx
    from helpers import write_folder

    from mmlit_cli.errors import MmlitError
    from mmlit_cli.evaluate import evaluate_checkpoint
    from mmlit_cli.train import run_training

    (tmp_path / "a").mkdir()
    (tmp_path / "elsewhere").mkdir()
    write_folder(tmp_path / "a" / "imgs")
    fx.write_cifar10_python(tmp_path / "a" / "data", n_per_batch=8)
    monkeypatch.chdir(tmp_path / "a")
    for dataset in ("imgs", "cifar10"):
        run_training("finetune", "xxs", dataset, out=f"run-{dataset}", overrides=TINY, epochs=1, batch_size=8,
                     quiet=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    ckpt = tmp_path / "a" / "run-imgs" / "best.safetensors"
    found = evaluate_checkpoint(ckpt, None, device="cpu")
    given = evaluate_checkpoint(ckpt, str(tmp_path / "a" / "imgs"), device="cpu")
    assert found.dataset_note == f"no --dataset: using {tmp_path / 'a' / 'imgs'}, the dataset best.safetensors " \
                                 f"was trained on"
    assert found.source == given.source and found.result.top1 == given.result.top1 and given.dataset_note is None
    named = evaluate_checkpoint(tmp_path / "a" / "run-cifar10" / "best.safetensors", None, device="cpu")
    assert named.dataset_note.startswith(f"no --dataset: using cifar10 in {tmp_path / 'a' / 'data'}")
    assert named.result.num_images == 10  # the held-out part training validated on: one image per class

    bare = tmp_path / "bare.safetensors"  # a checkpoint written before checkpoints recorded their data
    from mmlit_cli.checkpoint import load_checkpoint, save_checkpoint
    old = load_checkpoint(ckpt)
    del old.info["dataset"]
    save_checkpoint(bare, old)
    with pytest.raises(MmlitError, match="--dataset is required: .* does not record the dataset"):
        evaluate_checkpoint(bare, None, device="cpu")
