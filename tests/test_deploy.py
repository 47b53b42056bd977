"""Deployment (issue 14): `export --int8 [--calibrate]`, `predict` on an .onnx file and
`benchmark`, each run as a user runs it - a fresh `python -m mmlit_cli` process - on a tiny
model; plus the library pieces they rest on."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx  # the [onnx] extra is part of the test requirements: these tests must not be skipped
import pytest
import torch

from helpers import TINY, write_folder

import mmlit_cli
from mmlit_cli.deploy_benchmark import FORMATS
from mmlit_cli.errors import MmlitError

REPO = Path(mmlit_cli.__file__).resolve().parent.parent


def env_with(*front: Path) -> dict:
    """The environment for a subprocess that imports this checkout (plus `front` first)."""
    env = dict(os.environ)
    parts = [str(p) for p in front] + [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def hiding(tmp: Path, *modules: str) -> dict:
    """An environment in which `import <module>` fails for `modules` (a sitecustomize shim)."""
    shim = tmp / ("hide-" + "-".join(modules))
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        for name in {modules!r}:
            sys.modules[name] = None  # import fails, importlib.util.find_spec says missing
        """))
    return env_with(shim)


def mmlit(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmlit_cli", *map(str, args)], capture_output=True, text=True,
                          env=env or env_with())


def assert_one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode not in (0, None), r.stdout
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err, err


def props(path: Path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny classifier trained until its predictions are clear-cut (so int8 rounding cannot
    flip them), and its three exports, each written by its own `mmlit export` process."""
    root = tmp_path_factory.mktemp("deploy")
    data = root / "colours"
    write_folder(data / "train", per_class=16)
    write_folder(data / "val", per_class=6)
    from mmlit_cli.train import run_training

    run_training("finetune", "xxs", str(data), out=root / "run", overrides=TINY + ["finetune.lr=3e-3"], epochs=8,
                 batch_size=8, quiet=True)
    ckpt = root / "model.safetensors"
    shutil.copy(root / "run" / "last.safetensors", ckpt)
    w = {"root": root, "data": data, "ckpt": ckpt, "fp32": root / "model.onnx", "dyn": root / "model.int8.onnx",
         "static": root / "static.onnx"}
    w["fp32_run"] = mmlit("export", ckpt)
    w["dyn_run"] = mmlit("export", ckpt, "--int8")
    w["static_run"] = mmlit("export", ckpt, "--int8", "--calibrate", data, "--out", w["static"])
    write_folder(root / "twoclass", classes=("a", "b"), per_class=4)
    (root / "notes.onnx").write_text("not a model")
    (root / "dangling.csv").symlink_to(root / "nowhere.csv")
    if w["fp32"].exists():  # else the fp32 test reports why the export failed
        bare = onnx.load(str(w["fp32"]))
        del bare.metadata_props[:]
        onnx.save(bare, str(root / "bare.onnx"))
        two = onnx.load(str(w["fp32"]))  # metadata naming 2 classes, logits of 3
        next(p for p in two.metadata_props if p.key == "classes").value = '["a", "b"]'
        onnx.save(two, str(root / "two-names.onnx"))
    return w


def test_fp32_export_in_a_fresh_process_passes_parity_and_ships_no_debug_metadata(world):
    r = world["fp32_run"]
    assert r.returncode == 0, r.stderr
    diff = float(re.search(r"max \|onnx - torch\| = (\S+)", r.stdout).group(1))
    assert diff <= 1e-4
    model = onnx.load(str(world["fp32"]))
    assert not any(n.metadata_props for n in model.graph.node)
    assert b"stack_trace" not in world["fp32"].read_bytes() and str(REPO).encode() not in world["fp32"].read_bytes()
    assert props(world["fp32"])["quantization"] == "fp32"


def _weight_types(model) -> dict:
    return {i.name: i.data_type for i in model.graph.initializer}


def test_int8_dynamic_export_keeps_the_contract_and_the_router_in_float(world):
    import onnxruntime as ort

    from mmlit_cli.quantize import graph_roles

    r = world["dyn_run"]
    assert r.returncode == 0, r.stderr
    assert "int8 dynamic" in r.stdout and "256 random images" in r.stdout and "router agreement" in r.stdout
    dyn, fp32 = props(world["dyn"]), props(world["fp32"])
    assert dyn.pop("quantization") == "int8 dynamic"
    fp32.pop("quantization")
    assert dyn == fp32  # classes, mean/std, image size, input format, versions: all carried over
    assert world["dyn"].stat().st_size < world["fp32"].stat().st_size
    model = onnx.load(str(world["dyn"]))
    types = _weight_types(model)
    assert sum(t == onnx.TensorProto.INT8 for t in types.values()) >= 4 * 3  # qkv, proj, w1v, w2 per layer
    nodes = {n.name: n for n in model.graph.node}
    roles = graph_roles(model)
    assert len(roles.topk_indices) == 3 and len(roles.router) == 6  # MatMul + Add per MoE layer
    for name in roles.router:
        assert nodes[name].op_type in ("MatMul", "Add")
        assert all(types.get(i, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for i in nodes[name].input)
    session = ort.InferenceSession(str(world["dyn"]), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and isinstance(inp.shape[0], str)
    for n in (1, 5):
        x = np.random.default_rng(n).integers(0, 256, (n, 3, 12, 12), dtype=np.uint8)
        assert session.run(["logits"], {"images": x})[0].shape == (n, 3)


def test_an_int8_export_from_python_leaves_the_callers_root_logger_as_it_was(world, tmp_path, monkeypatch):
    """onnxruntime's quantisation calls `logging.warning`, which gives the root logger a handler
    where it has none: a script's own `logging.basicConfig(...)` after an export did nothing."""
    import logging

    from mmlit_cli.export import export_onnx

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # a script that has not set logging up (pytest has)
    export_onnx(world["ckpt"], tmp_path / "m.int8.onnx", int8=True)
    assert root.handlers == []


def test_int8_static_export_is_calibrated_checked_on_held_out_images_and_keeps_the_head_float(world):
    r = world["static_run"]
    assert r.returncode == 0, r.stderr
    assert "int8 static" in r.stdout and "18 held-out images" in r.stdout
    found = re.search(r"agrees with PyTorch on ([\d.]+) %; top-1 ([\d.]+) % vs PyTorch ([\d.]+) %", r.stdout)
    assert found and float(found.group(1)) == 100.0 and found.group(2) == found.group(3) == "100.00"
    assert props(world["static"])["quantization"] == "int8 static"
    model = onnx.load(str(world["static"]))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # each int8 matmul gives a float result: its output is never re-quantized (that would add a
    # QuantizeLinear -> DequantizeLinear pass per matmul at run time)
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    weight_matmuls = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and n.input[0] in dequantized]
    assert len(weight_matmuls) >= 4 * 3  # qkv, proj, w1v, w2 per layer
    assert not [n.name for n in weight_matmuls if "QuantizeLinear" in consumers.get(n.output[0], [])]
    head = next(n for n in model.graph.node if "logits" in n.output)  # no QuantizeLinear/DequantizeLinear after it
    assert head.op_type == "Gemm" and _weight_types(model).get(head.input[1]) == onnx.TensorProto.FLOAT


