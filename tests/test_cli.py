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
