"""Bad input, everywhere: one line on stderr, a non-zero exit code, no traceback, and nothing
that existed before changed."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmlit_cli import cli
from mmlit_cli.checkpoint import load_checkpoint, save_checkpoint
from mmlit_cli.train import run_training
from helpers import TINY, write_folder

SETS = [x for o in TINY for x in ("--set", o)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    w = {"root": root, "folder": write_folder(root / "colours", per_class=6)}
    run_training("finetune", "xxs", str(w["folder"]), out=root / "clf", overrides=TINY, epochs=1, batch_size=8,
                 quiet=True)
    run_training("pretrain", "xxs", str(w["folder"]), out=root / "mae", overrides=TINY, epochs=1, batch_size=8,
                 quiet=True)
    even = TINY + ["model.mlp_hidden_last=16", "model.expert_stages=[3]"]  # blocks alike: a depth apart, same shapes
    run_training("pretrain", "xxs", str(w["folder"]), out=root / "mae-even", overrides=even, epochs=1, batch_size=8,
                 quiet=True)
    gone = write_folder(root / "gone", per_class=6)  # trained on, then deleted: eval without --dataset
    run_training("finetune", "xxs", str(gone), out=root / "moved", overrides=TINY, epochs=1, batch_size=8,
                 quiet=True)
    shutil.rmtree(gone)
    old = load_checkpoint(root / "clf" / "best.safetensors")  # as written before checkpoints recorded their data
    del old.info["dataset"]
    save_checkpoint(root / "old.safetensors", old)
    odd = load_checkpoint(root / "clf" / "best.safetensors")  # metadata edited by hand
    odd.info["epoch"] = "abc"
    save_checkpoint(root / "odd-epoch.safetensors", odd)
    nan = load_checkpoint(root / "clf" / "best.safetensors")
    next(v for v in nan.tensors.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    save_checkpoint(root / "nan.safetensors", nan)
    (root / "empty").mkdir()
    write_folder(root / "oneclass", classes=("only",), per_class=4)
    write_folder(root / "singles", classes=("a", "b"), per_class=1)
    write_folder(root / "twoclass", classes=("a", "b"), per_class=4)
    (root / "notes.safetensors").write_text("just some text, not a checkpoint")
    good = (root / "clf" / "last.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (root / "notyaml.yaml").write_text("model: [unclosed\n")
    (root / "xxs.yaml").write_text("name: xxs\nmodel:\n  top_k: 1\n")  # named as the run's preset, another model
    (root / "copy").mkdir()
    shutil.copy(Path(cli.__file__).parent / "presets" / "xxs.yaml", root / "copy" / "xxs.yaml")
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(root / "foreign.safetensors"), metadata={"framework": "someone-else"})
    save_file({"w": torch.zeros(2)}, str(root / "forged.safetensors"),
              metadata={"format": "mmlit-checkpoint/1", "task": "classify", "config": "{not json",
                        "classes": "[]", "info": "{}"})
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "taken").mkdir()
    (root / "taken" / "precious.txt").write_text("keep me")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x13\x37" * 50)
    rows = [f"colours/{c}/{c}_{i:03d}.png,{c},{'val' if i < 2 else 'train'}" for c in ("red", "green", "blue")
            for i in range(6)]
    rows[1:1] = ["gone.png,red,train", "broken.jpg,red,val"]  # lines 3 and 4: one before decoding, one after
    (root / "bad-rows.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    (root / "one-class.csv").write_text("path,label\n" + "".join(f"colours/red/red_{i:03d}.png,red\n" for i in range(6)))
    (root / "val-only-class.csv").write_text("path,label,split\n" + "".join(
        f"colours/{c}/{c}_{i:03d}.png,{c},{'val' if c == 'blue' or i < 2 else 'train'}\n"
        for c in ("red", "green", "blue") for i in range(6)))
    (root / "model.onnx").write_bytes(b"\x08\x07an onnx file, as far as eval can tell")
    (root / "dup.yaml").write_text("name: dup\nmodel:\n  depth: 9\n  embed_dim: 36\n  depth: 4\n")
    return w


def snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p)] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[str(p)] = "dir"
    return out


def no_write_dir(root: Path) -> str:
    if os.geteuid() == 0:  # root ignores permission bits; sysfs refuses new directories even to root
        return "/sys/mmlit-no-write/run"
    locked = root / "locked"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o500)
    return str(locked / "run")


CASES = [
    # (id, argv builder, expected text in the one-line message)
    ("missing data dir", lambda w: ["finetune", "--dataset", "cifar10", "--data-dir", str(w["root"] / "nope"), *SETS], "cifar10"),
    ("empty data folder", lambda w: ["finetune", "--dataset", str(w["root"] / "empty"), *SETS], "empty"),
    ("one image per class", lambda w: ["finetune", "--dataset", str(w["root"] / "singles"), *SETS, "--out", str(w["root"] / "never10")],
     "singles: too few images to hold out a validation split (a class needs at least 2 images): add images, or give the folder validation images of its own ("),
    ("one-class folder", lambda w: ["finetune", "--dataset", str(w["root"] / "oneclass"), *SETS], "class"),
    ("unknown dataset", lambda w: ["finetune", "--dataset", "imagenet-9000", *SETS], "imagenet-9000"),
    ("missing label file", lambda w: ["finetune", "--dataset", "my-labels.csv", *SETS], "my-labels.csv does not exist"),
    ("missing label file, a path", lambda w: ["finetune", "--dataset", str(w["root"] / "x" / "l.CSV"), *SETS],
     "error: label file /"),
    ("unknown preset", lambda w: ["finetune", "--preset", "xxl", "--dataset", str(w["folder"])], "unknown preset"),
    ("preset not yaml", lambda w: ["count-params", "--preset", str(w["root"] / "notyaml.yaml")], "not valid YAML"),
    ("bad --set key", lambda w: ["finetune", "--dataset", str(w["folder"]), "--set", "model.depht=2"], "model.depht"),
    ("bad --set type", lambda w: ["finetune", "--dataset", str(w["folder"]), "--set", "model.depth=deep"], "expected an integer"),
    ("--set without =", lambda w: ["count-params", "--set", "model.depth"], "key.path=value"),
    ("zero epochs", lambda w: ["finetune", "--dataset", str(w["folder"]), "--epochs", "0", *SETS], "epochs must be positive"),
    ("negative batch", lambda w: ["finetune", "--dataset", str(w["folder"]), "--batch-size", "-4", *SETS], "batch_size must be positive"),
    ("EMA decay out of range", lambda w: ["finetune", "--dataset", str(w["folder"]), "--set", "finetune.ema=true", "--set", "finetune.ema_decay=-5", *SETS], "finetune.ema_decay must be in [0, 1), got -5.0"),
    ("model typed with extra zeros", lambda w: ["finetune", "--dataset", str(w["folder"]), "--set", "model.depth=10000000"], "over the 1,000,000,000 mmlit builds"),
    ("negative lr", lambda w: ["pretrain", "--dataset", str(w["folder"]), "--lr", "-1", *SETS], "lr must be positive"),
    ("negative --save-every", lambda w: ["finetune", "--dataset", str(w["folder"]), "--save-every", "-5", "--out", str(w["root"] / "never-se"), *SETS], "--save-every must be >= 0"),
    ("truncated checkpoint", lambda w: ["eval", str(w["root"] / "truncated.safetensors"), "--dataset", str(w["folder"])], "safetensors"),
    ("not safetensors", lambda w: ["eval", str(w["root"] / "notes.safetensors"), "--dataset", str(w["folder"])], "safetensors"),
    ("foreign safetensors", lambda w: ["eval", str(w["root"] / "foreign.safetensors"), "--dataset", str(w["folder"])], "not an mmlit checkpoint"),
    ("forged metadata", lambda w: ["predict", str(w["root"] / "forged.safetensors"), str(w["folder"])], "not valid JSON"),
    ("epoch not a number in the metadata", lambda w: ["eval", str(w["root"] / "odd-epoch.safetensors"), "--dataset", str(w["folder"])], "info.epoch must be a whole number >= 0, got 'abc'"),
    ("MAE checkpoint to predict", lambda w: ["predict", str(w["root"] / "mae" / "last.safetensors"), str(w["folder"])], "fine-tune it first"),
    ("non-finite weights", lambda w: ["predict", str(w["root"] / "nan.safetensors"), str(w["folder"]), "--json"], "hold NaN or inf"),
    ("missing checkpoint", lambda w: ["eval", str(w["root"] / "gone.safetensors"), "--dataset", str(w["folder"])], "not found"),
    ("MAE checkpoint to eval", lambda w: ["eval", str(w["root"] / "mae" / "last.safetensors"), "--dataset", str(w["folder"])], "fine-tune it first"),
    ("bad split", lambda w: ["eval", str(w["root"] / "clf" / "best.safetensors"), "--dataset", str(w["folder"]), "--split", "dev"], "--split"),
    ("other class names", lambda w: ["eval", str(w["root"] / "clf" / "best.safetensors"), "--dataset", str(w["root"] / "twoclass")], "has 'a', 'b' where the checkpoint has"),
    ("output dir exists", lambda w: ["finetune", "--dataset", str(w["folder"]), "--out", str(w["root"] / "taken"), *SETS], "already exists"),
    ("no write permission", lambda w: ["finetune", "--dataset", str(w["folder"]), "--out", no_write_dir(w["root"]), *SETS], "cannot create --out"),
    ("cuda without GPU", lambda w: ["finetune", "--dataset", str(w["folder"]), "--device", "cuda", "--out", str(w["root"] / "never"), *SETS], "no CUDA GPU"),
    ("unknown device", lambda w: ["finetune", "--dataset", str(w["folder"]), "--device", "tpu", "--out", str(w["root"] / "never2"), *SETS], "unknown device"),
    ("a name that is a path", lambda w: ["finetune", "--dataset", str(w["folder"]), *SETS, "--set", f"name={w['root']}/elsewhere", "--print-config"], "name must be a plain folder name (a run without --out is runs/finetune/<name>), got '/"),
    ("an empty name", lambda w: ["pretrain", "--dataset", str(w["folder"]), *SETS, "--set", "name=", "--print-config"], "name must be a plain folder name (a run without --out is runs/pretrain/<name>), got ''"),
    ("resume other preset", lambda w: ["finetune", "--resume", str(w["root"] / "clf"), "--preset", "s"], "was trained with preset 'xxs', not 's'"),
    ("resume with a preset file named as the run's, of another model", lambda w: ["finetune", "--resume", str(w["root"] / "clf"), "--preset", str(w["root"] / "xxs.yaml"), *SETS, "--print-config"], "(model.top_k 2 there, 1 in it): leave --preset out"),
    ("resume with the preset's file but not the run's --set", lambda w: ["finetune", "--resume", str(w["root"] / "clf"), "--preset", str(w["root"] / "copy" / "xxs.yaml"), "--print-config"], "was trained with another model than preset /"),
    ("resume pretrain as finetune", lambda w: ["finetune", "--resume", str(w["root"] / "mae")], "is a pretrain run: resume it with mmlit pretrain --resume"),
    ("finetune --out a pretrain run", lambda w: ["finetune", "--dataset", str(w["folder"]), "--out", str(w["root"] / "mae"), *SETS],
     "mae holds a pretrain run: choose another --out, or continue that run with mmlit pretrain --resume"),
    ("resume a checkpoint other than last", lambda w: ["finetune", "--resume", str(w["root"] / "clf" / "best.safetensors")], "is not a run's last checkpoint: --resume takes the run's folder"),
    ("eval an ONNX file", lambda w: ["eval", str(w["root"] / "model.onnx"), "--dataset", str(w["folder"])], "is an exported ONNX file: this needs the .safetensors checkpoint"),
    ("init of another architecture", lambda w: ["finetune", "--dataset", str(w["folder"]), "--init", str(w["root"] / "clf" / "best.safetensors"), "--out", str(w["root"] / "never5")], "is another architecture"),
    ("init of another architecture, --print-config", lambda w: ["finetune", "--dataset", str(w["folder"]), "--init", str(w["root"] / "clf" / "best.safetensors"), "--print-config"], "is another architecture"),
    ("init of another depth", lambda w: ["finetune", "--dataset", str(w["folder"]), "--init", str(w["root"] / "mae-even" / "last.safetensors"), *SETS, "--set", "model.depth=2", "--set", "model.mlp_hidden_last=16", "--set", "model.expert_stages=[3]", "--out", str(w["root"] / "never8")], "tensor(s) of its encoder have no place here: blocks.2."),
    ("init into a deeper model", lambda w: ["finetune", "--dataset", str(w["folder"]), "--init", str(w["root"] / "mae-even" / "last.safetensors"), *SETS, "--set", "model.depth=4", "--set", "model.mlp_hidden_last=16", "--set", "model.expert_stages=[3]", "--print-config"], "tensor(s) of this model are not in it: blocks.3."),
    ("init without qkv biases", lambda w: ["finetune", "--dataset", str(w["folder"]), "--init", str(w["root"] / "mae" / "last.safetensors"), *SETS, "--set", "model.qkv_bias=false", "--print-config"], "is another architecture (3 tensor(s) of its encoder have no place here: blocks.0.attn.qkv.bias)"),
    ("--lr and --set finetune.lr disagree", lambda w: ["finetune", "--dataset", str(w["folder"]), *SETS, "--lr", "0.01", "--set", "finetune.lr=2e-2", "--print-config"], "--lr 0.01 and --set finetune.lr=0.02 ask for two values: give one"),
    ("--epochs and --set pretrain.epochs disagree", lambda w: ["pretrain", "--dataset", str(w["folder"]), *SETS, "--set", "pretrain.epochs=3", "--epochs", "2", "--out", str(w["root"] / "never9")], "--epochs 2 and --set pretrain.epochs=3 ask for two values: give one"),
    ("--epochs and --set finetune.epochs disagree on --resume", lambda w: ["finetune", "--resume", str(w["root"] / "clf"), "--epochs", "5", "--set", "finetune.epochs=6"], "--epochs 5 and --set finetune.epochs=6 ask for two values: give one"),
    ("lr not a number", lambda w: ["finetune", "--dataset", str(w["folder"]), *SETS, "--lr", "nan", "--print-config"], "finetune.lr must be a finite number, got nan"),
    ("norm_eps negative", lambda w: ["count-params", "--set", "model.norm_eps=-1"], "norm_eps must be >= 0"),
    ("seed past 64 bits", lambda w: ["finetune", "--dataset", str(w["folder"]), "--seed", "99999999999999999999", "--print-config", *SETS], "finetune.seed must be a whole number between -2**62 and 2**62"),
    ("preset infinite in a --set", lambda w: ["count-params", "--set", "model.drop_path=inf"], "model.drop_path must be a finite number"),
    ("preset a checkpoint", lambda w: ["count-params", "--preset", str(w["root"] / "clf" / "best.safetensors")], "is not a YAML preset (not text): a checkpoint goes to --init"),
    ("in_chans other than 3", lambda w: ["finetune", "--dataset", str(w["folder"]), *SETS, "--set", "model.in_chans=1", "--out", str(w["root"] / "never6")], "model.in_chans is 1: training needs 3"),
    ("label file with one class", lambda w: ["finetune", "--dataset", str(w["root"] / "one-class.csv"), *SETS], "every row has the label 'red'; a classifier needs at least 2"),
    ("label file with a class only in val", lambda w: ["finetune", "--dataset", str(w["root"] / "val-only-class.csv"), *SETS], "label(s) in val/test rows but in no train row: blue"),
    ("preset with a key given twice", lambda w: ["count-params", "--preset", str(w["root"] / "dup.yaml")], "'depth' is given twice in one section (line 5)"),
    ("resume missing dir", lambda w: ["finetune", "--resume", str(w["root"] / "nothing")], "nothing to resume"),
    ("resume with --set", lambda w: ["finetune", "--resume", str(w["root"] / "clf"), "--set", "model.depth=2"], "--set"),
    ("--val test without a test split, --print-config", lambda w: ["finetune", "--dataset", str(w["folder"]), "--val", "test", "--print-config", *SETS], "has no val/ or test/ folder"),
    ("--val test without a test split", lambda w: ["finetune", "--dataset", str(w["folder"]), "--val", "test", "--out", str(w["root"] / "never7"), *SETS], "has no val/ or test/ folder"),
    ("init missing, said before the data is read", lambda w: ["finetune", "--dataset", "cifar10", "--data-dir", str(w["root"] / "nope"), "--init", str(w["root"] / "gone.safetensors"), *SETS], "checkpoint not found"),
    ("init missing, --print-config", lambda w: ["finetune", "--dataset", str(w["folder"]), "--init", str(w["root"] / "gone.safetensors"), "--print-config", *SETS], "checkpoint not found"),
    ("init not a checkpoint", lambda w: ["finetune", "--dataset", str(w["folder"]), "--init", str(w["root"] / "notes.safetensors"), "--out", str(w["root"] / "never3"), *SETS], "safetensors"),
    ("eval: the run's data has gone", lambda w: ["eval", str(w["root"] / "moved" / "best.safetensors")], "pass --dataset"),
    ("eval: old checkpoint, no dataset", lambda w: ["eval", str(w["root"] / "old.safetensors")], "--dataset is required"),
    ("eval a run folder", lambda w: ["eval", str(w["root"] / "clf")], "clf is a folder: pass a checkpoint file in it"),
    ("predict a folder", lambda w: ["predict", str(w["root"]), str(w["folder"])], "is a folder, not a checkpoint file"),
    ("eval --out a file", lambda w: ["eval", str(w["root"] / "clf" / "best.safetensors"), "--out", str(w["root"] / "notyaml.yaml")], "is a file: --out names a folder"),
    ("eval --out under a file", lambda w: ["eval", str(w["root"] / "clf" / "best.safetensors"), "--out", str(w["root"] / "notyaml.yaml" / "sub"), "--json"], "notyaml.yaml is a file, not a folder"),
    ("eval --out that cannot be made, said before evaluating", lambda w: ["eval", str(w["root"] / "clf" / "best.safetensors"), "--out", no_write_dir(w["root"])], "cannot create --out"),
    ("--out not UTF-8, a run", lambda w: ["finetune", "--dataset", str(w["folder"]), "--out", str(w["root"] / os.fsdecode(b"run\xff")), *SETS], "the name holds bytes that are not UTF-8"),
    ("--out not UTF-8, an eval", lambda w: ["eval", str(w["root"] / "clf" / "best.safetensors"), "--out", str(w["root"] / os.fsdecode(b"ev\xff"))], "the name holds bytes that are not UTF-8"),
    ("--out not UTF-8, an export", lambda w: ["export", str(w["root"] / "clf" / "best.safetensors"), "--out", str(w["root"] / os.fsdecode(b"m\xff.onnx"))], "the name holds bytes that are not UTF-8"),
    ("--out a link to nothing", lambda w: ["eval", str(w["root"] / "clf" / "best.safetensors"), "--out", str(w["root"] / "dangling")], "is a link to"),
    ("eval --out not empty", lambda w: ["eval", str(w["root"] / "clf" / "best.safetensors"), "--out", str(w["root"] / "taken")], "not empty: choose another --out"),
    ("label file: every bad row, train's and val's, in one line", lambda w: ["finetune", "--dataset", str(w["root"] / "bad-rows.csv"), *SETS],
     "2 bad row(s): line 3: gone.png not found; line 4: broken.jpg does not decode as an image"),
    ("plot a checkpoint", lambda w: ["plot", str(w["root"] / "clf" / "best.safetensors")], "plot takes a run's folder"),
    ("preset a folder", lambda w: ["count-params", "--preset", str(w["folder"])], "is a folder: a preset is a name"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, world, monkeypatch, capsys):
    _, build, needle = case
    argv = build(world)
    before = snapshot(world["root"])
    monkeypatch.setattr(sys, "argv", ["mmlit", *argv])
    monkeypatch.chdir(world["root"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code not in (0, None)
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert needle in err, err
    assert snapshot(world["root"]) == before


def test_a_full_out_folder_advises_resume_only_when_it_holds_a_run(world, monkeypatch, capsys):
    """`--out` naming a folder with files: --resume is advised only where there is a run to
    resume (a last.safetensors), not for a folder of notes or of images."""
    monkeypatch.chdir(world["root"])
    for out, advised in (("taken", False), ("colours", False)):
        monkeypatch.setattr(sys, "argv", ["mmlit", "finetune", "--dataset", str(world["folder"]), "--out", out, *SETS])
        with pytest.raises(SystemExit):
            cli.main()
        err = capsys.readouterr().err
        assert "already exists and is not empty" in err and ("--resume" in err) == advised, err


def test_evals_started_together_get_a_folder_each_and_a_file_named_runs_is_said(tmp_path, monkeypatch, capsys):
    """Two `mmlit eval CKPT` at once both chose runs/eval/<name> (it was made only when the
    figures were written) and one's confusion.png replaced the other's. A file named `runs`
    where the folder goes was "[Errno 20] Not a directory" after the evaluation."""
    from mmlit_cli.files import claim_run_dir

    monkeypatch.chdir(tmp_path)
    first, second = claim_run_dir(None, "eval", "clf"), claim_run_dir(None, "eval", "clf")
    assert first == (Path("runs/eval/clf"), (Path("runs/eval/clf"), Path("runs/eval"), Path("runs")), None)
    assert second == (Path("runs/eval/clf2"), (Path("runs/eval/clf2"),), None) and second[0].is_dir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "runs").write_text("notes")
    monkeypatch.setattr(sys, "argv", ["mmlit", "eval", str(tmp_path / "none.safetensors")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == "error: cannot create runs/eval/" + tmp_path.name + ": runs is a " \
        "file, not a folder; pass --out", err


def test_a_read_only_working_folder_says_to_pass_out(tmp_path, monkeypatch):
    """`mmlit eval CKPT` (or a run without --out) in a read-only folder was "[Errno 30] Read-only
    file system: 'runs'", with no word of --out."""
    import errno

    from mmlit_cli.errors import MmlitError
    from mmlit_cli.files import new_run_dir

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(MmlitError, match=r"^cannot create runs/eval/clf: Read-only file system; pass --out$"):
        new_run_dir(None, "eval", "clf", claim=True)


