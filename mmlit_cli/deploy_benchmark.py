"""`benchmark`: every format mmlit can ship a classifier in, side by side, in one process.

For one checkpoint and one dataset split it measures PyTorch eager, PyTorch compiled
(`torch.compile`), ONNX fp32, ONNX int8 dynamic and ONNX int8 static (calibrated on the
dataset's train split), or those of them `formats` names: the file size, top-1 on the split,
top-1 agreement with PyTorch eager, router agreement (share of token slots whose top-k expert
set equals eager PyTorch's), batch-1 latency (median of `calls` individually timed calls, with
the 10th/90th percentiles) and images/s at `batch_size`, all with `threads` intra-op threads
(default 1: the lowest-latency setting on a small CPU, and the same for every row).

The ONNX files are exported to a temporary folder exactly as `mmlit export` writes them.
Latency rounds rotate through the formats (as benchmarks/bench_models.py does) so that a
change in machine load hits every row alike. A format that cannot run here - onnx /
onnxruntime not installed, `torch.compile` without a working compiler - is a row that says
why, never a missing row.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data import Normalize, skipped_warning
from .errors import MmlitError, listed, one_line
from .evaluate import check_split, held_out_warning, load_classifier, load_eval_split, match_classes
from .onnx_classifier import PIP_HINT
from .runtime import cpu_info, forward_batch, is_compile_failure

FORMATS = {
    "pytorch-eager": "PyTorch eager",
    "pytorch-compiled": "PyTorch compiled",
    "onnx-fp32": "ONNX fp32",
    "onnx-int8-dynamic": "ONNX int8 dynamic",
    "onnx-int8-static": "ONNX int8 static",
}
WARMUP_CALLS = 20
ROUNDS = 6


def parse_formats(formats: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The formats to measure, in table order, from "all" (or None) or names separated by
    commas (`pytorch-eager,onnx-int8-dynamic`); an unknown name is an error naming the known."""
    if formats is None:
        return list(FORMATS)
    names = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [n.strip().lower() for n in names if isinstance(n, str) and n.strip()]
    if "all" in names:  # "all,onnx-fp32" too: all of them
        return list(FORMATS)
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        what = f"unknown format {listed([repr(n) for n in unknown])}" if unknown else f"no format in {formats!r}"
        raise MmlitError(f"--formats: {what}; choose 'all' or some of {', '.join(FORMATS)} (comma-separated)")
    return [k for k in FORMATS if k in names]


@dataclass
class Row:
    """One format's figures (None where a figure does not apply or the format is unavailable)."""

    format: str
    label: str
    available: bool = True
    note: str | None = None
    size_bytes: int | None = None
    top1: float | None = None  # percent
    agreement: float | None = None  # percent of images with eager PyTorch's top-1
    router_agreement: float | None = None  # percent of token slots with eager PyTorch's experts
    latency_ms: float | None = None  # batch 1, median
    latency_p10_ms: float | None = None
    latency_p90_ms: float | None = None
    images_per_s: float | None = None  # at the report's batch_size


@dataclass
class BenchmarkReport:
    checkpoint: str
    source: str
    split: str
    images: int
    threads: int
    batch_size: int
    calls: int
    machine: dict = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. undecodable files left out of the split

    def row(self, key: str) -> Row | None:
        """The row of format `key`; None where `formats` left it out."""
        return next((r for r in self.rows if r.format == key), None)

    def latency_ratio(self, key: str, base: str) -> float | None:
        a, b = self.row(key), self.row(base)
        if a is None or b is None or a.latency_ms is None or not b.latency_ms:
            return None
        return a.latency_ms / b.latency_ms

    def as_dict(self) -> dict:
        out = asdict(self)
        out["ratios"] = {f"{k} / {b}": self.latency_ratio(k, b)
                         for k in ("onnx-int8-dynamic", "onnx-int8-static")
                         for b in ("onnx-fp32", "pytorch-eager")}
        return out


@dataclass
class _Runner:
    row: Row
    run: Callable[[np.ndarray], np.ndarray]  # uint8 [N, 3, S, S] -> logits [N, C]
    route_model: bytes | None = None  # ONNX with the TopK outputs, for router agreement


