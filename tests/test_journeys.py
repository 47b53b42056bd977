"""User journeys: every command in the README, run the way a user runs it.

The commands are read from README.md itself: every line of a ```bash block, every `$ ` line
of a ```console block, and every inline `mmlit ...` / `torchrun ...` span that is a whole
command (no `...` and no UPPERCASE placeholder such as DIR). Each one runs as its own
process, exactly as written, in a folder laid out the way the README assumes (`./my-images`,
`cifar10-jpg/`, `pv/`, `mixed/`, `./data`) holding a few dozen tiny images in the real
formats. The one change: `--set` options that shrink the model (and, where a command gives
no `--epochs`, the preset's epoch count) are appended to the training commands.

`test_every_readme_command_is_a_journey` fails when the README gains a command that no
journey runs, or loses one that a journey runs: README and tests cannot drift apart.

What the user sees is checked against itself: eval's table = what predict's probabilities
give on the same images = what the exported ONNX file gives on the same decoded pixels;
eval's JSON = the validation row training logged for its best epoch; a run killed with
SIGKILL and resumed = the uninterrupted run; count-params' table = the README's.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps
from safetensors import safe_open

import datafixtures as fx
from helpers import TINY, cpu_as_linux_tells_it, tensorboard_events, write_folder
from test_card import CARD_COMMANDS
from test_fault_tolerance import README_TORCHRUN
from test_print_config import README_PRINT

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# ----------------------------------------------------------------------------- the README's commands

COUNT_TABLE = "mmlit count-params --preset xxs"
COUNT_JSON = "mmlit count-params --preset s --num-classes 100 --json"
FINETUNE = "mmlit finetune --preset xxs --dataset ./my-images --epochs 30 --out runs/mine"
EVAL_MINE = "mmlit eval runs/mine/best.safetensors --dataset ./my-images --json"
RESUME = "mmlit finetune --resume runs/mine"
PRETRAIN = "mmlit pretrain --preset xxs --dataset ./my-images --epochs 100 --out runs/mine-mae"
FINETUNE_INIT = ("mmlit finetune --preset xxs --dataset ./my-images --init runs/mine-mae/last.safetensors "
                 "--out runs/mine-ft")
C10 = "mmlit finetune --preset xxs --dataset cifar10-jpg --epochs 1 --out runs/c10-xxs"
EVAL_PV = "mmlit eval runs/c10-xxs/best.safetensors --dataset pv --split val --out ev"
PREDICT_MIXED = "mmlit predict runs/c10-xxs/best.safetensors mixed/ --top-k 3"
PREDICT_PV = "mmlit predict runs/c10-xxs/best.safetensors pv/val --top-k 10 --json"
EXPORT = "mmlit export runs/c10-xxs/best.safetensors --out c10-xxs.onnx"
EXPORT_INT8 = "mmlit export runs/c10-xxs/best.safetensors --int8"
PREDICT_INT8 = "mmlit predict runs/c10-xxs/best.int8.onnx photos/ --top-k 3"
BENCHMARK = "mmlit benchmark runs/c10-xxs/best.safetensors --dataset pv --split val"
PLOT = "mmlit plot runs/mine"
TORCHRUN = "torchrun --nproc_per_node 4 -m mmlit_cli finetune --preset s --dataset cifar100"
EVAL_LONG_TAIL = "mmlit eval runs/long-tail/best.safetensors"
LABELS = "mmlit finetune --preset xxs --dataset my-labels.csv --epochs 30 --out runs/from-csv"
LONG_TAIL = ("mmlit finetune --preset xxs --dataset ./long-tail --class-balance sampler --patience 10 --epochs 100 "
             "--out runs/long-tail")

# The Quick start's commands on the bundled sample run as written, in an empty folder: test_card.py;
# the torchrun lines of "Long and multi-machine runs", killed and restarted: test_fault_tolerance.py.
JOURNEY_COMMANDS = [COUNT_TABLE, COUNT_JSON, FINETUNE, EVAL_MINE, RESUME, PRETRAIN, FINETUNE_INIT, C10, EVAL_PV,
                    PREDICT_MIXED, PREDICT_PV, EXPORT, EXPORT_INT8, PREDICT_INT8, BENCHMARK, PLOT, TORCHRUN,
                    LABELS, LONG_TAIL, EVAL_LONG_TAIL, *CARD_COMMANDS, README_PRINT, *README_TORCHRUN]

SMALL = [x for o in TINY for x in ("--set", o)]  # a 3-block model on 12x12 images, no loader processes
APPENDED = {FINETUNE: SMALL, PRETRAIN: SMALL,
            C10: SMALL + ["--set", "finetune.batch_size=8"],  # 9 steps, not 1: a model that tells colours apart
            FINETUNE_INIT: SMALL + ["--set", "finetune.epochs=2"],  # not the preset's 300
            TORCHRUN: SMALL + ["--set", "finetune.epochs=1"],
            LABELS: SMALL, LONG_TAIL: SMALL}
S = 12  # the image size those options set

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def readme_commands(text: str | None = None) -> list[str]:
    """The README's commands, in order, each normalised to single spaces (comments dropped)."""
    text = README.read_text(encoding="utf-8") if text is None else text
    commands = []
    for lang, body in _FENCE.findall(text):
        for line in body.splitlines():
            if lang == "console":
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            elif lang not in ("bash", "sh"):
                break
            words = shlex.split(line, comments=True)
            if words and words[0] in ("mmlit", "torchrun"):
                commands.append(" ".join(words))
    for span in re.findall(r"`((?:mmlit|torchrun) [^`]*)`", _FENCE.sub("", text)):
        words = span.split()
        if len(words) > 2 and "..." not in span and not any(w.strip(".,;:").isupper() for w in words):
            commands.append(" ".join(words))
    return list(dict.fromkeys(commands))


