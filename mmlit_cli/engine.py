"""One training engine for `finetune` (classification) and `pretrain` (MAE).

    fit(): for epoch: for batch: forward (bf16 autocast on CUDA) -> backward -> clip ->
           AdamW step (lr: linear warm-up, then cosine) -> EMA
           end of epoch: validate -> metrics.jsonl/.csv -> last/best.safetensors

A task object (`ClassifyTask`, `MAETask`) says what the model is, what its loss is and how
it is validated; everything else - devices, DDP, checkpoints, resume, signals, logging -
lives here once. The hot loop keeps losses on the device and syncs with the host only when
it prints.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import __version__
from .checkpoint import Checkpoint, atomic_write_text, save_checkpoint
from .config import Config, TrainConfig, dump_config
from .data import ImageData, Normalize, build_batch_mix, build_loader, build_train_transform, set_epoch
from .errors import MmlitError
from .metrics import collapsed_layers, evaluate_classifier, finish_usage_tracking, unwrap_model

# --------------------------------------------------------------------------- devices and DDP


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu. Asking for a device that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MmlitError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MmlitError(f"--device {name}: no CUDA GPU is available here (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MmlitError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MmlitError(f"--device {name}: MPS is not available here")
    return device


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype mmlit trains and infers in: bf16 on CUDA, none (fp32) elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def check_compile_mode(mode: str | None) -> None:
    if mode not in (None, *COMPILE_MODES):
        raise MmlitError(f"--compile-mode must be {', '.join(COMPILE_MODES[:-1])} or {COMPILE_MODES[-1]}, got '{mode}'")


def maybe_compile(module: torch.nn.Module, compile: bool = False, mode: str | None = None):
    """`torch.compile(module)` when asked (a `mode` implies it), else the module itself.

    Tiny models on a GPU are launch-bound: "reduce-overhead" / "max-autotune" add CUDA graphs.
    """
    check_compile_mode(mode)
    if not (compile or mode):
        return module
    return torch.compile(module, mode=None if mode in (None, "default") else mode)


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
        return Dist(), resolve_device(device_name)
    dist = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        dist.owns_group = True
    return dist, device


def end_distributed(dist: Dist) -> None:
    """End the process group `setup_distributed` started, once every rank got here: a process
    leaving with its group alive may abort at exit ("terminate called without an active
    exception"), e.g. when it stops before rank 0 has written the last checkpoint."""
    if dist.owns_group and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        dist.owns_group = False


def process_count() -> int:
    """Processes in this run: torchrun's WORLD_SIZE, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_resume_world_size(saved: int) -> None:
    """A run resumes with the process count it was trained with: each process's random
    generators and data shard are part of its state."""
    now = process_count()
    if saved != now:
        how = f"torchrun --nproc-per-node {saved}" if saved > 1 else "a single process, without torchrun"
        raise MmlitError(f"this run was trained with {_processes(saved)}, not {now}: resume it with {how}")


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")


def all_reduce_mean(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:  # in place: callers pass a tensor of their own
        torch.distributed.all_reduce(t)
        t /= dist.world_size
    return t


# --------------------------------------------------------------------------- optimisation


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: no decay on norms, biases, tokens and position embeddings; with
    `layer_decay < 1`, lr scale `layer_decay ** (depth + 1 - layer_id)` (BEiT/MAE fine-tuning)."""
    no_decay = set(getattr(model, "no_weight_decay", lambda: set())())
    depth = getattr(getattr(model, "cfg", None), "depth", 0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in no_decay
        layer = model.layer_id(name) if layer_decay < 1.0 and hasattr(model, "layer_id") else depth + 1
        key = (layer, decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": layer_decay ** (depth + 1 - layer) if layer_decay < 1.0 else 1.0}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_adamw(groups: list[dict], lr: float, betas, device: torch.device) -> torch.optim.AdamW:
    """AdamW as the engine runs it: fused on CUDA; the multi-tensor (foreach) path elsewhere,
    ~5x fewer aten ops per step than the per-parameter loop PyTorch picks by default on CPU."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused, foreach=None if fused else True)


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from 0 to `lr`, then cosine down to `min_lr`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


EMA_WARMUP_POWER = 2 / 3


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of the EMA update that follows `updates` earlier ones: timm's exponential
    warm-up (`ModelEmaV3(use_warmup=True)`, gamma 1, power 2/3), `1 - (1 + n) ** -2/3`, capped
    at `decay`. The first update copies the weights (0); the 10th uses 0.80, the 1000th 0.99.
    Without it a decay of 0.9998 keeps ~exp(-0.0002 n) of the initial weights after n steps:
    a short run's average (and its best.safetensors) stayed close to the initialisation."""
    return min(decay, 1.0 - (1.0 + updates) ** -EMA_WARMUP_POWER)


class ModelEMA:
    """Exponential moving average of the weights (evaluated and saved as best when enabled),
    with the decay warmed up over the first updates (`ema_decay_at`).

    `module` is a copy of the model made once; `shadow` is its state dict (same storage), so
    evaluating the average needs no copy and updating it is one multi-tensor lerp per step.
    `updates` (the warm-up's clock) is part of the training state.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        from copy import deepcopy

        self.decay = decay
        self.updates = 0
        self.module = deepcopy(model).requires_grad_(False)
        self.shadow = self.module.state_dict()
        live = model.state_dict()  # detached views of the live tensors: updated in place by the optimizer
        pairs = [(self.shadow[k], v) for k, v in live.items()]
        self._float = [list(t) for t in zip(*[(s, v) for s, v in pairs if v.dtype.is_floating_point])] or [[], []]
        self._other = [(s, v) for s, v in pairs if not v.dtype.is_floating_point]

    @torch.no_grad()
    def update(self) -> None:
        decay = ema_decay_at(self.decay, self.updates)
        if self._float[0]:
            torch._foreach_lerp_(self._float[0], self._float[1], 1.0 - decay)
        for s, v in self._other:
            s.copy_(v)
        self.updates += 1


# --------------------------------------------------------------------------- tasks


class ClassifyTask:
    """Supervised classification with mixup/cutmix targets and label smoothing."""

    kind = "classify"
    monitor = "val_top1"  # higher is better

    def __init__(self, cfg: Config, classes: list[str]):
        from .model import MLiT

        self.cfg, self.classes = cfg, classes
        self.model = MLiT(cfg.model)
        self.recipe = cfg.finetune
        self.mix = build_batch_mix(self.recipe.augment, cfg.model.num_classes)

    def loss(self, model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        else:
            targets = labels
        logits = model(images)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.recipe.label_smoothing)
        aux = self.model.aux_loss()
        return loss if aux is None else loss + aux

    def validate(self, model, loader, device, amp_dtype) -> dict[str, Any]:
        r = evaluate_classifier(model, loader, device, self.cfg.data.mean, self.cfg.data.std, amp_dtype,
                                self.cfg.model.num_classes)
        return {"val_loss": r.loss, "val_top1": r.top1, "val_top5": r.top5, "expert_usage": r.expert_usage}


class MAETask:
    """Masked auto-encoder pre-training; validation is the reconstruction loss."""

    kind = "mae"
    monitor = "val_loss"  # lower is better

    def __init__(self, cfg: Config, classes: list[str]):
        from .mae import MaskedAutoencoder

        self.cfg, self.classes = cfg, classes
        self.model = MaskedAutoencoder(cfg.model, cfg.mae)
        self.recipe = cfg.pretrain

    def loss(self, model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, _, _ = model(images)
        aux = self.model.aux_loss()
        return loss if aux is None else loss + aux

    @torch.inference_mode()
    def validate(self, model, loader, device, amp_dtype) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        encoder = unwrap_model(model).encoder
        encoder.set_usage_tracking(True)
        total = torch.zeros(2, dtype=torch.float64, device=device)
        normalize = Normalize(self.cfg.data.mean, self.cfg.data.std, device)
        with torch.random.fork_rng(devices=_rng_devices(device)):
            torch.manual_seed(1234)  # the same masks every epoch, so val losses are comparable
            for images, _ in loader:
                images = normalize(images.to(device, non_blocking=True))
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, _, _ = model(images)
                total += torch.stack([loss.double() * images.shape[0],
                                      torch.full((), float(images.shape[0]), dtype=torch.float64, device=device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        usage = finish_usage_tracking(encoder)
        model.train(was_training)
        loss_sum, count = total.tolist()
        return {"val_loss": loss_sum / max(count, 1.0), "expert_usage": usage}


# --------------------------------------------------------------------------- the run


class LaggedScalar:
    """The loss shown on the progress bar, read without stalling the GPU.

    On CUDA the value of a logging window is copied to pinned host memory without blocking
    and read at the next window, when the copy has long finished: the hot loop never waits
    for the device. On CPU there is nothing to wait for and the value is read at once.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: tuple[torch.Tensor, Any] | None = None

    def exchange(self, value: torch.Tensor) -> float | None:
        """Hand over this window's value; get the newest value that is ready (None at first)."""
        if self.device.type != "cuda":
            return value.item()
        ready = None
        if self.pending is not None:
            host, event = self.pending
            event.synchronize()  # recorded a whole window ago: already complete in practice
            ready = host.item()
        host = torch.empty((), dtype=value.dtype, pin_memory=True)
        host.copy_(value.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (host, event)
        return ready


@dataclass
class RunOptions:
    out_dir: Path
    dataset: dict[str, Any]  # how to load the data again on --resume
    device: str = "auto"
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode: None/"default", "reduce-overhead", "max-autotune"
    save_every: int = 200  # steps between in-epoch checkpoints (0 = only at epoch ends)
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests, benchmarks)
    log_every: int = 10
    # Layer-wise lr decay of the param groups: the recipe's when the run started from a
    # pre-trained encoder (--init), else 1. Kept in the training state: --resume must rebuild
    # the very groups the saved optimizer state belongs to.
    layer_decay: float = 1.0
    on_epoch_end: Callable[..., None] | None = None  # e.g. write reconstruction.png
    quiet: bool = False
    # False when validation is the test split (the paper protocol): a checkpoint picked on it
    # would be selected on the test set, so only last.safetensors is kept.
    save_best: bool = True


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's generators: {"cpu": state, "cuda": state of its own device}."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _rank_rng_state(tensors: dict[str, torch.Tensor], rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One rank's saved generators (`rng/<kind>/<rank>`). Single-process runs saved before the
    states were per rank hold `rng/cpu` and `rng/cuda` (every device's state, stacked)."""
    if f"rng/cpu/{rank}" in tensors:
        return {kind: tensors[f"rng/{kind}/{rank}"] for kind in ("cpu", "cuda") if f"rng/{kind}/{rank}" in tensors}
    state = {"cpu": tensors["rng/cpu"]}
    if "rng/cuda" in tensors and device.type == "cuda":
        state["cuda"] = tensors["rng/cuda"][device.index or 0]
    return state


def _optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt/{idx}/{name}"] = value
            else:
                scalars[f"{idx}/{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def layer_decay_of_run(train_info: dict, recipe: TrainConfig) -> float:
    """The layer-wise lr decay a saved run's param groups were built with. Runs saved before it
    was stored: the recipe's if their groups carry lr scales below 1, else none (1)."""
    if "layer_decay" in train_info:
        return float(train_info["layer_decay"])
    scaled = any(g.get("lr_scale", 1.0) != 1.0 for g in train_info["optimizer"]["param_groups"])
    return recipe.layer_decay if scaled else 1.0


def _optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in info["scalars"].items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["param_groups"]]
    if len(groups) != len(opt.param_groups):
        raise MmlitError(f"the saved optimizer state has {len(groups)} parameter groups where this run builds "
                         f"{len(opt.param_groups)}: the checkpoint does not fit this model or recipe")
    opt.load_state_dict({"state": state, "param_groups": groups})


class Trainer:
    def __init__(self, task, cfg: Config, train_data: ImageData, val_data: ImageData | None, opts: RunOptions,
                 console: Console | None = None):
        self.task, self.cfg, self.opts = task, cfg, opts
        self.recipe: TrainConfig = task.recipe
        self.console = console or Console()
        self.dist, self.device = setup_distributed(opts.device)
        self.amp_dtype = amp_dtype(self.device)
        torch.manual_seed(self.recipe.seed + self.dist.rank)

        self.model = task.model.to(self.device)
        self.normalize = Normalize(cfg.data.mean, cfg.data.std, self.device)  # made once: no per-step copies
        transform = build_train_transform(self.recipe.augment, cfg.model.image_size)
        self.train_loader = build_loader(train_data, self.recipe.batch_size, transform, shuffle=True,
                                         workers=self.recipe.workers, drop_last=len(train_data.labels) >= self.recipe.batch_size * self.dist.world_size,
                                         seed=self.recipe.seed, distributed=self.dist.enabled)
        self.val_loader = None
        if val_data is not None and len(val_data.labels) > 0:
            shard = val_data
            if self.dist.enabled:  # every rank takes an exact, disjoint share; sums are all-reduced
                r, w = self.dist.rank, self.dist.world_size
                shard = ImageData(val_data.images[r::w], val_data.labels[r::w], val_data.classes, val_data.source, [])
            self.val_loader = build_loader(shard, self.recipe.batch_size * 2, None, workers=0)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise MmlitError("the training split is empty")
        self.total_steps = self.steps_per_epoch * self.recipe.epochs
        self.warmup_steps = min(int(self.recipe.warmup_epochs * self.steps_per_epoch), self.total_steps // 2)

        self.layer_decay = opts.layer_decay
        self.optimizer = build_adamw(param_groups(self.model, self.recipe.weight_decay, self.layer_decay),
                                     self.recipe.lr, self.recipe.betas, self.device)
        self.ema = ModelEMA(self.model, self.recipe.ema_decay) if self.recipe.ema else None
        self.train_model = self.model
        if self.dist.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.train_model = maybe_compile(self.train_model, opts.compile, opts.compile_mode)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best: float | None = None
        self.history: list[dict] = []
        self.elapsed = 0.0
        self.stop_requested = False
        self.partial_loss_sum = 0.0  # sum of this epoch's step losses at the last in-epoch checkpoint
        self._resume_loss_sum = 0.0

    # ------------------------------------------------------------------ checkpoints

    def _gather_rng(self) -> dict[str, torch.Tensor]:
        """Every rank's generators as `rng/<kind>/<rank>`, gathered to all ranks: a collective,
        so every rank calls it at the same step (`save_last`)."""
        own = _rng_state(self.device)
        if not self.dist.enabled:
            return {f"rng/{kind}/0": state for kind, state in own.items()}
        gathered = {}
        for kind, state in own.items():  # NCCL gathers device tensors only
            parts = [torch.empty_like(state, device=self.device) for _ in range(self.dist.world_size)]
            torch.distributed.all_gather(parts, state.to(self.device))
            gathered.update({f"rng/{kind}/{rank}": part.cpu() for rank, part in enumerate(parts)})
        return gathered

    def _bank_partial_loss(self, loss_sum: torch.Tensor) -> None:
        """This epoch's loss sum so far, for an in-epoch checkpoint: the mean over ranks (a
        collective), which each rank resumes from, so the epoch's all-reduced mean comes out
        as in an uninterrupted run."""
        self.partial_loss_sum = all_reduce_mean(loss_sum.detach().clone(), self.dist).item()

    def _train_state(self, rng: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, opt_info = _optimizer_to_tensors(self.optimizer)
        tensors.update(rng)
        info: dict[str, Any] = {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best": self.best, "elapsed": self.elapsed, "optimizer": opt_info,
            "epoch_loss_sum": self.partial_loss_sum if self.step_in_epoch else 0.0, "dataset": self.opts.dataset,
            "world_size": self.dist.world_size, "layer_decay": self.layer_decay}
        if self.ema is not None:
            tensors.update({f"ema/{k}": v for k, v in self.ema.shadow.items()})
            info["ema_updates"] = self.ema.updates
        return tensors, info

    def _checkpoint(self, weights: dict[str, torch.Tensor], metrics: dict | None,
                    rng: dict[str, torch.Tensor] | None = None) -> Checkpoint:
        """A checkpoint; with the training state when given every rank's generators (`rng`)."""
        info = {"epoch": self.epoch, "global_step": self.global_step, "metrics": metrics or {},
                "mmlit_version": __version__}
        ckpt = Checkpoint(weights, self.cfg, self.task.kind, list(self.task.classes), info)
        if rng is not None:
            ckpt.train_tensors, ckpt.train_info = self._train_state(rng)
        return ckpt

    def save_last(self, metrics: dict | None = None) -> None:
        """last.safetensors, with the training state. Every rank calls it (the generators are
        gathered); rank 0 writes."""
        rng = self._gather_rng()
        if self.dist.is_main:
            save_checkpoint(self.opts.out_dir / "last.safetensors",
                            self._checkpoint(self.model.state_dict(), metrics, rng))

    def resume_from(self, ckpt: Checkpoint) -> None:
        if ckpt.train_info is None:
            raise MmlitError("the checkpoint has no training state to resume from")
        info = ckpt.train_info
        self.model.load_state_dict(ckpt.tensors)
        _optimizer_from_tensors(self.optimizer, ckpt.train_tensors, info["optimizer"])
        if self.ema is not None:
            ema = {k[4:]: v.to(self.device) for k, v in ckpt.train_tensors.items() if k.startswith("ema/")}
            if ema:
                self.ema.module.load_state_dict(ema)
            # Runs saved before the warm-up existed: the EMA was updated once per step.
            self.ema.updates = int(info.get("ema_updates", info["global_step"]))
        self.epoch, self.step_in_epoch = int(info["epoch"]), int(info["step_in_epoch"])
        self.global_step, self.best, self.elapsed = int(info["global_step"]), info["best"], float(info["elapsed"])
        self._resume_loss_sum = float(info.get("epoch_loss_sum", 0.0))
        check_resume_world_size(int(info.get("world_size", 1)))
        self._resume_rng = _rank_rng_state(ckpt.train_tensors, self.dist.rank, self.device)
        history = self.opts.out_dir / "metrics.jsonl"
        if history.exists():
            self.history = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
            self.history = [h for h in self.history if h["epoch"] <= self.epoch]

    # ------------------------------------------------------------------ logging

    def _write_metrics(self, row: dict) -> None:
        self.history.append(row)
        if not self.dist.is_main:
            return
        out = self.opts.out_dir
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))
        columns = [k for k in self.history[-1] if not isinstance(self.history[-1][k], (list, dict))]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(out / "metrics.csv", buf.getvalue())

    def _print(self, msg: str) -> None:
        if self.dist.is_main and not self.opts.quiet:
            self.console.print(msg, highlight=False)

    # ------------------------------------------------------------------ the loop

    def _install_sigint(self):
        def handler(signum, frame):
            if self.stop_requested:  # second Ctrl-C: give up at once
                raise KeyboardInterrupt
            self.stop_requested = True
        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:  # not in the main thread
            return None

    def fit(self) -> dict:
        previous_handler = self._install_sigint()
        try:
            return self._fit()
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lr = lr_at(self.global_step, self.total_steps, self.warmup_steps, self.recipe.lr, self.recipe.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        images = self.normalize(images.to(self.device, non_blocking=True))
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = self.task.loss(self.train_model, images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.global_step += 1
        self.step_in_epoch += 1
        return loss.detach()

    def _fit(self) -> dict:
        recipe, out = self.recipe, self.opts.out_dir
        if self.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.yaml", dump_config(self.cfg))
        self._print(f"[bold]{self.task.kind}[/bold] {self.cfg.name}: {self.steps_per_epoch} steps/epoch x "
                    f"{recipe.epochs} epochs, batch {recipe.batch_size} x {self.dist.world_size} process(es), "
                    f"device {self.device}{', bf16' if self.amp_dtype else ''}{', compiled' if self.opts.compile else ''}"
                    f" -> {escape(str(out))}")
        resume_rng = getattr(self, "_resume_rng", None)
        progress = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
                            TimeRemainingColumn(), console=self.console, transient=True,
                            disable=not self.dist.is_main or self.opts.quiet)
        stopped, last_loss = None, float("nan")
        with progress:
            while self.epoch < recipe.epochs and stopped is None:
                epoch_start = time.perf_counter()
                elapsed_mark = epoch_start  # `elapsed` (total training time) is banked at every checkpoint
                set_epoch(self.train_loader, self.epoch)
                bar = progress.add_task("train", total=self.steps_per_epoch, epoch=f"{self.epoch + 1}/{recipe.epochs}",
                                        loss="-", lr="-", ips="-")
                skip = self.step_in_epoch  # resuming mid-epoch: replay the data order, skip what was done
                # A resumed epoch starts from the loss sum saved with its checkpoint, so the
                # epoch's train_loss is the same as in an uninterrupted run.
                loss_sum = torch.full((), self._resume_loss_sum, device=self.device)
                self._resume_loss_sum = 0.0
                window_loss = torch.zeros((), device=self.device)
                window_n, window_start, seen = 0, time.perf_counter(), 0
                shown_loss = LaggedScalar(self.device)
                if resume_rng is not None and skip == 0:  # resumed at an epoch boundary
                    _set_rng_state(resume_rng, self.device)
                    resume_rng = None
                for i, (images, labels) in enumerate(self.train_loader):
                    if i < skip:
                        # Restore the RNG where it was saved: after batch skip-1, before batch skip is drawn.
                        if i == skip - 1 and resume_rng is not None:
                            _set_rng_state(resume_rng, self.device)
                            resume_rng = None
                        progress.advance(bar)
                        continue
                    loss = self._train_step(images, labels)
                    loss_sum += loss
                    window_loss += loss
                    window_n += 1
                    seen += images.shape[0]
                    progress.advance(bar)
                    at_end = self.step_in_epoch == self.steps_per_epoch
                    if window_n >= self.opts.log_every or at_end or self.stop_requested:
                        mean_loss = shown_loss.exchange(window_loss / window_n)
                        now = time.perf_counter()
                        ips = window_n * images.shape[0] * self.dist.world_size / max(now - window_start, 1e-9)
                        progress.update(bar, loss=f"{mean_loss:.4f}" if mean_loss is not None else "-",
                                        ips=f"{ips:,.0f}", lr=f"{self.optimizer.param_groups[-1]['lr']:.2e}")
                        window_loss = torch.zeros((), device=self.device)
                        window_n, window_start = 0, now
                        if mean_loss is not None and not math.isfinite(mean_loss):
                            last_loss = mean_loss
                            stopped = "nan"
                            break
                    if self.opts.max_steps is not None and self.global_step >= self.opts.max_steps:
                        stopped = "max_steps"
                        break
                    if self.stop_requested:
                        stopped = "interrupt"
                        break
                    if self.opts.save_every and self.global_step % self.opts.save_every == 0 and not at_end:
                        self._bank_partial_loss(loss_sum)
                        if self._diverged(self.partial_loss_sum):  # never checkpoint a diverged model
                            stopped = "nan"
                            break
                        now = time.perf_counter()
                        self.elapsed += now - elapsed_mark
                        elapsed_mark = now
                        self.save_last()
                progress.remove_task(bar)
                self.elapsed += time.perf_counter() - elapsed_mark
                if stopped == "nan":
                    break
                if stopped in ("interrupt", "max_steps") and self.step_in_epoch < self.steps_per_epoch:
                    self._bank_partial_loss(loss_sum)
                    if self._diverged(self.partial_loss_sum):
                        stopped = "nan"
                        break
                    self.save_last()
                    break
                # ---- end of epoch
                epoch_time = time.perf_counter() - epoch_start
                train_loss = all_reduce_mean(loss_sum / max(self.step_in_epoch, 1), self.dist).item()
                if self._diverged(train_loss):
                    stopped = "nan"
                    break
                self.partial_loss_sum = 0.0
                val = self.task.validate(self.ema_or_model(), self.val_loader, self.device, self.amp_dtype) \
                    if self.val_loader is not None else {}
                self.epoch += 1
                self.step_in_epoch = 0
                row = {"epoch": self.epoch, "step": self.global_step, "train_loss": train_loss,
                       "lr": self.optimizer.param_groups[-1]["lr"], **val,
                       "epoch_time_s": round(epoch_time, 3), "train_img_per_s": round(seen * self.dist.world_size / max(epoch_time, 1e-9), 1),
                       "world_size": self.dist.world_size}
                if self.dist.enabled:
                    row["ranks_in_sync"] = self._ranks_in_sync()
                self._write_metrics(row)
                improved = self._is_better(row)
                if improved:
                    self.best = row.get(self.task.monitor, train_loss)
                self.save_last(row)
                if improved and self.opts.save_best and self.dist.is_main:
                    weights = self.ema.shadow if self.ema is not None else self.model.state_dict()
                    save_checkpoint(out / "best.safetensors", self._checkpoint(weights, row))
                self._print(self._epoch_line(row))
                self._report_router(row.get("expert_usage"))
                if self.opts.on_epoch_end is not None and self.dist.is_main:
                    with torch.random.fork_rng(devices=_rng_devices(self.device)):  # keep the training RNG stream as saved
                        self.opts.on_epoch_end(self, row)
                if stopped is not None:
                    break
        if stopped == "nan":
            raise MmlitError(f"the loss became {last_loss} at step {self.global_step}; stopped. The last good "
                             f"checkpoint is {out / 'last.safetensors'} (try a lower --lr or --set "
                             f"{'finetune' if self.task.kind == 'classify' else 'pretrain'}.grad_clip=1.0)")
        if stopped == "interrupt":
            self._print(f"[yellow]interrupted[/yellow]: saved a resumable checkpoint; continue with "
                        f"--resume {escape(str(out))}")
        return {"stopped": stopped, "epoch": self.epoch, "global_step": self.global_step,
                "history": self.history, "best": self.best, "best_saved": self.opts.save_best}

    def _diverged(self, loss_value: float) -> bool:
        """A non-finite loss or weight: the state must not be checkpointed."""
        if not math.isfinite(loss_value):
            return True
        return not bool(torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all())

    def ema_or_model(self):
        return self.model if self.ema is None else self.ema.module

    def _is_better(self, row: dict) -> bool:
        value = row.get(self.task.monitor)
        if value is None:
            return True  # no validation split: the latest is the best we know
        if self.best is None:
            return True
        return value > self.best if self.task.monitor == "val_top1" else value < self.best

    def _ranks_in_sync(self) -> bool:
        flat = torch.cat([p.detach().float().flatten() for p in self.model.parameters()])
        checksum = torch.stack([flat.sum(), flat.abs().sum()]).double()
        gathered = [torch.zeros_like(checksum) for _ in range(self.dist.world_size)]
        torch.distributed.all_gather(gathered, checksum)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    def _epoch_line(self, row: dict) -> str:
        parts = [f"epoch {row['epoch']}/{self.recipe.epochs}", f"train loss {row['train_loss']:.4f}"]
        if "val_top1" in row:
            parts += [f"val loss {row['val_loss']:.4f}", f"top-1 {row['val_top1']:.2f}%", f"top-5 {row['val_top5']:.2f}%"]
        elif "val_loss" in row:
            parts.append(f"val loss {row['val_loss']:.4f}")
        parts += [f"{row['train_img_per_s']:,.0f} img/s", f"{row['epoch_time_s']:.1f}s"]
        return "  ".join(parts)

    def _report_router(self, usage: list[list[float]] | None) -> None:
        if not usage:
            return
        bad = collapsed_layers(usage)
        if bad:
            worst = ", ".join(f"layer {i}: " + "/".join(f"{s:.2f}" for s in usage[i]) for i in bad[:3])
            self._print(f"[yellow]router collapse[/yellow]: an expert gets < 1% of tokens in {len(bad)} layer(s) "
                        f"({worst}); consider --set model.aux_loss_weight=0.01")