def machine_info(threads: int) -> dict:
    """The CPU (`runtime.cpu_info`), core count and library versions."""
    cpu, cpu_id = cpu_info()
    info = {"cpu": cpu, "cpu_id": cpu_id, "logical_cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def _sample(data, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Up to `limit` images of a split (seeded, in split order) as uint8 NCHW + labels."""
    n = len(data)
    pick = np.arange(n) if not limit or limit >= n else np.sort(np.random.default_rng(0).permutation(n)[:limit])
    return data.images[pick].numpy(), data.labels[pick].numpy()


def _torch_runners(model, ckpt, wanted: list[str]) -> list[_Runner]:
    from safetensors.torch import save as save_safetensors

    size = len(save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}))

    normalize = Normalize(ckpt.mean, ckpt.std)

    def runner(m):
        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return forward_batch(m, torch.from_numpy(x), normalize, torch.device("cpu"), None).float().numpy()
        return run

    note = "size: the weights as safetensors"
    eager = Row("pytorch-eager", FORMATS["pytorch-eager"], size_bytes=size, note=note + "; the reference",
                router_agreement=100.0)
    runners = []
    if "pytorch-eager" in wanted:
        runners.append(_Runner(eager, runner(model)))
    if "pytorch-compiled" in wanted:
        runners.append(_Runner(Row("pytorch-compiled", FORMATS["pytorch-compiled"], size_bytes=size,
                                   note=note + "; router agreement not read under torch.compile"),
                               runner(torch.compile(model))))
    return runners


def _missing_onnx_packages() -> list[str]:
    import importlib
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _onnx_runners(model, ckpt, calib: np.ndarray | None, work: Path, threads: int, say,
                  wanted: list[str]) -> list[_Runner]:
    """Export the `wanted` ONNX models (fp32, the int8 ones quantized from it) into `work` and
    open each with ONNX Runtime."""
    from .export import _Preprocessed, finish_file, metadata, trace_to_onnx
    from .quantize import quantize_int8, with_route_outputs
    from .onnx_classifier import make_session

    wanted = [k for k in wanted if k.startswith("onnx-")]
    if not wanted:
        return []
    missing = _missing_onnx_packages()
    if missing:
        note = f"needs {PIP_HINT} (missing: {', '.join(missing)})"
        return [_Runner(Row(k, FORMATS[k], available=False, note=note), None) for k in wanted]
    say("exporting ONNX fp32")
    fp32 = work / "fp32.onnx"  # the int8 files are quantized from it, so it is written even if not wanted
    trace_to_onnx(_Preprocessed(model, ckpt.mean, ckpt.std).eval(), ckpt.image_size, fp32, 18, "the checkpoint")
    finish_file(fp32, metadata(ckpt))
    files = {"onnx-fp32": fp32} if "onnx-fp32" in wanted else {}
    for scheme in [s for s in ("dynamic", "static") if f"onnx-int8-{s}" in wanted]:
        say(f"quantizing int8 {scheme}" + (f" (calibrating on {len(calib)} train images)" if scheme == "static" else ""))
        files[f"onnx-int8-{scheme}"] = path = work / f"int8-{scheme}.onnx"
        quantize_int8(fp32, path, scheme, calib)
        finish_file(path, metadata(ckpt, f"int8 {scheme}"))
    runners = []
    for key, path in files.items():
        session = make_session(path, threads)
        run = (lambda s: lambda x: s.run(["logits"], {"images": np.ascontiguousarray(x)})[0])(session)
        runners.append(_Runner(Row(key, FORMATS[key], size_bytes=path.stat().st_size), run, with_route_outputs(path)))
    return runners