def readme_output(command: str) -> list[str]:
    """The output the README shows under `$ command` in a console block."""
    for lang, body in _FENCE.findall(README.read_text(encoding="utf-8")):
        lines = body.splitlines()
        if lang == "console" and f"$ {command}" in lines:
            start = lines.index(f"$ {command}") + 1
            end = next((i for i in range(start, len(lines)) if lines[i].startswith("$ ")), len(lines))
            return lines[start:end]
    raise AssertionError(f"no console output for {command!r} in the README")


def readme_python_blocks() -> list[str]:
    return [body for lang, body in _FENCE.findall(README.read_text(encoding="utf-8")) if lang == "python"]


# ----------------------------------------------------------------------------- running them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def journey_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MMLIT_DATA", "MMLIT_DEBUG", "MMLIT_DECODE_WORKERS")}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),  # this checkout's mmlit
        OMP_NUM_THREADS="1",  # tiny models; four ranks of torchrun share two cores
        CUDA_VISIBLE_DEVICES="",  # --device auto means the CPU here, as the README's figures do
        COLUMNS="100",
        PET_MASTER_PORT=str(_free_port()),  # torchrun's --master-port, so parallel test runs do not collide
    )
    return env


class Home:
    """A folder to run README commands in; each command runs once, as its own process, and
    its result is kept for every test that looks at it. `in_background` runs a chain of
    commands one after the other beside the tests (the machine has two cores)."""

    def __init__(self, path: Path):
        self.path = path
        self.env = journey_env()
        self.results: dict[str, subprocess.CompletedProcess] = {}
        self.pending: dict[str, Future] = {}
        self.background = ThreadPoolExecutor(max_workers=1)

    def in_background(self, *commands: str) -> None:
        for command in commands:
            self.pending[command] = self.background.submit(self._run, command)

    def argv(self, command: str) -> list[str]:
        assert command in readme_commands(), f"not a README command any more: {command}"
        words = shlex.split(command)
        program = {"mmlit": [sys.executable, "-m", "mmlit_cli"],  # what the console scripts run
                   "torchrun": [sys.executable, "-m", "torch.distributed.run"]}[words[0]]
        return program + words[1:] + APPENDED.get(command, [])

    def _run(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(command), cwd=self.path, env=self.env, capture_output=True, text=True,
                              timeout=600)

    def run(self, command: str) -> subprocess.CompletedProcess:
        if command not in self.results:
            future = self.pending.pop(command, None)
            self.results[command] = future.result() if future is not None else self._run(command)
        return self.results[command]

    def ok(self, command: str) -> subprocess.CompletedProcess:
        r = self.run(command)
        assert r.returncode == 0, f"$ {command}\n(exit {r.returncode})\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The folders the README's commands name, with tiny data in the real formats."""
    root = tmp_path_factory.mktemp("journeys") / "home"
    write_folder(root / "my-images", size=S)  # red/, green/, blue/: 12 PNGs each, learnable colours
    rng = np.random.default_rng(4)
    write_colour_classes(root / "cifar10-jpg" / "train", 8, 32, "jpg", rng)  # the 10 CIFAR-10 classes
    write_colour_classes(root / "pv" / "train", 1, 32, "jpg", rng)
    write_colour_classes(root / "pv" / "val", 2, 16, "png", rng)  # not 12x12: predict and eval resize them
    write_colour_classes(root / "photos", 1, 20, "jpg", rng, flat=True)  # one photo per class, no class folders
    (root / "mixed").mkdir()
    for name in ("4950", "4954", "4961", "4978"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "mixed" / f"{name}.jpg")
    (root / "mixed" / "notes.txt").write_text("not an image\n")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "whole.jpg", quality=95)
    whole = (root / "whole.jpg").read_bytes()
    (root / "mixed" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "whole.jpg").unlink()
    fx.write_cifar100_python(root / "data", n_train=200, n_test=40)  # ./data is the default --data-dir
    write_label_file(root / "my-labels.csv", root / "my-images")
    write_folder(root / "long-tail", per_class=40, size=S)
    for name, count in {"green": 12, "blue": 4}.items():  # red keeps 40: largest / smallest = 10
        for extra in sorted((root / "long-tail" / name).iterdir())[count:]:
            extra.unlink()
    home = Home(root)
    home.in_background(PRETRAIN, FINETUNE_INIT, TORCHRUN)  # the three slowest, independent of the rest
    yield home
    home.background.shutdown(cancel_futures=True)


