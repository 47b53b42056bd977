"""The reference variants of benchmarks/bench_models.py compute the production model's function,
and the script runs end to end: a benchmark whose baselines drifted from mLiT would measure
something else."""

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_models  # noqa: E402

from mmlit_cli import create_model  # noqa: E402


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    model = create_model("xxs", num_classes=5, overrides=TINY + ["model.depth=6"])  # stages of 3, 4, 5 experts
    with torch.no_grad():  # a non-zero head, so logits differ when features do
        model.head.weight.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("build", [bench_models.naive_model, bench_models.sparse_model, bench_models.public_model])
def test_reference_variant_is_the_same_function(tiny, build):
    other = build(tiny)
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    tiny.double().eval()
    other.double().eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), tiny(x), rtol=1e-9, atol=1e-10)


def test_public_variant_trains_with_noise_and_load_loss(tiny):
    public = bench_models.public_model(tiny).train()
    x = torch.randn(4, 3, 12, 12)
    torch.manual_seed(1)
    a = public(x)
    aux = public.aux_loss()
    assert aux is not None and torch.isfinite(aux) and aux > 0
    aux.backward()  # the auxiliary loss alone must reach the noise projection (through the CDF)
    noise_grads = [b.ffn.noise.weight.grad for b in public.blocks]
    assert all(g is not None and g.abs().sum() > 0 for g in noise_grads)
    torch.manual_seed(2)
    assert not torch.equal(public(x), a)  # routing noise while training


def test_public_variant_lives_where_the_model_does(tiny):
    public = bench_models.public_model(tiny.to(torch.bfloat16))
    assert {p.dtype for p in public.parameters()} == {torch.bfloat16}
    assert {p.device for p in public.parameters()} == {next(tiny.parameters()).device}


