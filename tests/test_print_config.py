"""Printed = saved = run (issue 26): what `--print-config` prints is what a run saves in its
config.yaml, and the recipe line a run prints is what its optimizer and loader do."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from helpers import TINY, write_folder

ROOT = Path(__file__).resolve().parent.parent


def mmlit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MMLIT_DATA"}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "mmlit_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def comments(text: str) -> list[str]:
    return [line[2:] for line in text.splitlines() if line.startswith("# ")]


@pytest.mark.parametrize("kind,options", [("finetune", {"epochs": 3}), ("finetune", {"epochs": 2, "recipe": "paper"}),
                                          ("pretrain", {"epochs": 2})])
def test_print_config_is_the_config_the_run_saves_and_touches_nothing(tmp_path, monkeypatch, kind, options):
    from mmlit_cli.train import resolved_config, run_training

    data = write_folder(tmp_path / "data", per_class=12)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(home)
    printed = resolved_config(kind, "xxs", str(data), overrides=TINY, batch_size=8, **options)
    assert list(home.iterdir()) == []  # nothing written, not even a run directory
    head = comments(printed)
    assert head[0] == f"{data}: 33 training images, 3 classes (counted, not read)"  # 36 less 1 held out per class

    out = Console(record=True, width=400)
    run_training(kind, "xxs", str(data), out="run", overrides=TINY, batch_size=8, console=out, **options)
    saved = (home / "run" / "config.yaml").read_text()
    printed_cfg, saved_cfg = yaml.safe_load(printed), yaml.safe_load(saved)
    assert printed_cfg[kind].pop("loader") == "auto" and saved_cfg[kind].pop("loader") == "device"
    assert printed_cfg == saved_cfg  # the loader aside: the run chooses it once the data is loaded
    # the fitted recipe in words, as the run wrote it, and how to train that recipe again as it is
    assert head[1:] + ["to train with exactly this recipe again: --preset config.yaml --recipe paper"] == comments(saved)
    text = out.export_text()
    assert all(line.strip() in text for line in head[1:]), (head, text)  # and printed it


def test_the_printed_recipe_is_what_the_optimizer_and_the_loader_do(tmp_path, monkeypatch):
    """A real short run: its peak lr (with factors), warm-up steps and augmentation, as printed,
    read back from the optimizer at every step and from the loader's batch augmentation."""
    from mmlit_cli import engine
    from mmlit_cli.train import run_training

    data = write_folder(tmp_path / "data", per_class=24)  # 69 training images: 8 steps/epoch at batch 8
    lrs, loaders = [], []
    step = engine.Trainer._train_step

    def recorded(self, images, labels):
        loss = step(self, images, labels)
        lrs.append(self.optimizer.param_groups[-1]["lr"])
        loaders.append(self.train_loader)
        return loss

    monkeypatch.setattr(engine.Trainer, "_train_step", recorded)
    out = Console(record=True, width=400)
    run_training("finetune", "xxs", str(data), out=tmp_path / "run", overrides=TINY, epochs=4, batch_size=8,
                 console=out)
    text = out.export_text()
    line = next(x for x in text.splitlines() if x.startswith("  batch 8 x 1 process(es), lr "))
    lr, base, factor = re.search(r"lr ([\d.e-]+) \(lr_base ([\d.e-]+) x 8/256 x ([\d.]+) short-run factor\)",
                                 line).groups()
    assert float(lr) == pytest.approx(float(base) * 8 / 256 * float(factor), rel=1e-3)
    assert max(lrs) == pytest.approx(float(lr), rel=1e-3)  # the peak the optimizer reached
    warm_epochs, warm_steps, total = re.search(r"warm-up ([\d.]+) epochs = ([\d.]+) of (\d+) steps", line).groups()
    assert int(total) == len(lrs) == 4 * 8
    assert float(warm_steps) == pytest.approx(float(warm_epochs) * 8, abs=0.01)
    # a 4-epoch run is short (strength 0): the plain loop's one-cycle, from lr/25 up to the
    # peak at the end of the warm-up, then down to ~0
    assert "one-cycle (cosine up from lr/25, down to ~0; beta1 0.95-0.85)" in line
    w = round(float(warm_steps))
    assert w >= 2 and lrs[0] == pytest.approx(float(lr) / 25, rel=1e-3)
    assert all(lrs[i] < lrs[i + 1] for i in range(w - 1)) and lrs.index(max(lrs)) == w - 1
    assert all(lrs[i] > lrs[i + 1] for i in range(w - 1, len(lrs) - 1)) and lrs[-1] < float(lr) / 1e3
    augment = loaders[0].augment  # the run's batches come from the device, augmented there
    shown = line.split("; ", 1)[1]
    # at 4 epochs crop and flip are ramping in (padding 3, flip 0.378): the printed values are the loader's
    pad = re.search(r"crop pad (\d+)", shown)
    assert (int(pad.group(1)) if pad else 0) == augment.crop_padding
    flip = re.search(r"flip(?: p([\d.]+))?", shown)  # "flip" alone is the usual 0.5
    assert (0.0 if flip is None else float(flip.group(1) or 0.5)) == augment.hflip
    assert ("TrivialAugment" in shown) == (augment.auto_augment == "trivial" and augment.auto_augment_prob > 0)
    assert ("erasing" in shown) == (augment.random_erasing > 0)


