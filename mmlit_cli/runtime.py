"""Where and how a model runs: the device, the autocast dtype, torch.compile, the process
group under torchrun, the one way a batch goes through a model (`forward_batch`), how SDPA is
best called for the model's attention there (`tune_attention`), and which CPU it runs on
(`cpu_info`).

Training, evaluation, `predict` and `export` all take these from here, so evaluation never
needs the training engine, and every path feeds a model the same way.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from .errors import MmlitError, one_line

T = TypeVar("T")


# --------------------------------------------------------------------------- devices and compile


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; a bare GPU number `N` is `cuda:N`, as in
    Ultralytics' `device=0`. Asking for a device that is not there is an error."""
    given = name
    if name.isascii() and name.isdigit():
        name = f"cuda:{int(name)}"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MmlitError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N (or N) or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MmlitError(f"--device {given}: no CUDA GPU is available here (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MmlitError(f"--device {given}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MmlitError(f"--device {given}: MPS is not available here")
    return device


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype mmlit trains and infers in: bf16 on CUDA, none (fp32) elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def check_compile_mode(mode: str | None) -> None:
    if mode not in (None, *COMPILE_MODES):
        raise MmlitError(f"--compile-mode must be {', '.join(COMPILE_MODES[:-1])} or {COMPILE_MODES[-1]}, got '{mode}'")


def compile_failure(exc: BaseException) -> str:
    """What broke torch.compile, in a line: its type and first line (inductor's text goes on with
    pages of advice on logging)."""
    return one_line(exc, limit=300, first_line=True)


# what torch.compile raises when it, not the model, broke: its backend (inductor, its C compiler,
# Triton, its cache) or dynamo itself. Dynamo's TorchRuntimeError is the model's own error met
# while tracing (a shape mismatch...), and is not one of them.
_COMPILE_FAILURES = ("BackendCompilerFailed", "InternalTorchDynamoError")


def is_compile_failure(exc: BaseException) -> bool:
    """Whether torch.compile raised `exc` because it broke (`_COMPILE_FAILURES`, or anything of
    inductor's) rather than the model. Told by the exception's class, so that torch._dynamo need
    not be imported to ask."""
    return any(c.__module__.startswith("torch._inductor")
               or (c.__module__.startswith("torch._dynamo") and c.__name__ in _COMPILE_FAILURES)
               for c in type(exc).__mro__)


# what a collective raises in a process whose peer died (killed, out of memory, its machine
# gone): gloo's and NCCL's words for a lost connection, or torch's DistBackendError
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")


def peer_failure(exc: BaseException) -> str | None:
    """When `exc` is this process's side of another process of the run stopping (under torchrun),
    what it said, in a line; else None. Told by the class's name, as for compile failures."""
    world = os.environ.get("WORLD_SIZE", "1")  # unchecked here: this runs in the error handler itself
    if not world.isdigit() or int(world) <= 1:
        return None
    backend = any(c.__name__ == "DistBackendError" for c in type(exc).__mro__)
    if backend or (isinstance(exc, RuntimeError) and any(words in str(exc) for words in _PEER_LOST)):
        return one_line(exc, limit=200, first_line=True)
    return None


def maybe_compile(module: torch.nn.Module, compile: bool = False, mode: str | None = None):
    """`torch.compile(module)` when asked (a `mode` implies it), else the module itself.

    Tiny models on a GPU are launch-bound: "reduce-overhead" / "max-autotune" add CUDA graphs.
    """
    check_compile_mode(mode)
    if not (compile or mode):
        return module
    return torch.compile(module, mode=None if mode in (None, "default") else mode)


# --------------------------------------------------------------------------- attention kernels

# A layout must beat the one in use by this much to replace it: timing noise is not a reason.
ATTENTION_MARGIN = 0.9


def wait_for_device(device: torch.device) -> None:
    """Wait until `device` has run all the work queued on it (CUDA runs behind the host: a clock
    read without this waits for nothing). Nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_for(call: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Seconds for `calls` calls of `call`, the device synchronised before and after."""
    wait_for_device(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    wait_for_device(device)
    return time.perf_counter() - start


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` with kernel layouts (`GroupedQueryAttention`), in module order."""
    return [m for m in model.modules() if hasattr(m, "kernel_layouts")]


def attention_inputs(model: torch.nn.Module, example: torch.Tensor, amp_dtype: torch.dtype | None) -> dict:
    """{attention module: (shape, dtype) of its input} in one forward of `example` through
    `model` (no grad, under autocast, the RNG streams untouched)."""
    seen, hooks = {}, []

    def record(module: torch.nn.Module, args: tuple) -> None:
        seen.setdefault(module, (tuple(args[0].shape), args[0].dtype))

    for m in attention_modules(model):
        hooks.append(m.register_forward_pre_hook(record))
    try:
        with torch.random.fork_rng(devices=rng_devices(example.device)), torch.no_grad(), \
                torch.autocast(example.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def tune_attention(model: torch.nn.Module, example: torch.Tensor, amp_dtype: torch.dtype | None,
                   calls: int = 10, rounds: int = 3,
                   time_layout: Callable[..., float] | None = None) -> str:
    """Give each attention module of `model` the kernel layout (`GroupedQueryAttention.
    kernel_layouts`: heads zero-padded, K/V repeated; the same values up to rounding) whose
    forward + backward is fastest at the run's shapes, measured on `example`'s device in
    `amp_dtype`; returns a note saying what was chosen ("" when nothing changed). Which of
    SDPA's kernels take mLiT's 18-wide grouped heads depends on the GPU and the torch build, so
    it is measured, not assumed. Modules with the same shape share one measurement; the layouts
    alternate over `rounds`, and one replaces the layout in use only when it is clearly faster
    (`ATTENTION_MARGIN`), or when the layout in use failed (out of memory, say) and it did not.
    `time_layout(module, layout)`, seconds per call, replaces the measurement (tests)."""
    device = example.device
    groups: dict[tuple, list[torch.nn.Module]] = {}
    for m, (shape, dtype) in attention_inputs(model, example, amp_dtype).items():
        key = (m.num_heads, m.num_kv_heads, m.head_dim, m.qkv.bias is not None, shape, dtype, m.kernel_layout())
        groups.setdefault(key, []).append(m)
    notes = []
    for (heads, kv_heads, head_dim, _, shape, dtype, current), modules in groups.items():
        probe = modules[0]
        times: dict[tuple[int, bool], list[float]] = {}
        failed: dict[tuple[int, bool], str] = {}
        try:
            for _ in range(rounds):
                for layout in (lay for lay in probe.kernel_layouts() if lay not in failed):
                    try:
                        times.setdefault(layout, []).append(
                            time_layout(probe, layout) if time_layout else
                            _time_layout(probe, layout, shape, dtype, amp_dtype, calls, device))
                    except RuntimeError as e:  # out of memory, or a kernel that failed on this device
                        failed[layout] = type(e).__name__
                        times.pop(layout, None)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
        finally:
            probe.set_kernel_layout(*current)
        median = {lay: sorted(t)[len(t) // 2] for lay, t in times.items()}
        if not median:
            continue
        best = min(median, key=median.get)
        if best == current or (current in median and median[best] > ATTENTION_MARGIN * median[current]):
            continue
        for m in modules:
            m.set_kernel_layout(*best)
        width, repeat = best
        how = ", ".join(([f"heads padded to {width}"] if width != head_dim else [])
                        + (["K/V repeated"] if repeat else [])) or "as built"
        against = (f"{1000 * median[current]:.2f} ms" if current in median
                   else f"the layout as built, which failed here ({failed[current]})")
        notes.append(f"attention {heads}/{kv_heads} heads x {head_dim} ({len(modules)} layers): {how}, "
                     f"{1000 * median[best]:.2f} ms fwd+bwd against {against}")
    return "; ".join(notes)


def attention_layouts(model: torch.nn.Module) -> list[tuple[int, bool]]:
    """The kernel layout of each attention module of `model`, in module order."""
    return [m.kernel_layout() for m in attention_modules(model)]


def choose_attention_layouts(model: torch.nn.Module, example: torch.Tensor, amp_dtype: torch.dtype | None,
                             dist: Dist) -> str:
    """`tune_attention` for a run: a measurement that breaks leaves every layer as built (a
    speed-up that fails is a line, not the end of the run), and under torchrun every rank runs
    rank 0's choice, the one its note names (each rank timed its own GPU). Returns the note."""
    modules = attention_modules(model)
    as_built = attention_layouts(model)
    try:
        note = tune_attention(model, example, amp_dtype)
    except Exception as e:  # noqa: BLE001
        for m, layout in zip(modules, as_built):
            m.set_kernel_layout(*layout)
        note = f"attention kernel layouts not measured ({one_line(e)}); running them as built"
    for m, layout in zip(modules, from_rank0(attention_layouts(model), dist), strict=True):
        m.set_kernel_layout(*layout)
    return note


def _time_layout(module: torch.nn.Module, layout: tuple[int, bool], shape: tuple, dtype: torch.dtype,
                 amp_dtype: torch.dtype | None, calls: int, device: torch.device) -> float:
    """Seconds per forward + backward of `module` in `layout` on random input of `shape`; the
    gradients are returned, not accumulated into the parameters."""
    module.set_kernel_layout(*layout)
    x = torch.randn(shape, generator=torch.Generator(device).manual_seed(0), dtype=dtype, device=device,
                    requires_grad=True)  # its own generator: the run's RNG streams stay as they were
    params = [p for p in module.parameters() if p.requires_grad]

    def call():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = module(x)
        torch.autograd.grad(out, [x, *params], torch.ones_like(out))

    call()  # warm-up: kernel selection, allocator
    return seconds_for(call, device, calls) / calls


# --------------------------------------------------------------------------- torchrun (DDP)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # the process group was started here (and is ended by `end_distributed`)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Read torchrun's environment; start the process group (nccl on CUDA, gloo otherwise)."""
    world = process_count()
    if world <= 1:
        device = resolve_device(device_name)
        if device.type == "cuda" and device.index is not None:
            # --device cuda:N: what runs on "the current device" (streams, events, cuBLAS
            # handles, the pin-memory thread) runs on N too, not also on cuda:0
            torch.cuda.set_device(device)
        return Dist(), device
    dist = Dist(process_rank(), world, _launch_number("LOCAL_RANK", 0, 0))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        _init_process_group("nccl" if device.type == "cuda" else "gloo", dist)
        dist.owns_group = True
    return dist, device


def _init_process_group(backend: str, dist: Dist) -> None:
    """The default process group. Under torchrun with restarts (`--max-restarts N`) its store
    is a new one for each attempt, served by rank 0 on the port after torchrun's MASTER_PORT:
    torchrun's own store outlives an attempt, and the ranks' addresses that the previous
    attempt left in it make a rank of the next one connect to a dead peer ("Connection
    refused", pytorch/pytorch#167288). A prefix by the restart count is not enough: on several
    machines the agents count their restarts differently."""
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # not with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0 or not shared or "MASTER_ADDR" not in os.environ:
        torch.distributed.init_process_group(backend)
        return
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 1,
                                       dist.world_size, is_master=dist.rank == 0, wait_for_workers=False,
                                       timeout=torch.distributed.constants.default_pg_timeout)
    torch.distributed.init_process_group(backend, store=store, rank=dist.rank, world_size=dist.world_size)


def end_distributed(dist: Dist) -> None:
    """End the process group `setup_distributed` started, once every rank got here: a process
    leaving with its group alive may abort at exit ("terminate called without an active
    exception"), e.g. when it stops before rank 0 has written the last checkpoint."""
    if dist.owns_group and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        dist.owns_group = False


def _launch_number(name: str, default: int, least: int) -> int:
    """An integer torchrun puts in the environment (`name`), checked: set by hand, it may not be."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = least - 1
    if value < least:
        raise MmlitError(f"{name}={raw!r} in the environment: it must be an integer >= {least} (torchrun sets it; "
                         f"unset it to run one process)")
    return value


def process_count() -> int:
    """Processes in this run: torchrun's WORLD_SIZE, else 1. Several need the RANK of this one
    and the MASTER_ADDR/MASTER_PORT of rank 0 (torchrun sets all four); a hand-set environment
    missing one of them is a one-line `MmlitError`."""
    world = _launch_number("WORLD_SIZE", 1, 1)
    if world > 1:
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise MmlitError(f"WORLD_SIZE={world} in the environment, but no {' or '.join(missing)}: launch the "
                             f"processes with torchrun (or unset WORLD_SIZE to run one)")
    return world


def process_rank() -> int:
    """This process's rank under torchrun (RANK), else 0; checked against WORLD_SIZE."""
    world = process_count()
    rank = _launch_number("RANK", 0, 0)
    if rank >= world:
        raise MmlitError(f"RANK={rank} in the environment, with {world} process(es) (WORLD_SIZE): ranks are "
                         f"0 to {world - 1}; launch with torchrun, or unset RANK to run one process")
    return rank


def local_process_count() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE), else 1."""
    return _launch_number("LOCAL_WORLD_SIZE", 1, 1)


def all_reduce_mean(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:  # in place: callers pass a tensor of their own
        torch.distributed.all_reduce(t)
        t /= dist.world_size
    return t


def agreed_stop(signum: int, diverged: bool, dist: Dist, device: torch.device) -> tuple[int, bool]:
    """(the stop signal of any rank, the highest number when several; whether any rank's
    loss diverged), the same on every rank: a collective. What reaches only some ranks stops
    them all at the same step."""
    if not dist.enabled:
        return signum, diverged
    t = torch.tensor([signum, int(diverged)], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t[0]), bool(t[1])


def from_rank0(value: T, dist: Dist) -> T:
    """`value` as rank 0 holds it, on every rank (a collective; picklable values)."""
    if not dist.enabled:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def ranks_agree(value: int, dist: Dist, device: torch.device) -> bool:
    """Whether every rank holds the same `value` (a collective)."""
    if not dist.enabled:
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t[0]) == -int(t[1])


def wrap_ddp(model: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """`model` under DistributedDataParallel when this is a torchrun process, else itself."""
    if not dist.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def ranks_in_sync(model: torch.nn.Module, dist: Dist) -> bool:
    """Whether every rank holds the same weights (two checksums, gathered; a collective)."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    checksum = torch.stack([flat.sum(), flat.abs().sum()]).double()
    gathered = [torch.zeros_like(checksum) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def rng_devices(device: torch.device) -> list:
    """The devices whose generators `torch.random.fork_rng` must save besides the CPU's."""
    return [device] if device.type == "cuda" else []


# --------------------------------------------------------------------------- one batch through a model


def forward_batch(forward: Callable[[torch.Tensor], T], images: torch.Tensor, normalize: Callable,
                  device: torch.device, amp_dtype: torch.dtype | None) -> T:
    """`forward(x)` for a batch of uint8 `images`: `x` is the batch moved to `device` (without
    blocking) and normalised there by `normalize` (a `data.Normalize` made once per loop), and
    the call runs under the autocast mmlit trains and infers in (`amp_dtype`)."""
    x = normalize(images.to(device, non_blocking=True))
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return forward(x)


# the widest SIMD extension for int8 / fp32 matmuls, best first: latency ratios depend on it
_SIMD = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2", "asimddp", "asimd")


def cpu_info() -> tuple[str, str | None]:
    """The CPU's model name and, on Linux, its family/model and widest SIMD extension, e.g.
    ("AMD EPYC", "family 25 model 17, avx512_vnni"): one model name can hide different
    microarchitectures, and speed ratios move with them."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            first_cpu = f.read().split("\n\n")[0]
    except OSError:
        return name, None
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first_cpu.splitlines() if ":" in line)}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    simd = next((x for x in _SIMD if x in flags), None)
    parts = [f"family {fields['cpu family']} model {fields.get('model', '?')}"] if "cpu family" in fields else []
    return fields.get("model name", name), ", ".join(parts + ([simd] if simd else [])) or None


def cpu_label(cpu: str, cpu_id: str | None) -> str:
    """`cpu_info` as one phrase for a machine line: "AMD EPYC (family 25 model 17, avx512_vnni)"."""
    return f"{cpu} ({cpu_id})" if cpu_id else cpu