def test_bench_models_quick_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_models.main(["--quick", "--latency-calls", "3", "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    for name in ("mlit", "naive", "sparse", "public", "vit-dense", "moe-free"):
        assert f"\n{name} " in text
    import json
    result = json.loads(out.read_text())["results"][0]
    assert set(result["variants"]) == {"mlit", "naive", "sparse", "public", "vit-dense", "moe-free"}
    assert 1.0 < result["moe_free_bound"]["sparse"] < 10  # free MoE layers are faster, but not boundlessly
    assert max(result["same_function_check"].values()) < 1e-4
    assert result["variants"]["mlit"]["sync_ops_fwd_bwd"] == 0
    assert result["variants"]["sparse"]["sync_ops_fwd_bwd"] > 0


def test_bench_models_variant_subset(capsys):
    assert bench_models.main(["--quick", "--variants", "mlit", "--latency-calls", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "\nmlit " in text and "\nnaive " not in text and "\npublic " not in text


# ---------------------------------------------------------------- gpu.sh: a step cut short
# A device call is one 8-minute lease: when gpu.sh's pipeline step is killed, the
# time-to-accuracy step after it must still get a rate to fit its epochs to.

import bench_pipeline  # noqa: E402
import bench_tta  # noqa: E402
import bench_train  # noqa: E402
from datafixtures import write_image_folder  # noqa: E402


def test_bench_pipeline_keeps_the_rates_measured_before_it_is_killed(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "data", {"a": 6, "b": 6}, size=32)
    calls = []

    def e2e(preset, dataset, cfg, loader, device, args, out, steps):
        calls.append(loader)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the step's timeout, as far as this process can tell
        return 123.0

    monkeypatch.setattr(bench_pipeline, "bench_e2e", e2e)
    out = tmp_path / "pipeline.json"
    with pytest.raises(KeyboardInterrupt):
        bench_pipeline.main(["--device", "cpu", "--presets", "xxs", "--dataset", str(tmp_path / "data"),
                             "--batch", "4", "--steps", "1", "--warmup", "0", "--rounds", "2", "--bare-rounds", "1",
                             "--workers", "0", "--json", str(out)])
    assert calls == ["device", "workers"]
    assert bench_tta.pipeline_rate(str(out), "xxs") == 123.0
    assert bench_tta.pipeline_rate(str(out), "s") is None



def test_bench_pipeline_times_e2e_steps_within_the_first_epoch():
    """gpu.sh's s run has 79 steps an epoch: 30 + 100 steps timed its first epoch's end
    (validation, the first figures) as if it were training steps."""
    assert bench_pipeline.first_epoch_steps(30, 100, 79) == 49
    assert bench_pipeline.first_epoch_steps(20, 55, 79) == 55
    assert bench_pipeline.first_epoch_steps(3, 5, 3) == 5  # no room after the warm-up: as asked


def test_bench_pipeline_measures_every_preset_before_it_diagnoses_any(tmp_path, monkeypatch):
    """gpu.sh stops step 1 after 150 s: the second preset's figures must not wait behind the
    first preset's profile and attention tables."""
    write_image_folder(tmp_path / "data", {"a": 6, "b": 6}, size=32)
    calls = []
    monkeypatch.setattr(bench_pipeline, "bench_e2e", lambda preset, *a: calls.append(("e2e", preset)) or 100.0)
    monkeypatch.setattr(bench_pipeline, "diagnose", lambda preset, *a: calls.append(("diagnose", preset)))
    bench_pipeline.main(["--device", "cpu", "--presets", "xxs,xs", "--dataset", str(tmp_path / "data"),
                         "--batch", "4", "--steps", "1", "--warmup", "0", "--rounds", "1", "--bare-rounds", "1",
                         "--workers", "0", "--profile", "1", "--json", str(tmp_path / "p.json")])
    assert calls == [("e2e", "xxs"), ("e2e", "xxs"), ("e2e", "xs"), ("e2e", "xs"),
                     ("diagnose", "xxs"), ("diagnose", "xs")]

def test_gpu_sh_cuts_every_step_at_its_hard_limit_and_logs_to_out(tmp_path):
    """A device call is killed at 600 s, and only $OUT comes back: no step of gpu.sh may run
    past HARD_S, one that would get less than MIN_STEP_S is skipped, and the log goes to $OUT."""
    import subprocess

    fake = tmp_path / "python"  # a Python that hangs, but answers gpu.sh's data-folder question
    fake.write_text('#!/bin/sh\ncase "$2" in *holdout_folder*) echo "$DATA";; *) sleep 30;; esac\n')
    fake.chmod(0o755)
    (tmp_path / "data").mkdir()
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "DATA": str(tmp_path / "data"), "OUT": str(out),
           "HARD_S": "3", "MIN_STEP_S": "2"}
    done = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--cpu-quick"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert "timed out after 3 s" in done.stdout  # the environment step: cut at the limit, not at 420 s
    assert done.stdout.count("left of the 3 s limit") == 2  # the pipeline and time-to-accuracy steps
    assert done.returncode == 1
    assert len(list(out.glob("cpu-quick-*.log"))) == 1


def test_bench_tta_falls_back_to_rate_when_the_rates_file_has_none(tmp_path, monkeypatch, capsys):
    write_image_folder(tmp_path / "data" / "train", {"a": 8, "b": 8}, size=8)
    write_image_folder(tmp_path / "data" / "val", {"a": 2, "b": 2}, size=8)
    truncated = tmp_path / "pipeline.json"
    truncated.write_text('{"machine": {}, "results": [{"preset": "s", "e2e_dev')  # killed mid-write
    commands = []
    monkeypatch.setattr(bench_tta.subprocess, "call", lambda cmd: commands.append(cmd) or 0)
    assert bench_tta.main(["--data", str(tmp_path / "data"), "--budget-s", "30", "--fixed-s", "10",
                           "--device", "cpu", "--rates", str(truncated), "--rate", "2",
                           "--out", str(tmp_path / "run")]) == 0
    epochs = int(commands[0][commands[0].index("--epochs") + 1])
    assert epochs == bench_tta.fitted_epochs(30, 10, 2, 16, 4) == 2  # 20 s at (16 + 4/3) / 2 s an epoch
    assert "--rate: no measured rate" in capsys.readouterr().out


@pytest.mark.parametrize("rate, expected", [
    (3000, (19, "eager")),  # short: no compilation, the eager allowance
    (6500, (40, "eager")),  # 41 epochs would compile, leaving 29: held at 40 (3,160 steps), eager
    (20000, (90, "compiled")),  # long enough to compile even with its allowance
])
def test_bench_tta_fits_its_epochs_with_the_allowance_of_the_way_the_run_goes(rate, expected):
    """gpu.sh's 5-minute run: an allowance for compiling only when the command will compile (a
    run of 3,200 steps or more on CUDA), else it was ~80 s short of its budget."""
    chosen = bench_tta.choose_epochs(300, (30, 110), rate, 40500, 4500, lambda e: 79 * e, lambda st: st >= 3200)
    assert chosen == expected


def test_bench_tta_plans_the_steps_a_cuda_run_takes():
    cuda = torch.device("cuda")
    assert bench_tta.planned_steps("s", 40, 40500, cuda) == 40 * (40500 // 512)  # the device's batch
    assert bench_tta.planned_steps("s", 3, 40500, cuda) > 3 * 79  # a short run: smaller batches, more steps
    assert bench_tta.compile_pays(cuda, bench_tta.planned_steps("s", 41, 40500, cuda))


def test_bench_tta_says_what_the_command_spent_outside_its_epochs_steps(tmp_path, monkeypatch, capsys):
    write_image_folder(tmp_path / "data" / "train", {"a": 8, "b": 8}, size=8)
    write_image_folder(tmp_path / "data" / "val", {"a": 2, "b": 2}, size=8)
    run = tmp_path / "run"

    def finetune(cmd):  # two epochs of 1 s and 2 s of steps
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": e, "epoch_time_s": t, "train_img_per_s": 16 / t, "val_top1": 50.0}) + "\n"
            for e, t in ((1, 1.0), (2, 2.0))))
        return 0

    clock = iter([100.0, 110.0])  # the command's start and end: 10 s of wall time
    monkeypatch.setattr(bench_tta.subprocess, "call", finetune)
    monkeypatch.setattr(bench_tta.time, "perf_counter", lambda: next(clock))
    assert bench_tta.main(["--data", str(tmp_path / "data"), "--epochs", "2", "--device", "cpu",
                           "--out", str(run), "--json", str(tmp_path / "tta.json")]) == 0
    assert "outside the epochs' steps: 7.0 s of 10.0 s" in capsys.readouterr().out
    assert json.loads((tmp_path / "tta.json").read_text())["outside_steps_s"] == 7.0


def test_write_json_replaces_a_file_whole(tmp_path):
    import common
    path = tmp_path / "raw.json"
    common.write_json(path, {"results": [1]})
    common.write_json(path, {"results": [1, 2]})
    assert path.read_text().count("results") == 1 and [p.name for p in tmp_path.iterdir()] == ["raw.json"]


import bench_attention  # noqa: E402


@pytest.mark.parametrize("pad_to,repeat_kv", [(24, False), (32, True), (None, True)])
def test_attention_levers_compute_the_models_attention(pad_to, repeat_kv):
    """bench_attention's levers (K/V repeated to every head, heads zero-padded to 24 or 32)
    give mLiT's grouped attention, values and gradients: what they time is a drop-in."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 13, 18, generator=gen, requires_grad=True)
    k, v = (torch.randn(3, 3, 13, 18, generator=gen, requires_grad=True) for _ in range(2))
    grad = torch.randn(3, 6, 13, 18, generator=gen)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    got = bench_attention.attention_call(q, k, v, pad_to, repeat_kv)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), grad), want_grads):
        assert torch.allclose(g, w, atol=1e-5)


def test_bench_attention_times_each_backend_at_the_presets_shapes(capsys):
    assert bench_attention.main(["--device", "cpu", "--presets", "xxs", "--batch", "2", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("xxs ")]
    assert len(rows) == 6 * 2  # 6 levers x (flash, math) on a CPU
    assert all(row[:3] == ["xxs", "6/3", "x"] and float(row[-1]) > 0 for row in rows), out


def test_profile_lines_name_what_a_step_spends_its_time_on():
    import common

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    lines = common.profile_lines(lambda: (a @ b).relu_(), 3, torch.device("cpu"), top=2)
    assert lines[0].startswith("profile of 3 steps: ") and "ms per step" in lines[0]
    top = lines[2].split()
    assert top[-1] == "aten::mm" and top[3] == "1.0", lines  # once a step, the most expensive op


def test_bench_pipeline_weighs_the_chosen_attention_layout_against_the_layout_as_built(tmp_path, monkeypatch):
    """--profile's comparison: the bare step with the layout `tune_attention` chose (faked
    fastest here) against the same step as built; a run on a CPU chooses nothing by default."""
    import argparse

    from mmlit_cli import runtime
    from mmlit_cli.config import load_config

    cfg = load_config("xxs", TINY + ["finetune.batch_size=4"])  # heads 4/2 x 6
    args = argparse.Namespace(profile=1, compile=False)
    _, _, note = bench_train.bare_step(cfg, ["a", "b"], torch.device("cpu"), False, tmp_path)
    assert note == ""
    monkeypatch.setattr(runtime, "_time_layout", lambda module, layout, *a: 0.001 if layout == (8, False) else 0.003)
    line = bench_pipeline.attention_layout_line(cfg, ["a", "b"], torch.device("cpu"), args, tmp_path, rounds=1)
    assert line.startswith("attention layout: attention 4/2 heads x 6 (3 layers): heads padded to 8, ")
    assert "whole bare step" in line and line.endswith("x)"), line
    monkeypatch.setattr(runtime, "_time_layout", lambda module, layout, *a: 0.001)
    line = bench_pipeline.attention_layout_line(cfg, ["a", "b"], torch.device("cpu"), args, tmp_path, rounds=1)
    assert line.startswith("attention layout: as built"), line