def _predict_json(*args):
    r = mmlit("predict", *args, "--json", "--top-k", "3")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_predict_on_onnx_files_gives_the_checkpoints_predictions(world):
    val = world["data"] / "val"
    ref = _predict_json(world["ckpt"], val)
    assert len(ref) == 18
    # int8 dynamic quantization moves this tiny model's probabilities by a few points (0.055 at
    # most on the fixture trained from device-resident batches; 0.03 on the one before)
    for key, tol in (("fp32", 1e-4), ("dyn", 0.08)):
        got = _predict_json(world[key], val)
        assert [p["path"] for p in got] == [p["path"] for p in ref]
        for p, q in zip(got, ref):
            assert p["top"][0]["label"] == q["top"][0]["label"], key
            if key == "fp32":
                assert [t["label"] for t in p["top"]] == [t["label"] for t in q["top"]]
            for t in p["top"]:
                prob = next(u["prob"] for u in q["top"] if u["label"] == t["label"])
                assert abs(t["prob"] - prob) <= tol, (key, p["path"])


def _relabelled(world, root: Path) -> Path:
    """The world's dataset with 3 of its 18 val images filed under another class: top-1 is then
    neither 0 nor 100 %, while every format still gives PyTorch's prediction on every image."""
    data = root / "relabelled"
    shutil.copytree(world["data"], data)
    for name, to in (("red/red_000.png", "green"), ("red/red_001.png", "green"), ("blue/blue_000.png", "red")):
        shutil.move(data / "val" / name, data / "val" / to / Path(name).name)
    return data


