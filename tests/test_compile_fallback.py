"""Training compiled (`--compile`, on by default for long CUDA runs): the compiled step trains as
the eager one, and a torch.compile that fails at the first step (no C compiler, as in slim
containers; a Triton or inductor bug) leaves a single process training eagerly, the run the one
`--no-compile` gives, with a line saying so. Under torchrun the run stops, saying what to do."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from mmlit_cli import engine, runtime
from mmlit_cli.config import load_config
from mmlit_cli.data import ImageData
from mmlit_cli.engine import RunOptions, Trainer
from mmlit_cli.errors import MmlitError
from mmlit_cli.tasks import ClassifyTask
from helpers import TINY, write_folder


def batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=g),
            torch.tensor([0, 1, 2] * 2 + [0, 1]))


def trainer(tmp_path, name, compile, console=None, tune=None):
    """A tiny classifier's trainer; drop path and mixup draw from the RNG at every step."""
    cfg = load_config("xxs", TINY)
    recipe = dataclasses.replace(cfg.finetune, batch_size=8, loader="device")  # mixup, cutmix: the preset's
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=3, drop_path=0.2), finetune=recipe)
    torch.manual_seed(0)
    return Trainer(ClassifyTask(cfg, ["a", "b", "c"]), cfg, ImageData(*batch(), ["a", "b", "c"], "test"), None,
                   RunOptions(out_dir=tmp_path / name, dataset={}, device="cpu", compile=compile, tune_attention=tune,
                              quiet=console is None),
                   console or Console(quiet=True))


def steps(t, n=3):
    t.model.train()
    losses = torch.stack([t._train_step(*batch()) for _ in range(n)])
    return losses, torch.cat([p.detach().flatten() for p in t.model.parameters()])


class FakeInductorError(RuntimeError):
    """Stands for inductor's errors, which `runtime.is_compile_failure` tells by their module."""


FakeInductorError.__module__ = "torch._inductor.exc"
FAILURE = "Failed to find C compiler. Please specify via CC environment variable.\nmore text"


class FailingBackward(torch.autograd.Function):
    """Identity forward; a backward that fails, as a backward compiled at its first call can."""
    error = RuntimeError

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise FailingBackward.error(FAILURE)


class BrokenCompile(torch.nn.Module):
    """What `maybe_compile` returns when asked to compile: the model, its backward failing."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return FailingBackward.apply(self.model(*args, **kwargs))


def broken_compile(monkeypatch, error=RuntimeError):
    monkeypatch.setattr(FailingBackward, "error", error)
    monkeypatch.setattr(engine, "maybe_compile", lambda module, compile=False, mode=None:
                        BrokenCompile(module) if compile or mode else module)


def test_a_compile_failing_in_the_first_backward_leaves_the_eager_run(tmp_path, monkeypatch, capsys):
    """The failure comes after the forward drew from the RNG and after the optimizer's gradients
    were zeroed: the run starts the batch again eagerly, the RNG rewound, and goes on as the
    eager run does, to the same losses and weights."""
    plain = steps(trainer(tmp_path, "plain", False))
    broken_compile(monkeypatch)
    t = trainer(tmp_path, "broken", True, console=Console(file=sys.stdout, width=400))
    assert t.compiled and t.compile_untried
    made, task_loss, eagerly = [], t.task.loss, t.step_model.train_eagerly

    def recorded_loss(*args):
        loss = task_loss(*args)
        made.append(weakref.ref(loss))
        return loss

    def checked_eagerly():  # the failed step's graph (activations and all) is gone before the retry
        assert made[0]() is None
        eagerly()

    monkeypatch.setattr(t.task, "loss", recorded_loss)
    monkeypatch.setattr(t.step_model, "train_eagerly", checked_eagerly)
    fell_back = steps(t)
    assert not t.compiled and t.train_model is t.model
    torch.testing.assert_close(fell_back[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(fell_back[1], plain[1], rtol=0, atol=0)
    out = capsys.readouterr().out
    assert ("torch.compile failed at the first step (RuntimeError: Failed to find C compiler. Please specify via CC "
            "environment variable.): training without it (--no-compile skips the attempt)") in out
    assert out.count("torch.compile failed") == 1


def test_an_error_of_the_model_is_raised_as_it_is(tmp_path, monkeypatch, capsys):
    """A first step that fails eagerly too is not compile's fault: its own error, no note."""
    broken_compile(monkeypatch)
    t = trainer(tmp_path, "bad", True, console=Console(file=sys.stdout, width=400))
    images, labels = batch()
    with pytest.raises(RuntimeError, match="Class values must be smaller"):  # fails compiled and eager
        t._train_step(images, labels + 7)
    assert "torch.compile" not in capsys.readouterr().out
    t = trainer(tmp_path, "user", True)
    monkeypatch.setattr(t.task, "loss", lambda *a: (_ for _ in ()).throw(MmlitError("label 9 is out of range")))
    with pytest.raises(MmlitError, match="label 9 is out of range"):
        t._train_step(*batch())
    assert t.compiled  # an MmlitError is the user's to fix, compiled or not: no fallback


def test_under_torchrun_a_failing_compile_stops_the_run_with_what_to_do(tmp_path, monkeypatch):
    """One rank cannot take its step again alone: the run stops, saying what to do when compile
    broke, and with the error as it is otherwise (not blamed on compile)."""
    for error, raised, said in ((FakeInductorError, MmlitError, r"the first training step failed under torch."
                                 r"compile \(FakeInductorError: Failed to find C compiler.*\); --no-compile runs "
                                 r"without it"),
                                (RuntimeError, RuntimeError, r"^Failed to find C compiler")):
        broken_compile(monkeypatch, error)
        t = trainer(tmp_path, "ddp", True)
        t.dist = t.step_model.dist = dataclasses.replace(t.dist, world_size=2)
        with pytest.raises(raised, match=said):
            t._train_step(*batch())


