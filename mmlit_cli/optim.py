"""The optimisation recipe: AdamW parameter groups, the lr schedule and the weight EMA."""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 no_decay_share: float = 0.0) -> list[dict]:
    """AdamW groups: norms, biases, tokens and position embeddings decay by `no_decay_share` x
    `weight_decay` (0: not at all, as timm; 1: as a plain `AdamW(model.parameters())`); with
    `layer_decay < 1`, lr scale `layer_decay ** (depth + 1 - layer_id)` (BEiT/MAE fine-tuning)."""
    no_decay = set(getattr(model, "no_weight_decay", lambda: set())())
    depth = getattr(getattr(model, "cfg", None), "depth", 0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = no_decay_share >= 1.0 or (p.ndim > 1 and name not in no_decay)
        layer = model.layer_id(name) if layer_decay < 1.0 and hasattr(model, "layer_id") else depth + 1
        key = (layer, decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay * (1.0 if decay else no_decay_share),
                           "lr_scale": layer_decay ** (depth + 1 - layer) if layer_decay < 1.0 else 1.0}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_adamw(groups: list[dict], lr: float, betas, device: torch.device) -> torch.optim.AdamW:
    """AdamW as the engine runs it: fused on CUDA; the multi-tensor (foreach) path elsewhere,
    ~5x fewer aten ops per step than the per-parameter loop PyTorch picks by default on CPU."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused, foreach=None if fused else True)


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from 0 to `lr`, then cosine down to `min_lr`, or flat at `lr` when that is
    lower (a batch of a few images scales the peak below min_lr: the lr must not rise after it)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = min(min_lr, lr)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# PyTorch's OneCycleLR defaults (Smith, 2018): start at lr / 25, end at lr / 25 / 1e4, and
# beta1 moving against the lr, 0.95 where the lr is low and 0.85 at its peak.
ONE_CYCLE_DIV, ONE_CYCLE_FINAL_DIV = 25.0, 1e4
ONE_CYCLE_BETA1 = (0.95, 0.85)


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def one_cycle_at(step: int, total_steps: int, warmup_fraction: float, lr: float) -> tuple[float, float]:
    """(lr, beta1) at `step` of `torch.optim.lr_scheduler.OneCycleLR(max_lr=lr,
    total_steps=total_steps, pct_start=warmup_fraction)`: a cosine from lr / 25 up to `lr`
    over the warm-up, then a cosine down to lr / 2.5e5, with beta1 moving the other way.
    Computed as OneCycleLR computes it, so the two give the same floats (tested)."""
    start_lr = lr / ONE_CYCLE_DIV
    end_lr = start_lr / ONE_CYCLE_FINAL_DIV
    b1_low_lr, b1_peak = ONE_CYCLE_BETA1
    peak_step = float(warmup_fraction * total_steps) - 1  # OneCycleLR's end of phase 1
    if peak_step > 0 and step <= peak_step:
        pct = step / peak_step
        return _cos_anneal(start_lr, lr, pct), _cos_anneal(b1_low_lr, b1_peak, pct)
    pct = (step - peak_step) / max(total_steps - 1 - peak_step, 1e-12)
    return _cos_anneal(lr, end_lr, min(pct, 1.0)), _cos_anneal(b1_peak, b1_low_lr, min(pct, 1.0))


EMA_WARMUP_POWER = 2 / 3


def set_schedule(optimizer: torch.optim.Optimizer, one_cycle_share: float, step: int, total_steps: int,
                 warmup_steps: float, lr: float, min_lr: float, betas) -> None:
    """The lr at `step` (and beta1) into every param group, each scaled by its `lr_scale`
    (layer-wise decay): `one_cycle_share` x one-cycle (peaking after `warmup_steps`, beta1
    moving against the lr) + the rest x a linear warm-up over its whole steps then cosine
    (`lr_at`, beta1 fixed). A share of 1 is PyTorch's OneCycleLR, 0 the paper's cosine."""
    lr_now, beta1 = 0.0, None  # beta1 stays as the optimizer has it unless one-cycle moves it
    if one_cycle_share > 0:
        cycle_lr, cycle_beta1 = one_cycle_at(step, total_steps, warmup_steps / max(total_steps, 1), lr)
        lr_now += one_cycle_share * cycle_lr
        beta1 = one_cycle_share * cycle_beta1 + (1 - one_cycle_share) * betas[0]
    if one_cycle_share < 1:
        lr_now += (1 - one_cycle_share) * lr_at(step, total_steps, int(warmup_steps), lr, min_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr_now * group.get("lr_scale", 1.0)
        if beta1 is not None:
            group["betas"] = (beta1, betas[1])


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