README_PRINT = "mmlit finetune --preset xxs --dataset cifar10 --epochs 50 --print-config"  # the README's


def test_the_readme_s_print_config_needs_no_data(tmp_path):
    """As the README runs it, a process in an empty folder with no ./data: the recipe of a
    50-epoch CIFAR-10 run, fitted to the official 45,000 training images (50,000 less the
    hold-out)."""
    r = mmlit(*README_PRINT.split()[1:], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []
    head = comments(r.stdout)
    assert head[0] == "cifar10: 45,000 training images, 10 classes (counted, not read)"
    assert head[1] == "recipe auto, fitted to 50 of 300 epochs: regularisation x0.34"  # log(50/20) / log(300/20)
    # warm-up 0.3^(1-s) x (1/30)^s of the run (rule 3's ramp) = 7.13 epochs of 351 steps at batch 128
    assert "warm-up 7.13 epochs = 2,503 of 17,550 steps" in head[2]
    cfg = yaml.safe_load(r.stdout)
    assert cfg["model"]["num_classes"] == 10 and cfg["finetune"]["epochs"] == 50


def _settings(cfg: dict, epochs: int) -> dict[str, object]:
    """A fine-tuning config's settings, flat, as the walk compares them: the warm-up as its
    share of the run (the epochs change by construction), clipping as 1 / max norm (0: off),
    the lr per 256 images of the batch (rule 1 makes the lr follow the batch)."""
    r = dict(cfg["finetune"])
    flat = {f"augment.{k}": v for k, v in r.pop("augment").items()}
    flat |= {k: v for k, v in r.items() if k not in ("epochs", "warmup_epochs", "grad_clip", "lr")}
    flat["lr per 256 images"] = r["lr"] * 256 / r["batch_size"]
    flat["warmup share"] = r["warmup_epochs"] / epochs
    flat["warmup epochs"] = r["warmup_epochs"]
    flat["1 / grad_clip"] = 1 / r["grad_clip"] if r["grad_clip"] else 0.0
    flat["model.drop_path"] = cfg["model"]["drop_path"]
    return flat


@pytest.mark.parametrize("preset", ["xxs", "s"])
def test_walking_the_lengths_no_setting_jumps(preset):
    """`--print-config` at every length from 1 to 300 epochs of CIFAR-10 (what the library
    behind the flag returns; nothing is read): no setting that is not a number changes, and
    a number moves between neighbouring lengths E and E + 1 by at most 3 x log((E + 1) / E) /
    log 15 of its whole range (and only one way: up or down), the most the ramp's log scale warrants (strength s grows by
    log((E + 1) / E) / log 15; a geometric rule from a to b by a ln(a / b) / (a - b) times
    that at most: 2.5 for the warm-up's share, 0.3 -> 1/30, 1.4 for the lr), plus the rounding
    (a whole number such as RandAugment's magnitude moves by 1 at a time). The old switch
    between 2 and 3 epochs (crop, flip, schedule and decay moving all of their range) fails it.
    The batch follows the images seen (the batch rule): it may grow in proportion to the
    length, by batch / E (+ 1, rounding) from E to E + 1, and the lr is compared per 256
    images of it."""
    from mmlit_cli.config import load_config
    from mmlit_cli.train import resolved_config

    walk = {e: _settings(yaml.safe_load(resolved_config("finetune", preset, "cifar10", epochs=e)), e)
            for e in range(1, 301)}
    keys = walk[1].keys()
    for key in keys:
        values = [walk[e][key] for e in walk]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            assert all(v == values[0] for v in values), (key, sorted({str(v) for v in values}))
            continue
        span = max(values) - min(values)
        rounding = 1 if all(isinstance(v, int) for v in values) else 0.002  # whole numbers; 3 decimals
        for e in range(1, 300):
            allowed = 3 * math.log((e + 1) / e) / math.log(15) * span + rounding
            if key == "batch_size":  # images x epochs / 1,500: proportional to the length
                allowed = walk[e][key] / e + rounding
            assert abs(walk[e + 1][key] - walk[e][key]) <= allowed, (key, e, walk[e][key], walk[e + 1][key])
        if key != "warmup share":  # the share rises with a short run's steps, then falls with s
            assert values == sorted(values) or values == sorted(values, reverse=True), (key, values)
    # the walk covers the whole ramp: the short run's plain loop at 1 epoch, the preset at 300
    assert walk[1]["one_cycle_share"] == 1 and walk[300]["one_cycle_share"] == 0
    assert walk[1]["batch_size"] == 64 and walk[300]["batch_size"] == load_config(preset).finetune.batch_size
    preset_mixup = load_config(preset).finetune.augment.mixup_alpha
    assert walk[300]["augment.mixup_alpha"] == preset_mixup and walk[1]["augment.mixup_alpha"] == 0


def test_print_config_of_a_resumed_run_is_what_the_resumed_run_uses(tmp_path):
    """`--resume DIR --epochs/--workers/--patience --print-config`: the recorded config with
    those changes, as the resumed run then saves it; nothing in DIR is touched."""
    data = write_folder(tmp_path / "data", per_class=6)
    sets = [x for o in TINY for x in ("--set", o)]
    first = mmlit("finetune", "--preset", "xxs", "--dataset", str(data), "--epochs", "1", "--batch-size", "8",
                  "--out", "run", *sets, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    again = ("finetune", "--resume", "run", "--epochs", "2", "--workers", "1", "--patience", "3")
    shown = mmlit(*again, "--print-config", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before
    printed = yaml.safe_load(shown.stdout)["finetune"]
    assert (printed["epochs"], printed["workers"], printed["patience"]) == (2, 1, 3)
    assert comments(shown.stdout)[0] == "resumed from run: the config it recorded, as the resumed run would use it"

    resumed = mmlit(*again, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["finetune"] == printed

    wrong = mmlit("finetune", "--resume", "run", "--loader", "workers", "--print-config", cwd=tmp_path)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "a resumed run keeps it" in wrong.stderr + wrong.stdout


def test_print_config_with_an_out_says_what_the_run_would_do_with_it(tmp_path):
    """The same command again, its --out holding its run: the run would continue it, so the
    config printed is the one recorded there; another run there, or other files, are refused
    as the run refuses them; nothing in the folder is touched."""
    data = write_folder(tmp_path / "data", per_class=6)
    command = ("finetune", "--preset", "xxs", "--dataset", str(data), "--epochs", "1", "--batch-size", "8",
               *[x for o in TINY for x in ("--set", o)])
    first = mmlit(*command, "--out", "run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}

    shown = mmlit(*command, "--out", "run", "--print-config", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert comments(shown.stdout)[0] == "run holds this command's run: the config it recorded"
    assert yaml.safe_load(shown.stdout) == yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())

    other = mmlit(*command, "--set", "model.depth=2", "--out", "run", "--print-config", cwd=tmp_path)
    assert other.returncode == 2 and "holds another run" in other.stderr, other.stderr
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    taken = mmlit(*command, "--out", "notes", "--print-config", cwd=tmp_path)
    assert taken.returncode == 2 and "already exists and is not empty" in taken.stderr, taken.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_the_recipe_line_says_where_the_batch_came_from():
    """The batch is the preset's unless the GPU raised it or a short run shrank it; the recipe
    line says which (a batch the user set is theirs, and said plainly)."""
    from mmlit_cli.recipe import batch_origin
    from mmlit_cli.train import resolved_config

    assert batch_origin(128, 128, 128) == ""
    assert batch_origin(128, 128, 64) == "preset 128 -> 64 for a short run"
    assert batch_origin(128, 512, 512) == "preset 128 -> 512 on the GPU"
    assert batch_origin(128, 512, 90) == "preset 128 -> 512 on the GPU -> 90 for a short run"
    short = resolved_config("finetune", "xxs", None, epochs=4, device="cpu")
    assert "  batch 64 x 1 process(es) (preset 128 -> 64 for a short run), lr " in short
    pinned = resolved_config("finetune", "xxs", None, epochs=4, batch_size=64, device="cpu")
    assert "  batch 64 x 1 process(es), lr " in pinned
    # more than the sample's 1,000 training images: one step takes them all, and the lr follows
    # that batch (it followed the 2,000 asked, an lr twice too high, and said batch 2000)
    assert batch_origin(2000, 2000, 1000, every_image=True, given=True) == "2000 asked -> 1000, all the training images"
    larger = resolved_config("finetune", "xxs", None, epochs=4, batch_size=2000, device="cpu")
    assert "  batch 1000 x 1 process(es) (2000 asked -> 1000, all the training images), lr 0.0156 (lr_base 0.002 x " \
        "1000/256 x 2 short-run factor)" in larger, larger
    paper = resolved_config("finetune", "xxs", None, epochs=4, recipe="paper", device="cpu")
    assert "  batch 128 x 1 process(es), lr " in paper


def test_on_the_sample_a_length_the_users_own_preset_gives_stands(tmp_path):
    """Without --dataset (the bundled sample) a run is short unless its length is asked for:
    --epochs, --set, or now a user's own preset file that sets it. A run's config.yaml given
    back as --preset (as its own comment says to train with its recipe again) trained 4 epochs."""
    from mmlit_cli.train import resolved_config

    def epochs(preset, kind="finetune"):
        return yaml.safe_load(resolved_config(kind, str(preset), None, overrides=TINY))[kind]["epochs"]

    own = tmp_path / "mine.yaml"
    own.write_text("name: mine\nfinetune:\n  epochs: 7\npretrain:\n  epochs: 5\n")
    assert (epochs(own), epochs(own, "pretrain")) == (7, 5)
    (tmp_path / "partial.yaml").write_text("name: partial\nmodel:\n  depth: 3\n")  # no length: the sample's
    assert epochs("xxs") == epochs(tmp_path / "partial.yaml") == 4 and epochs("xxs", "pretrain") == 8


def test_under_the_paper_recipe_an_lr_off_the_rule_is_said_to_be_the_presets_own(tmp_path):
    """--recipe paper fits nothing, so an lr a preset file gives is used as it is: the recipe
    line called the difference from the linear rule a "short-run factor"."""
    from mmlit_cli.train import resolved_config

    own = tmp_path / "mine.yaml"
    own.write_text("name: mine\nfinetune:\n  lr: 0.01\n  recipe: paper\n")
    text = resolved_config("finetune", str(own), None, overrides=TINY, epochs=2, batch_size=8)
    assert yaml.safe_load(text)["finetune"]["lr"] == 0.01
    assert "lr 0.01 (as given)" in text and "short-run factor" not in text, comments(text)


def test_a_name_with_a_slash_is_a_label_where_out_names_the_folder(tmp_path):
    """The name makes the folder of a run without --out (runs/<command>/<name>), so there it must
    be a plain folder name; with --out it is only the run's label, as before."""
    from mmlit_cli.errors import MmlitError
    from mmlit_cli.train import resolved_config

    sets = TINY + ["name=team/exp1"]
    assert yaml.safe_load(resolved_config("finetune", "xxs", None, overrides=sets, out=str(tmp_path / "x")))[
        "name"] == "team/exp1"
    with pytest.raises(MmlitError, match="name must be a plain folder name"):
        resolved_config("finetune", "xxs", None, overrides=sets)


def test_an_option_and_a_set_of_one_value_agree(tmp_path):
    """`--lr 0.01 --set finetune.lr=1e-2` asks for one value (test_bad_input has two that differ)."""
    from mmlit_cli.train import resolved_config

    data = write_folder(tmp_path / "data", per_class=2)
    text = resolved_config("finetune", "xxs", str(data), overrides=[*TINY, "finetune.lr=1e-2", "finetune.epochs=3"],
                           lr=0.01, epochs=3)
    cfg = yaml.safe_load(text)
    assert cfg["finetune"]["lr"] == 0.01 and cfg["finetune"]["epochs"] == 3