def _weights_as_safetensors(ckpt: Path) -> tuple[int, int]:
    """(bytes of the checkpoint's weights - its tensors but the train state - saved alone as a
    safetensors file, bytes of those tensors' data alone)."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(ckpt), "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("train_state/")}
    return len(save(weights)), sum(v.numel() * v.element_size() for v in weights.values())


def test_benchmark_json_has_every_format_with_its_figures(world, tmp_path):
    """Each figure checked against one measured without the benchmark: top-1 against `eval` on
    the same (whole) split, PyTorch's MB against the checkpoint's weights, ONNX MB against the
    files `mmlit export` wrote, the ratios against the docs' formula (ratio of median latencies)."""
    from mmlit_cli.evaluate import evaluate_checkpoint

    from helpers import cpu_as_linux_tells_it

    data = _relabelled(world, tmp_path)
    r = mmlit("benchmark", world["ckpt"], "--dataset", data, "--json", "--calls", "12", "--limit", "100",
              "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [row["format"] for row in rep["rows"]] == list(FORMATS)
    # --limit above the split's 18 images: the whole split, as eval scores it
    assert rep["threads"] == 1 and rep["images"] == 18 and rep["calls"] == 12 and rep["batch_size"] == 4
    rows = {row["format"]: row for row in rep["rows"]}
    for key, row in rows.items():
        assert row["available"], row
        assert row["agreement"] >= 90 and row["images_per_s"] > 0
        assert 0 < row["latency_p10_ms"] <= row["latency_ms"] <= row["latency_p90_ms"], key  # median inside p10-p90

    # top-1: eval's on the same split (3 of 18 images filed under a class they are not)
    evaluated = evaluate_checkpoint(world["ckpt"], str(data), "val", device="cpu").result
    assert evaluated.num_images == 18 and 0 < evaluated.top1 < 100
    assert rows["pytorch-eager"]["top1"] == pytest.approx(evaluated.top1, abs=1e-9)
    assert rows["pytorch-eager"]["agreement"] == rows["pytorch-eager"]["router_agreement"] == 100.0
    for key, row in rows.items():  # each image predicted otherwise moves top-1 by 100/18 points at most
        assert abs(row["top1"] - evaluated.top1) <= 100.0 - row["agreement"] + 1e-9, key
    for key in ("pytorch-compiled", "onnx-fp32"):  # the same function: the same predictions
        assert rows[key]["agreement"] == 100.0 and rows[key]["top1"] == rows["pytorch-eager"]["top1"], key
    assert rows["onnx-fp32"]["router_agreement"] == 100.0
    assert all(rows[k]["router_agreement"] > 90 for k in FORMATS if k.startswith("onnx"))

    # MB: PyTorch's = the checkpoint's weights saved alone as safetensors (not the train state the
    # checkpoint also holds); ONNX = the file, as `mmlit export` writes it for the same checkpoint
    weights_file, weights_data = _weights_as_safetensors(world["ckpt"])
    # the tensors' data plus a header of names, dtypes and shapes (8 KiB at most for this tiny model's ~100
    # tensors); the checkpoint file is over twice that: it also holds AdamW's two moments per weight
    assert weights_data < weights_file <= weights_data + 8192 and 2 * weights_file < world["ckpt"].stat().st_size
    assert rows["pytorch-eager"]["size_bytes"] == rows["pytorch-compiled"]["size_bytes"] == weights_file
    assert rows["onnx-fp32"]["size_bytes"] == world["fp32"].stat().st_size
    assert rows["onnx-int8-dynamic"]["size_bytes"] == world["dyn"].stat().st_size
    # static: calibrated on other images than the exported file (other scales, the same graph)
    assert rows["onnx-int8-static"]["size_bytes"] == pytest.approx(world["static"].stat().st_size, rel=0.01)
    assert rows["onnx-int8-dynamic"]["size_bytes"] < rows["onnx-fp32"]["size_bytes"]

    # the ratios, as the docs define them: the int8 row's median latency over the base row's
    assert set(rep["ratios"]) == {f"{k} / {b}" for k in ("onnx-int8-dynamic", "onnx-int8-static")
                                  for b in ("onnx-fp32", "pytorch-eager")}
    for name, ratio in rep["ratios"].items():
        k, b = name.split(" / ")
        assert ratio == pytest.approx(rows[k]["latency_ms"] / rows[b]["latency_ms"], rel=1e-12), name

    linux = cpu_as_linux_tells_it()
    if linux is not None:  # the machine as /proc/cpuinfo names it
        assert (rep["machine"]["cpu"], rep["machine"]["cpu_id"]) == linux
    assert rep["machine"]["logical_cores"] == os.cpu_count() and rep["machine"]["torch"] == torch.__version__


ONNX_FORMATS = "onnx-fp32,onnx-int8-dynamic,onnx-int8-static"


def test_benchmark_lists_onnx_formats_as_missing_without_onnxruntime(world, tmp_path):
    """The compiled row is left out (`--formats`) for time: it is measured where it is the subject."""
    env = hiding(tmp_path, "onnxruntime")
    r = mmlit("benchmark", world["ckpt"], "--dataset", world["data"], "--json", "--calls", "3", "--limit", "6",
              "--formats", "pytorch-eager," + ONNX_FORMATS, env=env)
    assert r.returncode == 0, r.stderr
    rows = {row["format"]: row for row in json.loads(r.stdout)["rows"]}
    assert list(rows) == ["pytorch-eager"] + ONNX_FORMATS.split(",")
    row = rows["pytorch-eager"]  # measured: a median inside its own p10-p90
    assert row["available"] and 0 < row["latency_p10_ms"] <= row["latency_ms"] <= row["latency_p90_ms"]
    for key in ONNX_FORMATS.split(","):
        assert not rows[key]["available"] and 'pip install "mmlit[onnx]"' in rows[key]["note"]
        assert "onnxruntime" in rows[key]["note"] and rows[key]["latency_ms"] is None
    # only formats that cannot run here: a table of rows saying why, not a crash of the latency rounds
    table = mmlit("benchmark", world["ckpt"], "--dataset", world["data"], "--calls", "3", "--limit", "6",
                  "--formats", ONNX_FORMATS, env=env)
    assert table.returncode == 0, table.stderr
    assert table.stdout.count('needs pip install "mmlit[onnx]"') == 3 and "ONNX int8 static" in table.stdout
    rows = table.stdout.replace("as PyTorch eager", "")  # the footnote names the reference
    assert "PyTorch eager" not in rows and "PyTorch compiled" not in rows and "batch-1 latency" not in table.stderr


def test_formats_are_read_in_table_order_and_all_means_all():
    from mmlit_cli.deploy_benchmark import parse_formats

    assert parse_formats(None) == parse_formats("all") == parse_formats("all,onnx-fp32") == list(FORMATS)
    assert parse_formats(["onnx-fp32", " PyTorch-Eager "]) == ["pytorch-eager", "onnx-fp32"]
    with pytest.raises(MmlitError, match="unknown format 'tflite'"):
        parse_formats("onnx-fp32,tflite")


def test_benchmark_measures_the_formats_asked_for_and_no_other(world, tmp_path):
    """`--formats` (any order and case) gives those rows in the table's order; the others are
    neither built nor timed: no compilation, no static int8's calibration."""
    r = mmlit("benchmark", world["ckpt"], "--dataset", world["data"], "--calls", "3", "--limit", "6",
              "--formats", "onnx-int8-dynamic, PyTorch-Eager", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [row["format"] for row in rep["rows"]] == ["pytorch-eager", "onnx-int8-dynamic"]
    assert all(row["available"] and row["latency_ms"] > 0 for row in rep["rows"])
    assert {k: v is not None for k, v in rep["ratios"].items()} == {
        "onnx-int8-dynamic / onnx-fp32": False, "onnx-int8-dynamic / pytorch-eager": True,
        "onnx-int8-static / onnx-fp32": False, "onnx-int8-static / pytorch-eager": False}
    table = mmlit("benchmark", world["ckpt"], "--dataset", world["data"], "--calls", "3", "--limit", "6",
                  "--formats", "onnx-int8-dynamic,pytorch-eager")
    assert table.returncode == 0, table.stderr
    assert "ONNX int8 dynamic" in table.stdout and "compiled" not in table.stdout + table.stderr
    assert "static" not in table.stdout + table.stderr and "calibrating" not in table.stderr
    assert "int8-dynamic / pytorch-eager: " in table.stdout and "/ fp32" not in table.stdout


def test_benchmark_reports_a_failed_export_as_rows(world, monkeypatch):
    from mmlit_cli import export
    from mmlit_cli.deploy_benchmark import run_benchmark

    def fail(*args, **kwargs):
        raise MmlitError("ONNX export of the checkpoint failed (RuntimeError: planted)")

    monkeypatch.setattr(export, "trace_to_onnx", fail)
    report = run_benchmark(world["ckpt"], str(world["data"]), calls=2, limit=4, batch_size=64,
                           formats=["pytorch-eager", "onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static"])
    assert report.batch_size == 4  # 4 images: timed at a batch of 4, as the table's heading then says
    rows = {r.format: r for r in report.rows}
    assert list(rows) == [k for k in FORMATS if k != "pytorch-compiled"] and rows["pytorch-eager"].available
    for key in ("onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static"):
        assert not rows[key].available
        assert rows[key].note == "export failed: ONNX export of the checkpoint failed (RuntimeError: planted)"


def test_predict_says_when_it_predicts_a_file_named_twice_once(world):
    """One row per file: a file given twice (or in a folder given too) is predicted once, and a
    note says so, or rows zipped with the arguments would slip without a word."""
    folder = world["data"] / "val" / "red"
    first = sorted(folder.iterdir())[0]
    r = mmlit("predict", world["ckpt"], first, folder, first, "--json")
    assert r.returncode == 0, r.stderr
    assert [p["path"] for p in json.loads(r.stdout)] == [str(first)] + [str(f) for f in sorted(folder.iterdir())[1:]]
    assert "note: 2 name(s) of a file already named" in r.stderr and "predicted once" in r.stderr
    once = mmlit("predict", world["ckpt"], folder, "--json")
    assert once.returncode == 0 and "note" not in once.stderr


def test_without_the_onnx_extra_the_other_commands_still_work(world, tmp_path):
    env = hiding(tmp_path, "onnx", "onnxruntime", "onnxscript")
    r = mmlit("predict", world["ckpt"], world["data"] / "val" / "red", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 6
    assert mmlit("count-params", "--preset", "xxs", "--json", env=env).returncode == 0


BAD = [
    # (id, argv builder, modules to hide, expected text in the one-line message)
    ("int8 without onnxruntime", lambda w: ["export", w["ckpt"], "--int8", "--out", w["root"] / "n1.onnx"],
     ("onnxruntime",), 'needs the \'onnxruntime\' package: pip install "mmlit[onnx]"'),
    ("int8 without onnx", lambda w: ["export", w["ckpt"], "--int8", "--out", w["root"] / "n2.onnx"],
     ("onnx",), "needs the 'onnx' package"),
    ("calibrate: no such dataset", lambda w: ["export", w["ckpt"], "--int8", "--calibrate", w["root"] / "nope",
                                               "--out", w["root"] / "n3.onnx"], (), "nope"),
    ("calibrate: other classes", lambda w: ["export", w["ckpt"], "--int8", "--calibrate", w["root"] / "twoclass",
                                             "--out", w["root"] / "n4.onnx"], (), "where the checkpoint has"),
    ("calibrate without int8", lambda w: ["export", w["ckpt"], "--calibrate", w["data"], "--out", w["root"] / "n5.onnx"],
     (), "add --int8"),
    ("calibrate without int8, the default output there", lambda w: ["export", w["ckpt"], "--calibrate", w["data"]],
     (), "--calibrate is for int8 export: add --int8"),
    ("int8 output exists", lambda w: ["export", w["ckpt"], "--int8", "--out", w["static"]], (), "already exists"),
    ("out under a file", lambda w: ["export", w["ckpt"], "--out", w["ckpt"] / "sub" / "m.onnx"], (),
     "model.safetensors is a file, not a folder"),
    ("export: a file name without .onnx", lambda w: ["export", w["ckpt"], "--out", w["root"] / "model"], (),
     "an ONNX file's name ends in .onnx (a new folder's in /)"),
    ("export: an empty --out", lambda w: ["export", w["ckpt"], "--out", ""], (), "--out is empty"),
    ("predict: an empty --csv", lambda w: ["predict", w["ckpt"], w["data"], "--csv", ""], (), "--csv is empty"),
    ("predict: --csv names a link to nothing", lambda w: ["predict", w["ckpt"], w["data"], "--csv",
                                                          w["root"] / "dangling.csv"], (), "dangling.csv already exists"),
    ("predict: --csv names a folder", lambda w: ["predict", w["ckpt"], w["data"], "--csv", w["data"]], (),
     "colours is a folder: --csv takes a file name (e.g. "),
    ("predict: --csv ends in /", lambda w: ["predict", w["ckpt"], w["data"], "--csv", f"{w['root']}/new/"], (),
     "new/ is a folder: --csv takes a file name"),
    ("predict: --csv where no file can be written", lambda w: ["predict", w["ckpt"], w["data"], "--csv",
                                                                "/proc/mmlit/preds.csv"], (),
     "cannot write /proc/mmlit/preds.csv: /proc takes no new file"),
    ("predict: --csv under a file", lambda w: ["predict", w["ckpt"], w["data"], "--csv", w["ckpt"] / "p.csv"], (),
     "model.safetensors is a file, not a folder"),
    ("predict: not an onnx model", lambda w: ["predict", w["root"] / "notes.onnx", w["data"]], (), "not an ONNX model"),
    ("predict: onnx whose classes are not its logits", lambda w: ["predict", w["root"] / "two-names.onnx", w["data"]],
     (), "its metadata names 2 classes where its output 'logits' has 3"),
    ("predict: onnx without mmlit metadata", lambda w: ["predict", w["root"] / "bare.onnx", w["data"]], (),
     "no usable mmlit metadata"),
    ("predict onnx without onnxruntime", lambda w: ["predict", w["fp32"], w["data"]], ("onnxruntime",), "mmlit[onnx]"),
    ("benchmark: bad dataset", lambda w: ["benchmark", w["ckpt"], "--dataset", w["root"] / "nope"], (), "nope"),
    ("benchmark: an unknown format", lambda w: ["benchmark", w["ckpt"], "--formats", "pytorch-eager,onnx-fp16"], (),
     "--formats: unknown format 'onnx-fp16'; choose 'all' or some of pytorch-eager, pytorch-compiled"),
    ("benchmark: no format", lambda w: ["benchmark", w["ckpt"], "--formats", " , "], (), "--formats: no format in"),
    ("benchmark: zero threads", lambda w: ["benchmark", w["ckpt"], "--dataset", w["data"], "--threads", "0"], (),
     "--threads must be"),
]


def test_export_and_benchmark_take_a_relabelled_dataset_by_position_as_their_error_advises(world, tmp_path):
    """Other class names: both commands refuse in one line advising --classes-by-position, an
    option each of them has (they advised it without having it)."""
    renamed = tmp_path / "renamed"
    shutil.copytree(world["data"], renamed)
    for split in ("train", "val"):
        for i, cls in enumerate(sorted(p.name for p in (renamed / split).iterdir())):
            (renamed / split / cls).rename(renamed / split / f"k{i}")  # the same order, other names
    commands = {"export": ["export", world["ckpt"], "--int8", "--calibrate", renamed, "--out", tmp_path / "m.onnx"],
                "benchmark": ["benchmark", world["ckpt"], "--dataset", renamed, "--json", "--calls", "2",
                              "--formats", "pytorch-eager"]}
    for args in commands.values():
        assert_one_line_error(mmlit(*args), "pass --classes-by-position")
        done = mmlit(*args, "--classes-by-position")
        assert done.returncode == 0, done.stderr
    assert props(tmp_path / "m.onnx")["quantization"].startswith("int8")
    rows = {row["format"]: row for row in json.loads(done.stdout)["rows"]}
    assert rows["pytorch-eager"]["top1"] > 50  # scored with the classes in order, not shifted


def test_every_command_that_reads_a_split_says_which_files_it_could_not_decode(world, tmp_path):
    """eval, benchmark and export --calibrate left undecodable files out without a word (the
    training commands warned): each now warns on stderr, its --json output still one object."""
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    first = sorted((data / "val").iterdir())[0]
    (first / "broken.png").write_bytes(next(first.iterdir()).read_bytes()[:40])  # a truncated PNG
    said = "warning: skipped 1 unreadable image(s): "
    evaluated = mmlit("eval", world["ckpt"], "--dataset", data, "--json")
    assert evaluated.returncode == 0 and said in evaluated.stderr and "broken.png" in evaluated.stderr
    assert json.loads(evaluated.stdout)["skipped"] == [str(first / "broken.png")]
    benched = mmlit("benchmark", world["ckpt"], "--dataset", data, "--json", "--calls", "2",
                    "--formats", "pytorch-eager")
    assert benched.returncode == 0 and said in benched.stderr and json.loads(benched.stdout)["images"] == 18
    exported = mmlit("export", world["ckpt"], "--int8", "--calibrate", data, "--out", tmp_path / "m.onnx")
    assert exported.returncode == 0 and said in exported.stderr, exported.stderr


def test_an_out_with_a_trailing_slash_is_a_new_folder_for_the_export(world, tmp_path):
    """`--out exports/` names a folder: the export goes into it as <checkpoint>.onnx (it was
    written as a file called `exports`)."""
    made = mmlit("export", world["ckpt"], "--out", f"{tmp_path / 'exports'}/")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "exports" / "model.onnx").is_file()


def _snapshot(root: Path) -> dict:
    """Every file's bytes, and where every link points."""
    return {str(p): os.readlink(p) if p.is_symlink() else p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_deploy_input_is_one_line_nonzero_and_changes_nothing(case, world, tmp_path):
    _, build, hidden, needle = case
    before = _snapshot(world["root"])
    r = mmlit(*build(world), env=hiding(tmp_path, *hidden) if hidden else None)
    assert_one_line_error(r, needle)
    assert _snapshot(world["root"]) == before


# --------------------------------------------------------------------------------------------
# The library pieces, in-process
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads,kv,depth,qkv_bias,batch",
                         [(6, 3, 3, True, 3), (4, 2, 2, False, 1), (4, 4, 1, True, 1), (4, 1, 2, False, 5)])
def test_export_forms_compute_the_same_function_as_the_model(heads, kv, depth, qkv_bias, batch):
    from mmlit_cli.config import ModelConfig
    from mmlit_cli.export_forms import _ClassTokenAttention, _ExportAttention, _ExportMLiT, _ExportMoE, export_forms
    from mmlit_cli.model import MLiT, GroupedQueryAttention, MoEFeedForward

    torch.manual_seed(heads * 10 + kv)
    cfg = ModelConfig(image_size=12, patch_size=3, num_classes=7, embed_dim=24, depth=depth, num_heads=heads,
                      num_kv_heads=kv, qkv_bias=qkv_bias, mlp_hidden_first=8, mlp_hidden_last=8,
                      expert_stages=[kv + 2])
    model = MLiT(cfg).double().eval()
    for p in model.parameters():  # spread router logits and attention: distinct top-k, no uniform softmax
        torch.nn.init.normal_(p, std=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(batch, 3, 12, 12, dtype=torch.float64)
    ref = model(x)
    with export_forms(model):
        assert type(model) is _ExportMLiT
        assert [type(b.attn) for b in model.blocks] == [_ExportAttention] * (depth - 1) + [_ClassTokenAttention]
        assert all(type(b.ffn) is _ExportMoE for b in model.blocks)
        got = model(x)
    assert type(model) is MLiT
    assert all(type(b.attn) is GroupedQueryAttention and type(b.ffn) is MoEFeedForward for b in model.blocks)
    assert torch.allclose(got, ref, atol=1e-12)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_route_agreement_compares_expert_sets_not_orders():
    from mmlit_cli.quantize import _sorted_routes, route_agreement

    a = [_sorted_routes(np.array([[[0, 1], [2, 0]], [[1, 2], [0, 2]]])), _sorted_routes(np.array([[[3, 1]] * 2] * 2))]
    b = [_sorted_routes(np.array([[[1, 0], [0, 2]], [[2, 1], [0, 2]]])), _sorted_routes(np.array([[[1, 3]] * 2] * 2))]
    assert route_agreement(a, b) == 1.0
    b[1][1, 0] = [0, 1]
    assert route_agreement(a, b) == pytest.approx(7 / 8)
    # an export's last layer routes the class token (the first) only: the slots both have count
    assert route_agreement(a, [b[0], b[1][:, :1]]) == pytest.approx(5 / 6)
    assert route_agreement([a[0], a[1][:, :1]], b) == pytest.approx(5 / 6)
    with pytest.raises(MmlitError, match="MoE layer 1"):  # 2 tokens against 3: not an export's last layer
        route_agreement(a, [b[0], np.concatenate([b[1], b[1][:, :1]], axis=1)])
    with pytest.raises(MmlitError, match="MoE layer 1"):
        route_agreement(a, [b[0], b[1][:1]])
    with pytest.raises(MmlitError, match="MoE layers"):
        route_agreement(a, b[:1])


def test_router_agreement_sees_a_changed_router(world, tmp_path):
    from mmlit_cli.evaluate import load_classifier
    from mmlit_cli.quantize import graph_roles, measure_fidelity

    model, ckpt = load_classifier(world["ckpt"])
    proto = onnx.load(str(world["fp32"]))
    nodes = {n.name: n for n in proto.graph.node}
    first = next(nodes[n] for n in graph_roles(proto).router if nodes[n].op_type == "MatMul")
    weight = next(i for i in proto.graph.initializer if i.name == first.input[1])
    weight.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(weight), weight.name))
    onnx.save(proto, str(tmp_path / "flipped.onnx"))
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 12, 12), dtype=np.uint8)
    same = measure_fidelity(world["fp32"], model, ckpt.mean, ckpt.std, images, None, "random images")
    flipped = measure_fidelity(tmp_path / "flipped.onnx", model, ckpt.mean, ckpt.std, images, None, "random images")
    assert same.router_agreement == 1.0 and same.agreement == 1.0
    assert flipped.router_agreement < 0.9  # the first layer's top-2 of 3 becomes its bottom-2


