"""`--resume DIR` keeps the run it continues: an option asking for another batch size, lr,
seed, recipe, class balance, --init or --out, or a --set asking for another value, is a
one-line error naming it (it used to be ignored without a word); the same values are
accepted; where the files are may change (another working folder, --data-dir). Each command
is a fresh process, as a user runs it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from datafixtures import write_cifar10_python
from helpers import TINY, write_folder

ROOT = Path(__file__).resolve().parents[1]
SETS = [x for o in TINY for x in ("--set", o)]


def mmlit(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "MMLIT_DATA"}
    full.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", **(env or {}))
    return subprocess.run([sys.executable, "-m", "mmlit_cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)


def snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A one-epoch run in `base/run`, trained on the folder `base/colours`, named relatively (batch 9:
    an lr of more than 3 significant digits)."""
    base = tmp_path_factory.mktemp("resume-options")
    write_folder(base / "colours", per_class=6)
    done = mmlit("finetune", "--preset", "xxs", "--dataset", "colours", "--epochs", "1", "--batch-size", "9",
                 "--seed", "5", "--out", "run", *SETS, cwd=base)
    assert done.returncode == 0, done.stderr
    return base


@pytest.mark.parametrize("option,value", [("--batch-size", "16"), ("--lr", "0.5"), ("--seed", "3"),
                                          ("--recipe", "paper"), ("--class-balance", "loss"),
                                          ("--init", "other/best.safetensors"), ("--out", "elsewhere")])
@pytest.mark.parametrize("print_config", [True, False])
def test_an_option_the_resumed_run_keeps_is_an_error_naming_it(trained, option, value, print_config):
    before = snapshot(trained / "run")
    asked = mmlit("finetune", "--resume", "run", "--epochs", "2", option, value,
                  *(["--print-config"] if print_config else []), cwd=trained)
    said = asked.stderr + asked.stdout
    assert asked.returncode == 2, said
    assert "Traceback" not in said and len(said.strip().splitlines()) == 1, said
    assert f"cannot change {option} {value} (the run's: " in said
    assert snapshot(trained / "run") == before
    assert not (trained / "elsewhere").exists()


def test_every_option_that_differs_is_named_in_the_one_line(trained):
    asked = mmlit("finetune", "--resume", "run", "--lr", "0.5", "--seed", "3", "--print-config", cwd=trained)
    assert asked.returncode == 2
    assert "--lr 0.5 (the run's: " in asked.stderr and "--seed 3 (the run's: 5)" in asked.stderr