@pytest.mark.skipif(sys.platform == "win32", reason="the --out lock is flock's")
def test_a_run_or_eval_given_an_out_another_command_is_writing_is_refused(world, tmp_path):
    """Two runs given one new --out both found it free (or empty: the first was still reading
    its data) and wrote into it, one's best.safetensors beside the other's last, both saying
    "done". The --out is made and locked when a command starts (the lock ends with the
    process, however it ends); a command that fails before writing removes what it made."""
    from mmlit_cli.errors import MmlitError
    from mmlit_cli.files import LOCK_NAME, claim_out, removed_if_left_empty
    from mmlit_cli.train import run_training

    out = tmp_path / "a" / "run"
    made, lock = claim_out(out)  # the first command, still reading its data
    assert made == (out, tmp_path / "a") and lock == out / LOCK_NAME
    with pytest.raises(MmlitError, match="is being written by another mmlit command"):
        run_training("finetune", "xxs", str(world["folder"]), out=out, overrides=TINY, epochs=1, batch_size=8,
                     quiet=True)
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "eval", str(world["root"] / "clf" / "best.safetensors"),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (2, f"error: --out {out} is being written by another mmlit command: "
                                           f"choose another --out\n")
    with removed_if_left_empty(made, lock):  # the first command ends
        pass
    assert out.is_dir() and not lock.exists()
    run_training("finetune", "xxs", str(world["folder"]), out=out, overrides=TINY, epochs=1, batch_size=8, quiet=True)
    assert (out / "last.safetensors").is_file() and not lock.exists()
    with pytest.raises(MmlitError, match="only one class folder"):
        run_training("finetune", "xxs", str(world["root"] / "oneclass"), out=tmp_path / "x" / "run", overrides=TINY,
                     quiet=True)
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="the --out lock is flock's")
def test_a_run_another_command_is_continuing_is_refused(world, tmp_path, monkeypatch):
    """A resumed run, or one the same command continues, holds its folder's lock too: two commands
    continuing one run both said "resuming ... at epoch 1" and trained into it, both writing last,
    best and metrics. The checkpoint read before the lock must still be the folder's last."""
    from mmlit_cli import train
    from mmlit_cli.errors import MmlitError
    from mmlit_cli.files import claim_out, removed_if_left_empty

    out, folder = tmp_path / "run", str(world["folder"])
    same = dict(overrides=TINY, epochs=2, batch_size=8, quiet=True)
    assert train.run_training("finetune", "xxs", folder, out=out, max_steps=1, **same)["stopped"] == "max_steps"
    made, lock = claim_out(out)  # another command continuing it
    for again in (dict(resume=out, epochs=2, quiet=True), dict(out=out, **same)):  # --resume; the same command
        with pytest.raises(MmlitError, match=f"^{out} is being trained by another mmlit command: wait for it "
                                             f"to end, then run this command again$"):
            train.run_training("finetune", "xxs", None if "resume" in again else folder, **again)
    with removed_if_left_empty(made, lock):
        pass
    monkeypatch.setattr(train, "recorded_train_state", lambda path: {"epoch": 1, "global_step": 3})  # saved since
    with pytest.raises(MmlitError, match="last.safetensors was written by another mmlit command while this one read"):
        train.run_training("finetune", "xxs", None, resume=out, epochs=2, quiet=True)
    assert not lock.exists()  # released
    monkeypatch.undo()
    assert train.run_training("finetune", "xxs", None, resume=out, epochs=2, quiet=True)["epoch"] == 2
    assert not lock.exists()


def test_eval_into_a_full_folder_does_not_advise_a_resume_it_does_not_have(world, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mmlit", "eval", str(world["root"] / "clf" / "best.safetensors"), "--out",
                                      str(world["root"] / "taken")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "already exists and is not empty" in err and "--resume" not in err, err