def test_fidelity_tolerances():
    from mmlit_cli.quantize import Fidelity

    assert Fidelity(1000, "held-out images of x", 0.99, 1.0, 50.0, 49.5, True).failures() == []
    assert "agrees with PyTorch on 98.90 %" in Fidelity(1000, "held-out images of x", 0.989, 1.0).failures()[0]
    assert Fidelity(256, "random images", 0.96, 1.0).failures() == []  # random images: a coarse check
    assert Fidelity(256, "random images", 0.94, 1.0).failures()
    assert "more than 0.5 points lower" in Fidelity(1000, "x", 0.995, 1.0, 50.0, 49.4, True).failures()[0]
    assert Fidelity(1000, "x", 0.995, 1.0, 50.0, 51.0, True).failures() == []  # a gain is no failure


def _negate_logits(path) -> None:
    """Append a Neg to the graph output: top-1 becomes the least likely class."""
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        node.output[:] = ["pre_logits" if o == "logits" else o for o in node.output]
    proto.graph.node.append(onnx.helper.make_node("Neg", ["pre_logits"], ["logits"]))
    onnx.save(proto, str(path))


def test_static_int8_that_fails_the_check_falls_back_to_dynamic(world, tmp_path, monkeypatch):
    from mmlit_cli import quantize
    from mmlit_cli.export import export_onnx

    real = quantize.quantize_int8

    def broken_static(src, dst, scheme="dynamic", calibration=None):
        roles = real(src, dst, scheme, calibration)
        if scheme == "static":
            _negate_logits(dst)
        return roles

    monkeypatch.setattr(quantize, "quantize_int8", broken_static)
    result = export_onnx(world["ckpt"], tmp_path / "m.onnx", int8=True, calibrate=str(world["data"]))
    assert result.quantization == "int8 dynamic" and props(tmp_path / "m.onnx")["quantization"] == "int8 dynamic"
    assert result.note.startswith("static int8 failed the check (top-1 agrees with PyTorch on 0.00 %")
    assert result.fidelity.agreement == 1.0