def _accuracy_pass(r: _Runner, images, labels, ref_top1, ref_routes, batch_size: int) -> None:
    """Top-1, agreement and images/s over the split (untimed warm-up first, on each batch shape
    the pass meets: a compiled model compiles again for a smaller last batch); router
    agreement from a second, untimed pass for ONNX rows."""
    from .quantize import onnx_outputs, route_agreement

    r.run(images[:batch_size])
    if len(images) % batch_size:
        r.run(images[-(len(images) % batch_size):])
    start = time.perf_counter()
    logits = np.concatenate([r.run(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    r.row.images_per_s = len(images) / (time.perf_counter() - start)
    top1 = logits.argmax(1)
    r.row.top1 = 100 * float((top1 == labels).mean())
    r.row.agreement = 100 * float((top1 == ref_top1).mean())
    if r.route_model is not None:
        r.row.router_agreement = 100 * route_agreement(ref_routes, onnx_outputs(r.route_model, images)[1])


def _latency(runners: list[_Runner], image: np.ndarray, calls: int) -> None:
    """Batch-1 latency: warm-up, then `ROUNDS` rounds rotating the order, calls split evenly."""
    times: dict[str, list[float]] = {r.row.format: [] for r in runners}
    for r in runners:
        for _ in range(WARMUP_CALLS):
            r.run(image)
    per_round = [calls // ROUNDS + (i < calls % ROUNDS) for i in range(ROUNDS)]
    for i, n in enumerate(per_round):
        for r in runners[i % len(runners):] + runners[:i % len(runners)]:
            for _ in range(n):
                t = time.perf_counter()
                r.run(image)
                times[r.row.format].append(time.perf_counter() - t)
    for r in runners:
        t = times[r.row.format]
        r.row.latency_ms = 1e3 * statistics.median(t)
        p10, p90 = np.percentile(t, [10, 90])
        r.row.latency_p10_ms, r.row.latency_p90_ms = 1e3 * float(p10), 1e3 * float(p90)


@contextmanager
def _quiet_torch_logs():
    """torch.compile's first call logs build notes (e.g. "No CUDA runtime is found") at WARNING."""
    loggers = [logging.getLogger(n) for n in ("torch.utils.cpp_extension", "torch._inductor", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_args(threads, batch_size, calls, limit, split) -> None:
    for name, value, low in (("--threads", threads, 1), ("--batch-size", batch_size, 1), ("--calls", calls, 1),
                             ("--limit", limit, 1)):
        if value is None and name == "--limit":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise MmlitError(f"{name} must be an integer >= {low}, got {value!r}")
    check_split(split)


def run_benchmark(ckpt_path: str | Path, dataset: str | None, split: str = "val", data_dir: str | None = None,
                  threads: int = 1, batch_size: int = 64, calls: int = 300, limit: int | None = 2000,
                  progress: Callable[[str], None] | None = None, classes_by_position: bool = False,
                  formats: str | list[str] | None = None) -> BenchmarkReport:
    """Measure every format (see the module docstring), or those `formats` names
    (`parse_formats`); `progress` gets one line per stage. Without a `dataset`, the one the
    checkpoint was trained on (`evaluate.load_eval_split`); `classes_by_position`: see
    `evaluate.match_classes`."""
    _check_args(threads, batch_size, calls, limit, split)
    wanted = parse_formats(formats)
    say = progress or (lambda _msg: None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(str(ckpt_path), dataset, split, data_dir, threads, batch_size, calls, limit, say,
                    classes_by_position, wanted)
    finally:
        torch.set_num_threads(before)


def _run(ckpt_path, dataset, split, data_dir, threads, batch_size, calls, limit, say,
         classes_by_position, wanted) -> BenchmarkReport:
    from .quantize import CALIBRATION_IMAGES, torch_outputs

    model, ckpt = load_classifier(ckpt_path, "cpu")
    cfg = ckpt.config
    data, name, note = load_eval_split(ckpt, ckpt_path, dataset, split, data_dir)
    if note is not None:
        say(note)
    # labels as the model means them
    data, _ = match_classes(data, ckpt.classes, cfg.model.num_classes, name, classes_by_position)
    images, labels = _sample(data, limit)
    if len(images) == 0:
        raise MmlitError(f"{name} '{split}' has no images")
    batch_size = min(batch_size, len(images))  # the batch the images/s are timed at (--limit 5: 5)
    warnings = [w for w in (skipped_warning(data.skipped), held_out_warning(ckpt, data, name, Path(ckpt_path).name))
                if w]
    report = BenchmarkReport(ckpt_path, data.source, split, len(images), threads, batch_size, calls,
                             machine_info(threads), warnings=warnings)
    say(f"reference: PyTorch eager on {len(images)} images")
    ref_logits, ref_routes = torch_outputs(model, images, ckpt.mean, ckpt.std, batch_size)
    ref_top1 = ref_logits.argmax(1)
    runners = _torch_runners(model, ckpt, wanted)
    with tempfile.TemporaryDirectory(prefix="mmlit-benchmark-") as work:
        calib = None
        if "onnx-int8-static" in wanted and not _missing_onnx_packages():
            train = data if split == "train" else load_eval_split(ckpt, ckpt_path, dataset, "train", data_dir)[0]
            calib = _sample(train, CALIBRATION_IMAGES)[0]
        try:
            runners += _onnx_runners(model, ckpt, calib, Path(work), threads, say, wanted)
        except MmlitError as exc:  # an export or quantization that fails here is a row, not the end
            runners += [_Runner(Row(k, FORMATS[k], available=False, note=f"export failed: {exc}"), None)
                        for k in wanted if k.startswith("onnx-")]
        live = []
        for r in runners:
            if r.run is None:
                continue
            say(f"{r.row.label}: top-1 and images/s at batch {batch_size}")
            try:
                with _quiet_torch_logs():
                    _accuracy_pass(r, images, labels, ref_top1, ref_routes, batch_size)
            except Exception as exc:  # noqa: BLE001 - e.g. torch.compile without a C++ compiler
                r.row.available = False
                # torch.compile's text goes on with pages of advice on logging: its first line
                r.row.note = f"cannot run here ({one_line(exc, limit=300, first_line=is_compile_failure(exc))})"
                continue
            live.append(r)
        if live:  # none where every format asked for is unavailable (onnx formats, onnxruntime missing)
            say(f"batch-1 latency: {calls} calls per format, {ROUNDS} rotating rounds")
            _latency(live, images[:1], calls)
        report.rows = [r.row for r in runners]
    return report