def write_label_file(csv_path: Path, images: Path) -> None:
    """A label file for the images of `images/<class>/`, the last two of each class marked
    `val`, the others `train`; paths relative to the file; the rows in no particular order."""
    rows = []
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        rows += [(f.relative_to(csv_path.parent).as_posix(), folder.name, "val" if i >= len(files) - 2 else "train")
                 for i, f in enumerate(files)]
    rows.sort(key=lambda row: row[0][::-1])
    csv_path.write_text("path,label,split\n" + "".join(",".join(row) + "\n" for row in rows))


PALETTE = [(r, g, b) for r in (40, 215) for g in (40, 215) for b in (40, 215)] + [(128, 128, 128), (200, 100, 30)]


def write_colour_classes(root: Path, per_class: int, size: int, ext: str, rng, flat: bool = False) -> None:
    """`root/<CIFAR-10 class>/NNN.<ext>` (flat: `root/<clas>N.<ext>`): each class a colour
    of its own, plus noise."""
    for colour, name in zip(PALETTE, fx.CIFAR10_CLASSES):
        folder = root if flat else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.array(colour) + rng.integers(-40, 41, (size, size, 3))
            file = f"{name[:4]}{i}.{ext}" if flat else f"{i:03d}.{ext}"  # flat: short names, one table line
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / file)


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def tensors(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("train_state/")}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100
        im.load()


# ----------------------------------------------------------------------------- the journeys


def test_every_readme_command_is_a_journey():
    assert sorted(readme_commands()) == sorted(JOURNEY_COMMANDS)
    # run by test_python_api_example_runs and test_python_loads_a_trained_model_as_predict_reads_it
    assert len(readme_python_blocks()) == 2


def test_the_readme_reader_finds_commands_and_skips_placeholders():
    text = "\n".join(["```bash", "pip install x", "mmlit a --b c   # note", "```", "```console", "$ mmlit d --e",
                      "mmlit output line", "```", "Prose `mmlit f --g h`, `mmlit plot RUN_DIR`, `mmlit --debug ...`,",
                      "`mmlit finetune` and `torchrun -m mmlit_cli x --y`."])
    assert readme_commands(text) == ["mmlit a --b c", "mmlit d --e", "mmlit f --g h", "torchrun -m mmlit_cli x --y"]


def test_count_params_prints_the_table_the_readme_shows(home):
    r = home.ok(COUNT_TABLE)
    # (a terminal centres the title line; piped output does not)
    assert [line.strip() for line in r.stdout.splitlines()] == [line.strip() for line in readme_output(COUNT_TABLE)]


def test_count_params_json_total_is_the_readme_figure_and_the_sum_of_its_parts(home):
    out = json.loads(home.ok(COUNT_JSON).stdout)
    stated = re.search(r"`total` = ([\d,]+)", README.read_text(encoding="utf-8")).group(1)
    assert out["total"] == int(stated.replace(",", "")) == 2_364_390
    assert sum(out["components"].values()) == out["total"]
    assert out["preset"] == "s" and out["num_classes"] == 100 and out["image_size"] == 36


