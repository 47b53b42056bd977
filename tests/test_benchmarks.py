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

    def e2e(preset, dataset, cfg, loader, device, args, out):
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