def test_the_values_the_run_recorded_are_accepted(trained, tmp_path):
    """As a real run: the lr as the recipe line prints it (3 significant digits), the folder
    with a trailing slash."""
    shutil.copytree(trained / "run", tmp_path / "run")
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["finetune"]
    assert float(f"{recorded['lr']:.3g}") != recorded["lr"]  # batch 9: lr 0.000140625, printed 0.000141
    same = ("--batch-size", str(recorded["batch_size"]), "--lr", f"{recorded['lr']:.3g}", "--seed", "5",
            "--recipe", recorded["recipe"], "--class-balance", "none", "--out", "run/")
    resumed = mmlit("finetune", "--resume", "run", "--epochs", "2", *same, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["finetune"]["lr"] == recorded["lr"]


@pytest.mark.parametrize("asked,named", [(["model.depth=4"], "--set model.depth=4 (the run's: 3)"),
                                         (["finetune.seed=3"], "--set finetune.seed=3 (the run's: 5)"),
                                         (["finetune.lr=0.5"], "--set finetune.lr=0.5 (the run's: 0.000140625)")])
def test_a_set_that_asks_for_another_value_is_an_error_naming_it(trained, asked, named):
    before = snapshot(trained / "run")
    refused = mmlit("finetune", "--resume", "run", "--epochs", "2", *SETS, *[x for o in asked for x in ("--set", o)],
                    cwd=trained)
    said = refused.stderr + refused.stdout
    assert refused.returncode == 2 and len(said.strip().splitlines()) == 1 and "Traceback" not in said, said
    assert f"cannot change {named}" in said
    assert snapshot(trained / "run") == before


def test_the_first_command_with_resume_added_is_accepted(trained, tmp_path):
    """The command that started the run, its --set values and all, with --resume: those values
    are the run's, so they are accepted (they used to be refused whatever they said); a --set of
    the run's length changes it as --epochs does."""
    shutil.copytree(trained / "run", tmp_path / "run")
    lr = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["finetune"]["lr"]
    again = ("finetune", "--preset", "xxs", "--dataset", str(trained / "colours"), "--batch-size", "9", "--seed", "5", *SETS,
             "--set", f"finetune.lr={lr:.3g}", "--set", "finetune.epochs=2", "--resume", "run")
    shown = mmlit(*again, "--print-config", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["finetune"]["epochs"] == 2
    resumed = mmlit(*again, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows if "val_top1" in row] == [1, 2]
    # the new length is said, with what it changes and what it does not
    assert "note: 2 epochs, where the run had 1: the lr schedule is stretched to 2 epochs" in resumed.stdout
    assert "as the run started: recipe auto, fitted to 1 of 300 epochs" in resumed.stdout  # not as if it were now
    unknown = mmlit("finetune", "--resume", "run", "--set", "model.nope=1", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown key 'model.nope'" in unknown.stderr


def test_on_another_process_count_the_lr_is_the_one_the_resumed_run_uses(trained):
    """The lr follows the global batch to 2 processes; --lr is checked against that lr, not
    the recorded one, so an accepted --lr is never replaced behind the user's back."""
    recorded = yaml.safe_load((trained / "run" / "config.yaml").read_text())["finetune"]["lr"]
    env = dict(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")  # as torchrun sets them
    old = mmlit("finetune", "--resume", "run", "--lr", repr(recorded), "--print-config", cwd=trained, env=env)
    assert old.returncode == 2 and f"--resume on 2 process(es) cannot change --lr {recorded!r} (the run's: " \
        f"{2 * recorded:.6g})" in old.stderr, old.stderr
    doubled = mmlit("finetune", "--resume", "run", "--lr", repr(2 * recorded), "--print-config", cwd=trained, env=env)
    assert doubled.returncode == 0, doubled.stderr
    assert yaml.safe_load(doubled.stdout)["finetune"]["lr"] == pytest.approx(2 * recorded)


def test_a_resumed_run_whose_data_has_other_classes_is_refused(tmp_path):
    """A class folder renamed since the run started gave output 0 another class's meaning
    without a word (and last.safetensors other names than best); a class added was "internal
    error: IndexError: Target 3 is out of bounds". The run records its data's absolute path, so
    this test trains its own run on a folder it may change."""
    write_folder(tmp_path / "colours", per_class=6)
    done = mmlit("finetune", "--preset", "xxs", "--dataset", "colours", "--epochs", "1", "--out", "run", *SETS,
                 cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    colours, before = tmp_path / "colours", snapshot(tmp_path / "run")
    changes = {"'red' no longer in it; 'purple' new": lambda: (colours / "red").rename(colours / "purple"),
               "'yellow' new": lambda: shutil.copytree(colours / "red", colours / "yellow"),
               "'red' no longer in it": lambda: shutil.rmtree(colours / "red")}
    for said, change in changes.items():
        shutil.copytree(colours, tmp_path / "as-trained")
        change()
        asked = mmlit("finetune", "--resume", "run", "--epochs", "2", cwd=tmp_path)
        told = asked.stderr + asked.stdout
        assert asked.returncode == 2, told
        assert "Traceback" not in told and f"run was trained on other classes than its data now has ({said}): put " \
            "the data back as it was to resume, or start a new run (--init run/last.safetensors keeps the weights)" \
            in told, told
        assert snapshot(tmp_path / "run") == before  # nothing written: no event file, no checkpoint
        shutil.rmtree(colours)
        (tmp_path / "as-trained").rename(colours)
    resumed = mmlit("finetune", "--resume", "run", "--epochs", "2", cwd=tmp_path)  # the data as it was: it goes on
    assert resumed.returncode == 0, resumed.stderr


def test_a_batch_larger_than_the_data_is_fitted_down_and_the_same_command_resumes(tmp_path):
    """--batch-size 64 on 15 training images: the run's one step per epoch takes the 15, its lr
    follows 15 (not 64) and config.yaml says 15; the command that started it resumes it."""
    write_folder(tmp_path / "colours", per_class=6)
    command = ["finetune", "--preset", "xxs", "--dataset", "colours", "--batch-size", "64", "--out", "run", *SETS]
    done = mmlit(*command, "--epochs", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "batch 15 x 1 process(es) (64 asked -> 15, all the training images), lr 0.000234" in done.stdout, done.stdout
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["finetune"]
    assert recorded["batch_size"] == 15 and recorded["lr"] == pytest.approx(0.002 * 15 / 256 * 2)
    resumed = mmlit(*command, "--resume", "run", "--epochs", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    other = mmlit("finetune", "--resume", "run", "--batch-size", "32", "--epochs", "3", cwd=tmp_path)
    assert other.returncode == 2 and "cannot change --batch-size 32 (the run's: 15)" in other.stderr, other.stderr


def test_a_run_on_a_relative_folder_resumes_from_another_working_folder(trained, tmp_path):
    """The data is found where the run was trained, not looked up again from where the user stands."""
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    resumed = mmlit("finetune", "--resume", str(run), "--epochs", "2", cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows if "val_top1" in row] == [1, 2]
    named = mmlit("finetune", "--resume", str(run), "--dataset", str(trained / "colours"), "--print-config",
                  cwd=elsewhere)
    assert named.returncode == 0, named.stderr
    moved = mmlit("finetune", "--resume", str(run), "--data-dir", "x", "--print-config", cwd=elsewhere)
    assert moved.returncode == 2 and "--data-dir locates a named dataset" in moved.stderr


def test_a_named_dataset_that_moved_is_found_with_data_dir(tmp_path):
    write_cifar10_python(tmp_path / "first", n_per_batch=4, n_test=6)
    sets = [*SETS, "--set", "model.image_size=36", "--set", "data.val_fraction=0.2"]
    done = mmlit("finetune", "--preset", "xxs", "--dataset", "cifar10", "--data-dir", "first", "--epochs", "1",
                 "--batch-size", "8", "--out", "run", *sets, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (tmp_path / "first").rename(tmp_path / "moved")
    lost = mmlit("finetune", "--resume", "run", "--epochs", "2", cwd=tmp_path)
    assert lost.returncode == 2 and "Traceback" not in lost.stderr and len(lost.stderr.strip().splitlines()) == 1
    assert "if they have moved since the run began, pass --data-dir" in lost.stderr, lost.stderr
    found = mmlit("finetune", "--resume", "run", "--epochs", "2", "--data-dir", "moved", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    shown = mmlit("finetune", "--resume", "run", "--data-dir", "moved", "--print-config", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr


def test_the_same_command_again_finds_a_named_dataset_where_it_now_says(tmp_path, monkeypatch):
    """A requeued job whose data moved: the same command, its --data-dir (or $MMLIT_DATA) now
    elsewhere, continues the run from there."""
    from mmlit_cli.train import run_training

    write_cifar10_python(tmp_path / "first", n_per_batch=4, n_test=6)
    monkeypatch.chdir(tmp_path)
    kw = dict(out="run", overrides=[*TINY, "model.image_size=36", "data.val_fraction=0.2"], epochs=2, batch_size=8,
              device="cpu", quiet=True)
    stopped = run_training("finetune", "xxs", "cifar10", data_dir="first", max_steps=1, **kw)
    assert stopped["stopped"] == "max_steps"
    (tmp_path / "first").rename(tmp_path / "moved")
    monkeypatch.setenv("MMLIT_DATA", str(tmp_path / "moved"))
    assert run_training("finetune", "xxs", "cifar10", **kw)["epoch"] == 2


def test_a_checkpoint_from_before_absolute_paths_resumes_where_it_was_run(trained, tmp_path):
    """Runs older than the recorded absolute paths kept the dataset as given: it is read
    from the working folder, as before."""
    from mmlit_cli.checkpoint import load_checkpoint, save_checkpoint

    shutil.copytree(trained / "run", tmp_path / "run")
    shutil.copytree(trained / "colours", tmp_path / "colours")
    last = tmp_path / "run" / "last.safetensors"
    ckpt = load_checkpoint(last, with_train_state=True)
    del ckpt.info["dataset"]
    save_checkpoint(last, ckpt)
    resumed = mmlit("finetune", "--resume", "run", "--epochs", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "colours" in resumed.stdout and str(trained) not in resumed.stdout


def test_a_resumed_optimizer_runs_as_this_runs_device_wants_with_the_saved_moments():
    """A checkpoint from a CUDA run (fused AdamW) resumed on the CPU, or the other way round:
    torch's load_state_dict would keep the saved implementation flags; the run's own (from
    `build_adamw`) stay, and the moments and step counts are the checkpoint's."""
    import torch

    from mmlit_cli.train_state import optimizer_from_tensors, optimizer_to_tensors

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    saved = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}],
                              lr=1e-2, fused=True)  # as on CUDA (fused AdamW also runs on the CPU)
    for _ in range(2):
        sum((p ** 2).sum() for p in params).backward()
        saved.step()
    tensors, info = optimizer_to_tensors(saved)
    resumed = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}],
                                lr=1e-2, foreach=True)  # as on the CPU
    optimizer_from_tensors(resumed, tensors, info)
    for group in resumed.param_groups:
        assert group["foreach"] is True and not group["fused"]
    assert resumed.param_groups[1]["weight_decay"] == 0.0
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(resumed.state[p][key], saved.state[p][key])