def test_finetune_writes_the_run_directory(home):
    r = home.ok(FINETUNE)
    run = home.path / "runs" / "mine"
    assert "done: runs/mine/last.safetensors, runs/mine/best.safetensors, runs/mine/metrics.jsonl" in r.stdout
    assert "curves: runs/mine/curves.png" in r.stdout
    rows = jsonl(run / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == list(range(1, 31))
    assert all(math.isfinite(row["train_loss"]) and 0 <= row["val_top1"] <= 100 for row in rows)
    header, *lines = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    scalars = [k for k, v in rows[0].items() if not isinstance(v, (list, dict))]
    assert header == scalars and len(lines) == 30
    for row, line in zip(rows, lines):
        assert [str(row[k]) for k in header] == line  # the same numbers as metrics.jsonl
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["depth"] == 3 and config["model"]["num_classes"] == 3 and config["finetune"]["epochs"] == 30
    best = max(rows, key=lambda row: row["val_top1"])  # the first epoch with the highest val top-1
    info = json.loads(metadata(run / "best.safetensors")["info"])
    assert info["epoch"] == best["epoch"]
    assert json.loads(metadata(run / "last.safetensors")["info"])["epoch"] == 30
    assert json.loads(metadata(run / "best.safetensors")["classes"]) == ["blue", "green", "red"]
    assert_png(run / "curves.png")
    assert_events_are_the_metrics(run)


def assert_events_are_the_metrics(run: Path) -> None:
    """TensorBoard's reader finds every epoch's row of metrics.jsonl, once, at its epoch, and
    the figures: the confusion matrix each epoch, the curves, the config."""
    scalars, images, texts = tensorboard_events(run)
    rows = jsonl(run / "metrics.jsonl")
    for key, tag in [("train_loss", "train/loss"), ("val_top1", "val/top1"), ("val_top5", "val/top5"),
                     ("val_balanced_accuracy", "val/balanced_accuracy"), ("lr", "lr"),
                     ("train_img_per_s", "train/img_per_s")]:
        assert [step for step, _ in scalars[tag]] == [row["epoch"] for row in rows], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([row[key] for row in rows], rel=1e-6), tag
    layers = rows[-1]["expert_usage"]
    assert scalars[f"expert_usage/layer_{len(layers) - 1}/expert_0"][-1][1] == pytest.approx(layers[-1][0], rel=1e-6)
    assert images == {"val/confusion", "curves"} and "config/text_summary" in texts


def test_eval_json_scores_the_held_out_images_training_validated_on(home):
    home.ok(FINETUNE)
    ev = json.loads(home.ok(EVAL_MINE).stdout)
    assert set(ev) == {"top1", "top5", "loss", "balanced_accuracy", "macro_f1", "per_class", "precision", "recall",
                       "images", "num_images", "images_per_s", "skipped", "warnings"}
    assert ev["num_images"] == 3  # 10 % of each class of 12, held out
    assert list(ev["per_class"]) == ["blue", "green", "red"]
    assert ev["top1"] == pytest.approx(sum(ev["per_class"].values()) / 3, abs=1e-9)  # one image per class
    assert ev["top5"] == 100.0  # three classes
    best = max(jsonl(home.path / "runs" / "mine" / "metrics.jsonl"), key=lambda row: row["val_top1"])
    assert ev["top1"] == pytest.approx(best["val_top1"], abs=1e-9)
    assert ev["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert not (home.path / "runs" / "eval").exists()  # --json without --out writes no confusion.png


def test_finetune_killed_with_sigkill_then_resumed_ends_as_the_uninterrupted_run(home, tmp_path_factory):
    home.ok(FINETUNE)  # the uninterrupted run
    other = Home(tmp_path_factory.mktemp("killed") / "home")
    shutil.copytree(home.path / "my-images", other.path / "my-images")
    proc = subprocess.Popen(other.argv(FINETUNE), cwd=other.path, env=other.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = other.path / "runs" / "mine" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # two epochs done, 28 to go
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the run never finished two epochs"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    state = json.loads(metadata(other.path / "runs" / "mine" / "last.safetensors")["train_state"])
    assert 1 <= state["epoch"] < 30  # killed mid-run (metrics.jsonl may be an epoch ahead of the checkpoint)

    r = other.ok(RESUME)
    assert f"resuming runs/mine at epoch {state['epoch'] + 1}" in r.stdout
    a = jsonl(home.path / "runs" / "mine" / "metrics.jsonl")
    b = jsonl(metrics)
    assert [row["epoch"] for row in b] == list(range(1, 31))
    for ra, rb in zip(a, b):
        for key in ("step", "train_loss", "val_loss", "val_top1", "val_top5", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6), (ra["epoch"], key)
        assert sum(rb["expert_usage"], []) == pytest.approx(sum(ra["expert_usage"], []), rel=1e-6), ra["epoch"]
    wa = tensors(home.path / "runs" / "mine" / "last.safetensors")
    wb = tensors(other.path / "runs" / "mine" / "last.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k].numpy(), wa[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    assert_png(other.path / "runs" / "mine" / "curves.png")
    assert len(list((other.path / "runs" / "mine").glob("events.out.tfevents.*"))) == 2  # one per process
    assert_events_are_the_metrics(other.path / "runs" / "mine")  # an epoch the kill left unsaved shows once


def test_a_label_file_trains_as_its_rows_say(home):
    r = home.ok(LABELS)
    run = home.path / "runs" / "from-csv"
    assert "my-labels.csv 'train' split (30 images, 3 classes)" in r.stdout  # 36 rows, 6 marked val
    assert "my-labels.csv 'val' split (its rows) (6 images, 3 classes)" in r.stdout
    assert json.loads(metadata(run / "best.safetensors")["classes"]) == ["blue", "green", "red"]  # sorted labels
    rows = jsonl(run / "metrics.jsonl")
    assert len(rows) == 30 and rows[-1]["val_top1"] == 100.0  # the colours are learnt, scored on the 6 val rows


def test_long_tail_with_a_balanced_sampler_stops_when_val_top1_stops_improving(home):
    r = home.ok(LONG_TAIL)
    run = home.path / "runs" / "long-tail"
    assert "imbalanced classes" not in r.stdout  # the note is for runs that do nothing about it
    rows = jsonl(run / "metrics.jsonl")
    best = max(rows, key=lambda row: row["val_top1"])  # the first epoch with the best figure
    assert len(rows) == best["epoch"] + 10 < 100 and "stopped" in rows[-1]
    assert f"stopped early after epoch {len(rows)}" in r.stdout
    assert json.loads(metadata(run / "best.safetensors")["info"])["epoch"] == best["epoch"]
    assert all(0 <= row["val_balanced_accuracy"] <= 100 for row in rows)


def test_eval_of_imbalanced_classes_adds_balanced_accuracy_and_macro_f1(home):
    home.ok(LONG_TAIL)
    r = home.ok(EVAL_LONG_TAIL)
    recalls = [float(m.group(1)) for m in re.finditer(r"│ \w+\s+│\s+([\d.]+) % │\s+\d+ │", r.stdout)]
    shown = re.search(r"balanced accuracy ([\d.]+)%  macro-F1 ([\d.]+)%  \(the classes have (\d+) to (\d+) images",
                      r.stdout)
    assert shown and len(recalls) >= 2, r.stdout
    assert float(shown.group(1)) == pytest.approx(sum(recalls) / len(recalls), abs=0.06)  # the table's, rounded
    assert int(shown.group(3)) < int(shown.group(4))
    home.ok(C10)
    assert "balanced accuracy" not in home.ok(EVAL_PV).stdout  # 2 images per class: it would be top-1


def test_plot_draws_the_curves_again(home):
    """`mmlit plot runs/mine` draws curves.png anew from metrics.jsonl, over whatever file is
    there: the figure training drew, byte for byte, with its two panels side by side (loss;
    accuracy), each holding its curves (train and val loss; val top-1 and top-5) in
    matplotlib's first two line colours across the 30 epochs, not just in the legend."""
    home.ok(FINETUNE)
    curves = home.path / "runs" / "mine" / "curves.png"
    drawn = curves.read_bytes()  # by training, from the same metrics.jsonl
    Image.new("RGB", (200, 100), "white").save(curves)  # a stand-in that plot must replace
    r = home.ok(PLOT)
    assert r.stdout.strip() == "curves: runs/mine/curves.png"
    assert_png(curves)
    assert curves.read_bytes() == drawn
    with Image.open(curves) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    height, width, _ = pixels.shape
    assert width > 2 * height  # two panels of 5 x 4 inches side by side
    loss, accuracy = pixels[:, : width // 2], pixels[:, width // 2:]

    def drawn_in(panel, colour):  # pixels of a line colour (anti-aliased edges aside)
        return int((np.abs(panel - np.array(colour)).sum(-1) <= 30).sum())

    blue, orange = (31, 119, 180), (255, 127, 14)  # matplotlib's C0 and C1
    counts = {(name, colour): drawn_in(panel, rgb) for name, panel in (("loss", loss), ("accuracy", accuracy))
              for colour, rgb in (("blue", blue), ("orange", orange))}
    # a legend's sample lines take about 50 pixels each; a curve across 30 epochs, over 10 times that
    assert counts["loss", "blue"] > 400 and counts["loss", "orange"] > 400, counts  # train loss, val loss
    # val top-1 and top-5 (which may lie on top of top-1: 3 classes)
    assert counts["accuracy", "blue"] + counts["accuracy", "orange"] > 400, counts


def test_pretrain_then_finetune_from_its_encoder(home):
    r = home.ok(PRETRAIN)
    mae = home.path / "runs" / "mine-mae"
    rows = jsonl(mae / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == list(range(1, 101)) and all(math.isfinite(row["val_loss"]) for row in rows)
    assert "val_top1" not in rows[0]
    best = min(rows, key=lambda row: row["val_loss"])
    assert json.loads(metadata(mae / "best.safetensors")["info"])["epoch"] == best["epoch"]
    assert metadata(mae / "last.safetensors")["task"] == "mae"
    for name in ("config.yaml", "metrics.csv", "reconstruction.png", "curves.png"):
        assert (mae / name).is_file(), name
    assert_png(mae / "reconstruction.png")
    assert "reconstructions (rows: original, masked, reconstruction): runs/mine-mae/reconstruction.png" in r.stdout

    r = home.ok(FINETUNE_INIT)
    encoder = [k for k in tensors(mae / "last.safetensors") if k.startswith("encoder.")]
    loaded = re.search(r"--init runs/mine-mae/last.safetensors: loaded (\d+) tensors; skipped (\d+) \(.*\); "
                       r"new 2 \((head\.bias, head\.weight|head\.weight, head\.bias)\)", r.stdout)
    assert loaded, r.stdout
    assert int(loaded.group(1)) == len(encoder)  # the whole encoder, nothing else
    assert int(loaded.group(2)) == len(tensors(mae / "last.safetensors")) - len(encoder)  # the decoder
    ft = home.path / "runs" / "mine-ft"
    assert [row["epoch"] for row in jsonl(ft / "metrics.jsonl")] == [1, 2]
    assert metadata(ft / "best.safetensors")["task"] == "classify"
    classifier = {k[len("encoder."):] for k in encoder} | {"head.weight", "head.bias"}
    assert set(tensors(ft / "last.safetensors")) == classifier


def _predict_pv(home: Home) -> list[dict]:
    home.ok(C10)
    preds = json.loads(home.ok(PREDICT_PV).stdout)
    assert len(preds) == 20
    for p in preds:
        probs = [t["prob"] for t in p["top"]]
        assert sorted(t["label"] for t in p["top"]) == sorted(fx.CIFAR10_CLASSES)  # every class
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert Path(p["path"]).parts[:2] == ("pv", "val") and Path(p["path"]).parent.name in fx.CIFAR10_CLASSES
    return preds


def test_eval_table_is_what_predicts_probabilities_give_on_the_same_images(home):
    """eval's figures recomputed from predict's probabilities on the same 20 labelled images:
    top-1 from the argmax, top-5, the loss as the mean of -log p(true class), per class."""
    preds = _predict_pv(home)
    r = home.ok(EVAL_PV)
    assert r.stdout.splitlines()[0] == f"image folder {home.path / 'pv'} 'val' split, val/ (20 images, 10 classes)"
    assert re.fullmatch(r"image folder /\S+/pv 'val' split, val/ \(\d+ images, 10 classes\)", readme_output(EVAL_PV)[0])
    shown = re.search(r"top-1 ([\d.]+)%  top-5 ([\d.]+)%  loss ([\d.]+)  \((\d+) images, [\d,]+ img/s\)", r.stdout)
    assert shown, r.stdout
    table = dict(re.findall(r"│ (\w+)\s+│\s+([\d.]+) % │\s+2 │", r.stdout))
    assert sorted(table) == sorted(fx.CIFAR10_CLASSES)  # every class, two images each

    truth = [Path(p["path"]).parent.name for p in preds]
    ranked = [[t["label"] for t in p["top"]] for p in preds]
    prob_true = [next(t["prob"] for t in p["top"] if t["label"] == c) for p, c in zip(preds, truth)]
    top1 = 100 * np.mean([r_[0] == c for r_, c in zip(ranked, truth)])
    top5 = 100 * np.mean([c in r_[:5] for r_, c in zip(ranked, truth)])
    loss = -np.mean(np.log(prob_true))
    assert (float(shown.group(1)), float(shown.group(2)), int(shown.group(4))) == (round(top1, 2), round(top5, 2), 20)
    assert abs(float(shown.group(3)) - loss) <= 5e-5 + 1e-5  # printed to 4 decimals; predict's probs are float32
    for c in fx.CIFAR10_CLASSES:
        hits = [r_[0] == c for r_, t in zip(ranked, truth) if t == c]
        assert float(table[c]) == round(100 * np.mean(hits), 1), c
    assert r.stdout.rstrip().endswith("confusion matrix: ev/confusion.png")
    assert_png(home.path / "ev" / "confusion.png")


def test_exported_onnx_gives_predicts_probabilities_on_the_same_decoded_pixels(home):
    """The ONNX file, run with onnxruntime on pixels decoded the way its metadata says (RGB,
    shorter side to 12 with bilinear resampling, centre crop: Pillow's ImageOps.fit), gives
    the probabilities predict printed, within 1e-4 (the export's own logit tolerance)."""
    import onnx
    import onnxruntime as ort

    preds = _predict_pv(home)
    r = home.ok(EXPORT)
    wrote, checked = r.stdout.splitlines()
    size_mb = (home.path / "c10-xxs.onnx").stat().st_size / 1e6
    assert wrote == (f"wrote c10-xxs.onnx (fp32, {size_mb:.2f} MB; opset 18; input: images: uint8 [N, 3, {S}, {S}] RGB NCHW, 0-255, resized "
                     f"to {S}x{S} (shorter side, bilinear, centre crop); normalisation (x/255 - mean)/std is inside "
                     "the graph; output logits: float32 [N, num_classes])")
    diff = re.fullmatch(r"checked with onnxruntime [\d.]+: max \|onnx - torch\| = (\S+)", checked)
    assert diff and float(diff.group(1)) <= 1e-4
    path = home.path / "c10-xxs.onnx"
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    classes = json.loads(props["classes"])
    assert classes == sorted(fx.CIFAR10_CLASSES) and props["image_size"] == str(S)

    pixels = []
    for p in preds:
        with Image.open(home.path / p["path"]) as im:
            pixels.append(np.asarray(ImageOps.fit(im.convert("RGB"), (S, S), Image.Resampling.BILINEAR)))
    images = np.ascontiguousarray(np.stack(pixels).transpose(0, 3, 1, 2))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": images})[0].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for p, row in zip(preds, probs):
        for t in p["top"]:
            assert abs(t["prob"] - row[classes.index(t["label"])]) <= 1e-4, (p["path"], t["label"])
        first, second = np.sort(row)[-2:][::-1]
        if first - second > 2e-4:  # closer than the tolerance, the two may rank either way
            assert classes[int(row.argmax())] == p["top"][0]["label"]


INT8_WROTE = (r"wrote runs/c10-xxs/best\.int8\.onnx \(int8 dynamic, ([\d.]+) MB; opset 18; input: images: uint8 "
              r"\[N, 3, {s}, {s}\] RGB NCHW, .*")
INT8_CHECKED = (r"checked with onnxruntime [\d.]+ on 256 random images: top-1 agrees with PyTorch on ([\d.]+) %; "
                r"router agreement \(same top-k experts per token\) ([\d.]+) %")


def _photo_rows(stdout: str) -> dict[str, list[tuple[str, float]]]:
    rows = re.findall(r"│ (photos/\S+)\s+│ (.+?)\s*│", stdout)
    return {f: [(label, float(v)) for label, v in re.findall(r"(\w+) ([\d.]+)%", top)] for f, top in rows}


def test_int8_export_then_predict_on_the_file_gives_the_checkpoints_classes(home):
    """`export --int8` writes best.int8.onnx next to the checkpoint and checks it; predict runs
    that file on photos/ and names the class the checkpoint names for every photo; exporting
    again refuses and leaves the file as it was."""
    home.ok(C10)
    r = home.ok(EXPORT_INT8)
    wrote, checked = r.stdout.splitlines()
    size = re.fullmatch(INT8_WROTE.format(s=S), wrote)
    onnx_file = home.path / "runs" / "c10-xxs" / "best.int8.onnx"
    assert size and float(size.group(1)) == round(onnx_file.stat().st_size / 1e6, 2), wrote
    readme_wrote, readme_checked = readme_output(EXPORT_INT8)[:2]
    assert re.match(INT8_WROTE.format(s=36), readme_wrote) and re.fullmatch(INT8_CHECKED, readme_checked)
    agreement = re.fullmatch(INT8_CHECKED, checked)
    assert agreement and float(agreement.group(1)) >= 95.0, checked

    before = onnx_file.read_bytes()
    again = home._run(EXPORT_INT8)
    assert again.returncode != 0 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert onnx_file.read_bytes() == before

    r = home.ok(PREDICT_INT8)
    int8_rows = _photo_rows(r.stdout)
    torch_run = subprocess.run([sys.executable, "-m", "mmlit_cli", "predict", "runs/c10-xxs/best.safetensors",
                                "photos/", "--top-k", "3"], cwd=home.path, env=home.env, capture_output=True,
                               text=True, timeout=300)
    assert torch_run.returncode == 0, torch_run.stderr
    torch_rows = _photo_rows(torch_run.stdout)
    assert sorted(int8_rows) == sorted(f"photos/{c[:4]}0.jpg" for c in fx.CIFAR10_CLASSES)
    assert sorted(torch_rows) == sorted(int8_rows)
    for f, top in int8_rows.items():
        assert len(top) == 3 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert top[0][0] == torch_rows[f][0][0], f  # colour classes: no close calls for int8 to flip
        assert abs(top[0][1] - torch_rows[f][0][1]) <= 2.0, f


def test_benchmark_measures_every_format_on_the_images_eval_scores(home):
    """`mmlit benchmark` has a row per format; its PyTorch top-1 on pv/val is eval's top-1 on
    the same 20 images, the ONNX fp32 row agrees with PyTorch on every image, its MB are the
    checkpoint's weights and the files `mmlit export` writes, its latency ratios are those of
    its latency column, and its machine line names what /proc/cpuinfo, os and the installed
    packages name."""
    import onnxruntime
    import torch
    from safetensors.torch import save

    home.ok(C10)
    r = home.ok(BENCHMARK)
    text = " ".join(r.stdout.split())  # the title may wrap
    assert re.search(rf"image folder {re.escape(str(home.path / 'pv'))} 'val' split, val/ \(20 images, 10 classes\): "
                     r"20 images, 1 thread\(s\)", text), r.stdout
    assert re.search(r"image folder /\S+/pv 'val' split, val/ \(\d+ images, 10 classes\)", readme_output(BENCHMARK)[0])
    shown = re.search(r"machine: .*?, \d+ logical cores; torch \S+, onnxruntime \S+", text)
    assert shown, r.stdout
    rest = f", {os.cpu_count()} logical cores; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    assert shown.group().endswith(rest), (shown.group(), rest)
    linux = cpu_as_linux_tells_it()  # read here from /proc/cpuinfo, not with mmlit's cpu_info
    if linux is not None:  # e.g. "AMD EPYC (family 25 model 1, avx2)"
        cpu = f"{linux[0]} ({linux[1]})" if linux[1] else linux[0]
        assert shown.group() == " ".join(f"machine: {cpu}{rest}".split()), (shown.group(), cpu)
    rows = {label.strip(): [c.strip() for c in cells.split("│")]
            for label, cells in re.findall(r"│ (PyTorch eager|PyTorch compiled|ONNX fp32|ONNX int8 dynamic|"
                                           r"ONNX int8 static)\s*│(.+)│", r.stdout)}
    assert sorted(rows) == sorted(["PyTorch eager", "PyTorch compiled", "ONNX fp32", "ONNX int8 dynamic",
                                   "ONNX int8 static"]), r.stdout
    evaluated = re.search(r"top-1 ([\d.]+)%", home.ok(EVAL_PV).stdout)
    def mb(row): return float(row[0])
    def top1(row): return float(row[1])
    def agrees(row): return float(row[2])
    def latency(row): return float(row[4])
    def spread(row): return [float(v) for v in row[5].split("-")]
    eager = rows["PyTorch eager"]
    assert top1(eager) == float(evaluated.group(1)) and agrees(eager) == 100.0
    for label in ("PyTorch compiled", "ONNX fp32"):  # the same function: the same prediction on every image
        assert agrees(rows[label]) == 100.0 and top1(rows[label]) == top1(eager), label
    for label, row in rows.items():  # each of the 20 images predicted otherwise moves top-1 by 5 points at most
        assert abs(top1(row) - top1(eager)) <= 100.0 - agrees(row) + 1e-9, label

    # MB: PyTorch's = the checkpoint's weights as a safetensors file of their own (no metadata);
    # ONNX's = the file, as `mmlit export` writes it for the same checkpoint
    best = home.path / "runs" / "c10-xxs" / "best.safetensors"
    weights = len(save(tensors(best)))
    assert eager[0] == rows["PyTorch compiled"][0] == f"{weights / 1e6:.2f}"  # to the 0.01 MB shown
    home.ok(EXPORT)
    home.ok(EXPORT_INT8)
    assert rows["ONNX fp32"][0] == f"{(home.path / 'c10-xxs.onnx').stat().st_size / 1e6:.2f}"
    int8 = home.path / "runs" / "c10-xxs" / "best.int8.onnx"
    assert rows["ONNX int8 dynamic"][0] == f"{int8.stat().st_size / 1e6:.2f}"
    assert mb(rows["ONNX int8 dynamic"]) < mb(rows["ONNX fp32"])

    # latency: a median inside its p10-p90; the ratios line is the latency column's ratios
    for label, row in rows.items():
        p10, p90 = spread(row)
        assert 0 < p10 <= latency(row) <= p90, label
    ratios = dict(re.findall(r"([\w-]+ / [\w-]+): ([\d.]+)x", text.split("latency ratios ")[1].split(" latency:")[0]))
    names = {"fp32": "ONNX fp32", "pytorch-eager": "PyTorch eager", "int8-dynamic": "ONNX int8 dynamic",
             "int8-static": "ONNX int8 static"}
    assert sorted(ratios) == sorted(f"{k} / {b}" for k in ("int8-dynamic", "int8-static")
                                    for b in ("fp32", "pytorch-eager")), r.stdout
    for name, shown_ratio in ratios.items():
        k, b = (latency(rows[names[x]]) for x in name.split(" / "))
        low, high = (k - 0.005) / (b + 0.005), (k + 0.005) / (b - 0.005)  # the latencies are shown to 0.01 ms
        assert low - 0.005 <= float(shown_ratio) <= high + 0.005, (name, shown_ratio, k, b)


def test_predict_reports_unreadable_files_and_predicts_the_rest(home):
    home.ok(C10)
    r = home.run(PREDICT_MIXED)
    assert r.returncode == 1  # some files failed
    readme = readme_output(PREDICT_MIXED)
    failures = r.stderr.splitlines()
    assert failures[0] == readme[0] == "failed mixed/notes.txt: not an image Pillow can read"
    assert re.fullmatch(r"failed mixed/truncated\.jpg: cannot decode image \(OSError: .+\)", failures[1])
    assert re.fullmatch(r"failed mixed/truncated\.jpg: cannot decode image \(OSError: .+\)", readme[1])
    assert len(failures) == 2 and "Traceback" not in r.stderr
    assert re.search(r"^ *4 images, [\d,]+ img/s$", r.stdout, re.M)
    rows = re.findall(r"│ (mixed/\d+\.jpg) │ (.+?)\s*│", r.stdout)
    assert [f for f, _ in rows] == ["mixed/4950.jpg", "mixed/4954.jpg", "mixed/4961.jpg", "mixed/4978.jpg"]
    for _, top in rows:
        shown = re.findall(r"(\w+) ([\d.]+)%", top)
        assert len(shown) == 3 and all(label in fx.CIFAR10_CLASSES for label, _ in shown)
        assert [float(v) for _, v in shown] == sorted((float(v) for _, v in shown), reverse=True)


def test_torchrun_with_four_processes_writes_one_run(home):
    r = home.ok(TORCHRUN)
    assert (home.path / "runs" / "finetune").is_dir()
    assert sorted(p.name for p in (home.path / "runs" / "finetune").iterdir()) == ["s"]  # rank 0 alone writes
    run = home.path / "runs" / "finetune" / "s"
    rows = jsonl(run / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["world_size"] == 4 and math.isfinite(rows[0]["train_loss"])
    assert json.loads(metadata(run / "best.safetensors")["classes"]) == fx.CIFAR100_CLASSES
    for name in ("config.yaml", "metrics.csv", "last.safetensors", "curves.png"):
        assert (run / name).is_file(), name
    assert r.stdout.count("done: runs/finetune/s/last.safetensors") == 1


def readme_python_block(needle: str) -> str:
    (block,) = [b for b in readme_python_blocks() if needle in b]
    return block


def test_python_api_example_runs(home):
    block = readme_python_block("create_mae")
    shapes = "\nprint(tuple(logits.shape), tuple(loss.shape), tuple(pred.shape), tuple(mask.shape), int(mask[0].sum()))"
    r = subprocess.run([sys.executable, "-c", block + shapes], cwd=home.path, env=home.env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # 10 classes; a scalar loss; 144 patches of 3x3x3 pixels predicted, 75 % of them masked
    assert r.stdout.strip() == "(8, 10) () (8, 144, 27) (8, 144) 108"


def test_python_loads_a_trained_model_as_predict_reads_it(home):
    """The README's Python block on the README's checkpoint, in a fresh interpreter: its
    class names and probabilities for two photos are what `mmlit predict` gives for them."""
    home.ok(C10)
    block = readme_python_block("load_model")
    probs = "\nimport json; print(json.dumps(probs.tolist()))"
    r = subprocess.run([sys.executable, "-c", block + probs], cwd=home.path, env=home.env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    labels_line, first, probs_line = r.stdout.strip().splitlines()
    cli = subprocess.run([sys.executable, "-m", "mmlit_cli", "predict", "runs/c10-xxs/best.safetensors",
                          "photos/cat0.jpg", "photos/ship0.jpg", "--top-k", "10", "--json"], cwd=home.path,
                         env=home.env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    predicted = json.loads(cli.stdout)
    tops = [p["top"][0]["label"] for p in predicted]
    assert labels_line == f"{tops!r} (3, {S}, {S})"  # the image size of the journeys' runs
    for row, shown in zip(predicted, json.loads(probs_line)):
        by_label = {t["label"]: t["prob"] for t in row["top"]}
        assert all(math.isclose(by_label[c], v, abs_tol=1e-6) for c, v in zip(fx.CIFAR10_CLASSES, shown))
    assert first.startswith("{'path': 'photos/airp0.jpg', 'top': [{'label': ")
