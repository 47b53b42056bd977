"""Shared helpers of the mmlit benchmark scripts: machine description, timing, tables,
aten-op and FLOP counting, peak-throughput table, the CIFAR-10 folder.

Nothing here is part of the `mmlit_cli` package; the scripts import it as `common` (they put
this folder and the repository root on `sys.path`, so they run from a plain checkout).
"""

from __future__ import annotations

import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # benchmark the checkout, also when it is not pip-installed
    sys.path.insert(1, str(REPO))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from mmlit_cli.runtime import cpu_info, cpu_label, seconds_for  # noqa: E402

DEFAULT_CIFAR = Path("/tmp/cifar10/train")
CIFAR_TARBALLS = (REPO / "shared/data/cifar10-train-jpeg.tar.gz",
                  REPO.parent / "shared/data/cifar10-train-jpeg.tar.gz",
                  Path("/work/shared/data/cifar10-train-jpeg.tar.gz"))

# --------------------------------------------------------------------------- devices


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA GPU here (use --device cpu)")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, torch, threads and (on CUDA) the GPU."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    cpu, cpu_id = cpu_info()
    info: dict[str, Any] = {
        "cpu": cpu, "cpu_id": cpu_id, "logical_cores": os.cpu_count(), "usable_cores": usable,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "device": str(device),
    }
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                info["nvidia_smi"] = out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def machine_line(info: dict[str, Any]) -> str:
    text = (f"machine: {cpu_label(info['cpu'], info.get('cpu_id'))}, {info['usable_cores']} usable / {info['logical_cores']} logical cores, "
            f"torch {info['torch']}, {info['torch_threads']} intra-op threads, device {info['device']}")
    if "gpu" in info:
        text += (f"\n         GPU {info['gpu']} ({info['gpu_memory_gib']} GiB, sm {info['gpu_capability']}, "
                 f"CUDA {info['cuda']}{', ' + info['nvidia_smi'] if 'nvidia_smi' in info else ''})")
    return text


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], device: torch.device, repeat: int = 1) -> float:
    """Seconds for `repeat` calls of fn, synchronising the device before and after."""
    return seconds_for(fn, device, repeat)


def profile_lines(step: Callable[[], Any], steps: int, device: torch.device, top: int = 8) -> list[str]:
    """Where `steps` calls of `step` spend their time, by torch.profiler. On CUDA: the step's
    wall time, the share of it the device is busy (low: the host, launching kernels, is what
    the step waits for), kernels per step, and the top ops and kernels by device time. On
    other devices: the top ops by their own CPU time. The profiler adds host time of its own."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    step()  # not the first call: compilation, allocations, cuBLAS handles
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        wall = timed(step, device, repeat=steps)
    events = prof.key_averages()

    def rows(chosen, time_of, total):
        return [f"  {time_of(e) / 1000 / steps:8.3f} ms {time_of(e) / max(total, 1e-9):6.1%} "
                f"{e.count / steps:6.1f} x  {e.key[:100]}" for e in sorted(chosen, key=time_of, reverse=True)[:top]]

    lines = [f"profile of {steps} steps: {1000 * wall / steps:.2f} ms per step under the profiler"]
    if cuda:
        # record_function labels (Optimizer.step#AdamW.step, ...) show on the GPU timeline too,
        # spanning the kernels they launched: not kernels, and counted twice if kept
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        busy = sum(e.device_time_total for e in kernels)  # microseconds
        lines[0] += (f"; the device busy {busy / 1e6 / wall:.0%} of it; "
                     f"{sum(e.count for e in kernels) / steps:.0f} kernels per step")
        ops = [e for e in events if e.device_type == DeviceType.CPU and e.self_device_time_total > 0]
        lines += ["top ops by device time (per step, share, calls per step):",
                  *rows(ops, lambda e: e.self_device_time_total, busy),
                  "top kernels by device time:", *rows(kernels, lambda e: e.device_time_total, busy)]
    else:
        total = sum(e.self_cpu_time_total for e in events)
        lines += ["top ops by their own CPU time (per step, share, calls per step):",
                  *rows(events, lambda e: e.self_cpu_time_total, total)]
    return lines


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """(max - min) / median, a quick drift/noise indicator for a list of per-round figures."""
    if len(values) < 2:
        return 0.0
    m = median(values)
    return (max(values) - min(values)) / m if m else float("nan")


# --------------------------------------------------------------------------- tables


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """Plain-text table (first column left-aligned, the rest right-aligned): log-file friendly."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = []
    if title:
        out.append(title)
    out.append(line([str(h) for h in headers]))
    out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in rows]
    return "\n".join(out)