def test_what_counts_as_compile_failing():
    """Inductor's errors and dynamo's backend and internal failures; not the model's own error met
    while dynamo traced it (TorchRuntimeError), nor anything else."""
    from torch._dynamo import exc as dynamo
    from torch._inductor import exc as inductor

    def made(cls):
        return cls.__new__(cls)  # their constructors differ between torch versions

    assert runtime.is_compile_failure(made(dynamo.BackendCompilerFailed))
    assert runtime.is_compile_failure(made(inductor.InductorError))
    assert runtime.is_compile_failure(FakeInductorError("x"))
    assert not runtime.is_compile_failure(made(dynamo.TorchRuntimeError))
    assert not runtime.is_compile_failure(RuntimeError(FAILURE))
    assert runtime.compile_failure(RuntimeError(FAILURE)) == "RuntimeError: " + FAILURE.split("\n")[0]
    wrapped = "backend='inductor' raised:\nImportError: /tmp/c/x.main.so: file too short\n\nSet TORCHDYNAMO_VERBOSE=1"
    assert runtime.compile_failure(RuntimeError(wrapped)) == ("RuntimeError: backend='inductor' raised: ImportError: "
                                                              "/tmp/c/x.main.so: file too short")
    assert runtime.compile_failure(RuntimeError()) == "RuntimeError"


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile needs a C++ compiler")
def test_the_compiled_step_trains_as_the_eager_one_with_a_padded_attention_layout(tmp_path, monkeypatch):
    """The path a CUDA run takes by default, on the CPU: the attention's kernel layout tuned (here
    made to win: heads padded to 8, K/V repeated), the model compiled by inductor."""
    plain = steps(trainer(tmp_path, "plain", False))
    monkeypatch.setattr(runtime, "_time_layout", lambda module, layout, *a: {(8, True): 0.001}.get(layout, 0.003))
    t = trainer(tmp_path, "compiled", True, tune=True)
    assert "heads padded to 8, K/V repeated" in t.attention_note
    compiled = steps(t)
    assert t.compiled and t.train_model is not t.model  # compiled, no fallback
    torch.testing.assert_close(compiled[0], plain[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1], plain[1], rtol=1e-3, atol=1e-4)


def test_mmlit_finetune_without_a_c_compiler_trains_as_no_compile_does(tmp_path):
    """A fresh `mmlit finetune --compile` process on a machine whose C++ compiler does not work
    (CXX=/bin/false; a fresh inductor cache, so nothing compiled before can stand in). The paper
    recipe keeps mixup, cutmix and drop path drawing from the RNG in the first step."""
    data = write_folder(tmp_path / "colours", per_class=16)
    runs = {}
    for flag in ("--compile", "--no-compile"):
        out = tmp_path / flag.strip("-")
        env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"cache{flag}")}
        r = subprocess.run([sys.executable, "-m", "mmlit_cli", "finetune", "--preset", "xxs", "--dataset", str(data),
                            "--epochs", "2", "--batch-size", "8", "--recipe", "paper", flag, "--out", str(out),
                            *[x for o in TINY for x in ("--set", o)]],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        runs[flag] = (r.stdout, [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").open()],
                      load_file(out / "last.safetensors"))
    said = " ".join(runs["--compile"][0].split())
    assert "torch.compile failed at the first step (" in said and "C++ compiler" in said
    assert "training without it (--no-compile skips the attempt)" in said
    assert "torch.compile failed" not in runs["--no-compile"][0]
    assert runs["--compile"][1] == runs["--no-compile"][1] and len(runs["--compile"][1]) == 2
    weights = runs["--compile"][2]
    assert weights.keys() == runs["--no-compile"][2].keys()
    assert all(torch.equal(weights[k], runs["--no-compile"][2][k]) for k in weights)


def test_eval_and_predict_compile_on_a_machine_that_cannot_is_a_one_line_error(tmp_path):
    """`--compile` is asked for by name there, and a run of them takes seconds: a clear error that
    says to drop it, not an internal error with inductor's pages of advice."""
    from helpers import train_tiny

    data, run = train_tiny(tmp_path)
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    for command in (["eval", str(run / "best.safetensors"), "--dataset", str(data)],
                    ["predict", str(run / "best.safetensors"), str(data / "red")]):
        r = subprocess.run([sys.executable, "-m", "mmlit_cli", *command, "--compile"], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: torch.compile failed ("), r.stderr
        assert "C++ compiler" in lines[0]
        assert lines[0].endswith("; run without it: drop --compile (eval, predict) or pass --no-compile (finetune, "
                                 "pretrain)")
    assert not runtime.is_compile_failure(RuntimeError("Class values must be smaller than num_classes."))


def test_benchmark_says_in_a_line_why_the_compiled_row_cannot_run(tmp_path):
    """`mmlit benchmark` keeps its compiled row where torch.compile cannot work, saying why in a
    line (the C++ compiler), without inductor's advice on logging."""
    from helpers import train_tiny

    data, run = train_tiny(tmp_path)
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['onnxruntime'] = None\n")  # ONNX rows: skipped
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "benchmark", str(run / "best.safetensors"), "--dataset",
                        str(data), "--json", "--calls", "3", "--limit", "6"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    rows = {row["format"]: row for row in json.loads(r.stdout)["rows"]}
    assert rows["pytorch-eager"]["available"] and not rows["pytorch-compiled"]["available"]
    note = rows["pytorch-compiled"]["note"]
    assert note.startswith("cannot run here (") and "C++ compiler" in note and "TORCHDYNAMO_VERBOSE" not in note, note
