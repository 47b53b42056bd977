"""The training state a run resumes from, in and out of last.safetensors.

Checkpoints hold tensors and JSON only (never a pickle), so the optimizer's state dict is
split into tensors (`opt/<param>/<name>`) and JSON scalars, and every rank's random
generators are stored as `rng/<kind>/<rank>`. A run resumes with the process count it was
trained with: each process's generators and data shard are part of its state.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import TrainConfig
from .errors import MmlitError
from .runtime import Dist


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's generators: {"cpu": state, "cuda": state of its own device}."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def rank_rng_state(tensors: dict[str, torch.Tensor], rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One rank's saved generators (`rng/<kind>/<rank>`). Single-process runs saved before the
    states were per rank hold `rng/cpu` and `rng/cuda` (every device's state, stacked)."""
    if f"rng/cpu/{rank}" in tensors:
        return {kind: tensors[f"rng/{kind}/{rank}"] for kind in ("cpu", "cuda") if f"rng/{kind}/{rank}" in tensors}
    state = {"cpu": tensors["rng/cpu"]}
    if "rng/cuda" in tensors and device.type == "cuda":
        state["cuda"] = tensors["rng/cuda"][device.index or 0]
    return state


def gather_rng_states(device: torch.device, dist: Dist) -> dict[str, torch.Tensor]:
    """Every rank's generators as `rng/<kind>/<rank>`, gathered to all ranks: a collective,
    so every rank calls it at the same step."""
    own = rng_state(device)
    if not dist.enabled:
        return {f"rng/{kind}/0": state for kind, state in own.items()}
    gathered = {}
    for kind, state in own.items():  # NCCL gathers device tensors only
        parts = [torch.empty_like(state, device=device) for _ in range(dist.world_size)]
        torch.distributed.all_gather(parts, state.to(device))
        gathered.update({f"rng/{kind}/{rank}": part.cpu() for rank, part in enumerate(parts)})
    return gathered


# AdamW's constructor flags that choose its implementation, not its arithmetic
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
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


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
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
    # torch keeps a loaded group's flags, so a CPU run resumed on a GPU would stay on foreach
    # AdamW: how the step runs is this run's (`build_adamw`), what it has learnt is the checkpoint's
    groups = [{**g, **{k: now[k] for k in IMPLEMENTATION_FLAGS if k in now}}
              for g, now in zip(groups, opt.param_groups)]
    opt.load_state_dict({"state": state, "param_groups": groups})


def layer_decay_of_run(train_info: dict, recipe: TrainConfig) -> float:
    """The layer-wise lr decay a saved run's param groups were built with. Runs saved before it
    was stored: the recipe's if their groups carry lr scales below 1, else none (1)."""
    if "layer_decay" in train_info:
        return float(train_info["layer_decay"])
    scaled = any(g.get("lr_scale", 1.0) != 1.0 for g in train_info["optimizer"]["param_groups"])
    return recipe.layer_decay if scaled else 1.0