def test_an_int8_model_that_fails_the_check_is_not_written(world, tmp_path, monkeypatch):
    from mmlit_cli import quantize
    from mmlit_cli.export import export_onnx

    real = quantize.quantize_int8

    def broken(src, dst, scheme="dynamic", calibration=None):
        roles = real(src, dst, scheme, calibration)
        _negate_logits(dst)
        return roles

    monkeypatch.setattr(quantize, "quantize_int8", broken)
    with pytest.raises(MmlitError, match="int8 check failed: top-1 agrees with PyTorch on"):
        export_onnx(world["ckpt"], tmp_path / "m.onnx", int8=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard links", "no hard links (vfat, some FUSE/SMB)"])
def test_atomic_write_without_replace_never_touches_an_existing_file(tmp_path, monkeypatch, hard_links):
    """Without replace the finished file is hard-linked to its name, which refuses a taken one; a
    filesystem without hard links (os.link: EPERM) claims the name exclusively instead: the
    export or CSV is written, never over another file (it failed after all the work)."""
    import errno

    from mmlit_cli.files import atomic_write

    if not hard_links:
        def no_link(src, dst):
            raise PermissionError(errno.EPERM, "Operation not permitted", src, dst)
        monkeypatch.setattr(os, "link", no_link)

    target = tmp_path / "out.onnx"
    target.write_text("mine")
    with pytest.raises(FileExistsError):
        atomic_write(target, lambda tmp: Path(tmp).write_text("new"), replace=False)
    late = tmp_path / "late.onnx"

    def write(tmp):  # another program creates the file while ours is being written
        late.write_text("theirs")
        Path(tmp).write_text("ours")

    with pytest.raises(FileExistsError):
        atomic_write(late, write, replace=False)
    assert target.read_text() == "mine" and late.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.onnx", "out.onnx"]  # no temp file left
    atomic_write(tmp_path / "fresh.onnx", lambda tmp: Path(tmp).write_text("ok"), replace=False)
    assert (tmp_path / "fresh.onnx").read_text() == "ok"


@pytest.mark.parametrize("n", [10, 12])
def test_the_images_per_second_pass_times_no_batch_shape_it_has_not_warmed_up(n, monkeypatch):
    """A compiled model compiles again on a batch shape it has not seen: the timed pass must
    meet only shapes the warm-up ran (a last batch of 10 % 4 = 2 images included)."""
    import mmlit_cli.deploy_benchmark as bench

    calls: list = []
    clock = bench.time.perf_counter
    monkeypatch.setattr(bench.time, "perf_counter", lambda: calls.append("clock") or clock())
    row = bench.Row("pytorch-compiled", FORMATS["pytorch-compiled"])
    runner = bench._Runner(row, lambda x: calls.append(len(x)) or np.zeros((len(x), 3), np.float32))
    images, labels = np.zeros((n, 3, 4, 4), np.uint8), np.zeros(n, np.int64)
    bench._accuracy_pass(runner, images, labels, labels, None, batch_size=4)
    start = calls.index("clock")
    timed = [c for c in calls[start:] if c != "clock"]
    assert sum(timed) == n and set(timed) <= set(calls[:start])
