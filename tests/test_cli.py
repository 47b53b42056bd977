"""The command line, run as a user would (a real subprocess) and in-process."""

import json
import subprocess
import sys

import pytest

SPEC_TOTALS = {"s": 2_364_390, "xs": 1_209_408, "xxs": 658_637}


def mmlit(*args, check=False):
    return subprocess.run([sys.executable, "-m", "mmlit_cli", *args], capture_output=True, text=True, check=check)


@pytest.mark.parametrize("preset", ["s", "xs", "xxs"])
def test_count_params_json_total_within_one_percent(preset):
    out = json.loads(mmlit("count-params", "--preset", preset, "--num-classes", "100", "--json", check=True).stdout)
    assert abs(out["total"] - SPEC_TOTALS[preset]) / SPEC_TOTALS[preset] < 0.01
    assert sum(out["components"].values()) == out["total"]
    assert out["macs"] > 0


def test_count_params_table_shows_components_and_paper_figure():
    r = mmlit("count-params", "--preset", "xxs", "--num-classes", "100")
    assert r.returncode == 0
    for word in ("per-expert W1", "shared V", "shared W2", "router", "total", "paper", "MACs"):
        assert word in r.stdout


def test_count_params_image_size_and_set():
    a = json.loads(mmlit("count-params", "--preset", "xxs", "--image-size", "24", "--json").stdout)
    b = json.loads(mmlit("count-params", "--preset", "xxs", "--set", "model.depth=3", "--json").stdout)
    assert a["components"]["position/class tokens"] == (8 * 8 + 1 + 1) * 108
    assert b["total"] < SPEC_TOTALS["xxs"]


@pytest.mark.parametrize("args,needle", [
    (["count-params", "--preset", "nope"], "unknown preset"),
    (["count-params", "--set", "model.dept=3"], "did you mean 'depth'"),
    (["count-params", "--set", "model.depth=x"], "expected an integer"),
])
def test_bad_input_is_one_line_and_nonzero(args, needle):
    r = mmlit(*args)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_help_has_examples():
    assert "Example" in mmlit("--help").stdout
    assert "Example" in mmlit("count-params", "--help").stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from helpers import train_tiny

    root = tmp_path_factory.mktemp("cli")
    folder, _ = train_tiny(root)
    return root, folder


def test_eval_and_predict_json_shapes_through_the_command(trained):
    root, folder = trained
    ckpt = str(root / "run" / "best.safetensors")
    ev = json.loads(mmlit("eval", ckpt, "--dataset", str(folder), "--json", check=True).stdout)
    assert {"top1", "top5", "loss", "per_class", "num_images"} <= set(ev)
    assert set(ev["per_class"]) == {"blue", "green", "red"}
    r = mmlit("predict", ckpt, str(folder / "red"), "--json", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout)
    assert len(preds) == 12 and all(set(p) == {"path", "top"} and len(p["top"]) == 2 for p in preds)
    assert all(set(t) == {"label", "prob"} for p in preds for t in p["top"])


def test_predict_reports_bad_files_and_exits_nonzero(trained, tmp_path):
    root, folder = trained
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(folder / "green", mixed)
    (mixed / "readme.txt").write_text("not an image")
    good = next(mixed.glob("*.png")).read_bytes()
    (mixed / "cut.png").write_bytes(good[: len(good) // 3])
    r = mmlit("predict", str(root / "run" / "best.safetensors"), str(mixed), "--json")
    assert r.returncode == 1
    assert "readme.txt" in r.stderr and "cut.png" in r.stderr and "Traceback" not in r.stderr
    assert len(json.loads(r.stdout)) == 12


def test_export_into_a_folder_never_replaces_a_file_there(trained, tmp_path):
    root, _ = trained
    (tmp_path / "best.onnx").write_bytes(b"an earlier export")
    r = mmlit("export", str(root / "run" / "best.safetensors"), "--out", str(tmp_path))
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "best.onnx").read_bytes() == b"an earlier export"