def fmt_num(x: float | None, digits: int = 0) -> str:
    if x is None or x != x:  # None or NaN
        return "-"
    return f"{x:,.{digits}f}"


def fmt_ratio(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.2f}x"


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write through a temporary file and rename it, so that a step killed mid-write leaves the
    previous complete file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def save_raw(path: str | os.PathLike | None, info: dict[str, Any], args: Any, results: Any,
             quiet: bool = False) -> None:
    """A benchmark's raw numbers (machine, arguments, results) as JSON at `path`, when given."""
    if path:
        write_json(path, {"machine": info, "args": vars(args), "results": results})
        if not quiet:
            print(f"raw numbers: {path}")


# --------------------------------------------------------------------------- op and FLOP counting

# aten ops that make the host wait for the device on CUDA (value-dependent output or a read-back).
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2",
                      "unique_dim", "unique_consecutive", "is_nonzero", "equal"})


class AtenOpCounter(TorchDispatchMode):
    """Counts every aten operator call that reaches the dispatcher's Python key.

    That is the op stream *below* autograd: forward ops, the backward ops the autograd
    engine runs (the mode is part of the thread-local state the engine carries into its
    worker threads), and the optimizer's ops. CompositeImplicitAutograd ops are seen as the
    ops they decompose into; view ops and `detach` count like any other call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(fn: Callable[[], Any]) -> AtenOpCounter:
    with AtenOpCounter() as counter:
        fn()
    return counter


def attention_op(counts: dict[str, int]) -> str:
    """Which attention kernel the op stream used (SDPA backend or the math fallback)."""
    names = [n for n in counts if "scaled_dot_product" in n or "multi_head_attention" in n
             or n in ("_efficient_attention_forward", "_flash_attention_forward")]
    fwd = [n for n in names if "backward" not in n]
    return ",".join(sorted(fwd or names)) or "math (bmm + softmax)"


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call as torch.utils.flop_counter counts them (matmuls, convs, attention).

    Attention runs on SDPA's math backend while counting, as `mmlit count-params` does: the
    counter's formula for the fused kernels rejects grouped K/V heads (torch 2.11 on CUDA
    raised "query/key/value shapes are incompatible"), and on CPU it counts them as zero.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, vendor data sheets. First match
# of the substring in the device name wins, so the specific names come first.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (reported as e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L4", 121.0),
)


def peak_bf16_flops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


# --------------------------------------------------------------------------- data


def ensure_cifar(path: Path) -> Path:
    """The CIFAR-10 JPEG folder; unpacked from the shared tarball when it is the default and missing."""
    path = Path(path)
    if path.is_dir():
        return path
    if path == DEFAULT_CIFAR:
        for tarball in CIFAR_TARBALLS:
            if tarball.is_file():
                print(f"unpacking {tarball} -> {path.parent}", flush=True)
                path.parent.mkdir(parents=True, exist_ok=True)
                with tarfile.open(tarball) as tar:
                    try:
                        tar.extractall(path.parent, filter="data")
                    except TypeError:  # Python without extraction filters
                        tar.extractall(path.parent)
                if path.is_dir():
                    return path
    raise SystemExit(f"dataset folder {path} not found (CIFAR-10 JPEG folder: mkdir -p /tmp/cifar10 && "
                     f"tar xzf <shared>/data/cifar10-train-jpeg.tar.gz -C /tmp/cifar10)")


def subset_folder(src: Path, per_class: int, dst_root: Path) -> Path:
    """An ImageFolder of symlinks to the first `per_class` images of each class of `src`."""
    dst = dst_root / f"{src.name}-{per_class}"
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        out = dst / cls.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            link = out / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return dst


def holdout_folder(src: Path, per_class: int, holdout: int, dst_root: Path) -> Path:
    """`dst_root/<src.name>-<per_class>+<holdout>/{train,val}/<class>/`: symlinks to the first
    `per_class` images of each class of `src` (sorted by name) in train/ and the last
    `holdout` in val/ (issue 11's split: CIFAR-10's last 500 per class held out)."""
    dst = dst_root / f"{src.name}-{per_class}+{holdout}"
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        if per_class + holdout > len(files):
            raise SystemExit(f"{cls} has {len(files)} images, fewer than {per_class} + {holdout}")
        for part, chosen in (("train", files[:per_class]), ("val", files[len(files) - holdout:])):
            out = dst / part / cls.name
            out.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                link = out / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return dst
