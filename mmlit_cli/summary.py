"""Parameter breakdown and MAC count of an mLiT model (what `mmlit count-params` shows)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .config import load_config
from .model import MLiT, MoEFeedForward

# Published totals (arXiv 2407.17783 abstract), for 100 classes (CIFAR-100).
PAPER_PARAMS = {"s": 2_360_000, "xxs": 670_000}
# what sets a model's parameter count (not drop path, router noise...)
_ARCHITECTURE = ("image_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
                 "num_kv_heads", "qkv_bias", "mlp_hidden_first", "mlp_hidden_last", "expert_stages", "top_k")


def paper_params(preset: str, model_cfg) -> int | None:
    """The paper's parameter count for `model_cfg` when it is the architecture the paper published
    (the preset `preset` at 100 classes, at its input size), else None: beside another (--set
    model.depth=3, --image-size 24) the paper's figure would read as our reconstruction's error."""
    if preset not in PAPER_PARAMS:
        return None
    published = dataclasses.replace(load_config(preset).model, num_classes=100)
    same = all(getattr(model_cfg, k) == getattr(published, k) for k in _ARCHITECTURE)
    return PAPER_PARAMS[preset] if same else None

COMPONENTS = ("patch embedding", "position/class tokens", "attention", "router", "per-expert W1",
              "shared V", "shared W2", "norms", "head")


@dataclass
class ParamBreakdown:
    components: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.components.values())


def parameter_breakdown(model: MLiT) -> ParamBreakdown:
    """Parameters per component; the MoE's fused W1/V tensor is split into its two parts."""
    parts = dict.fromkeys(COMPONENTS, 0)
    parts["patch embedding"] = sum(p.numel() for p in model.patch_embed.parameters())
    parts["position/class tokens"] = model.pos_embed.numel() + model.cls_token.numel()
    parts["head"] = sum(p.numel() for p in model.head.parameters())
    parts["norms"] = sum(p.numel() for p in model.norm.parameters())
    for block in model.blocks:
        parts["attention"] += sum(p.numel() for p in block.attn.parameters())
        parts["norms"] += sum(p.numel() for n in (block.norm1, block.norm2) for p in n.parameters())
        moe: MoEFeedForward = block.ffn
        parts["router"] += sum(p.numel() for p in moe.router.parameters())
        per_row = moe.dim + 1  # weight row + bias
        parts["per-expert W1"] += moe.num_experts * moe.hidden * per_row
        parts["shared V"] += moe.hidden * per_row
        parts["shared W2"] += sum(p.numel() for p in moe.w2.parameters())
    counted = sum(parts.values())
    actual = sum(p.numel() for p in model.parameters())
    if counted != actual:  # a new parameter was added to the model but not to this table
        raise RuntimeError(f"parameter breakdown misses {actual - counted} parameters")
    return ParamBreakdown(parts)


def count_macs(model: MLiT) -> int:
    """Multiply-accumulates for one image at inference, as the production path computes them.

    Measured with PyTorch's FLOP counter (FLOPs / 2). The fused MoE evaluates W1 of every
    expert for every token (cheaper in time than dispatching at these sizes), so this is the
    work actually done, a little above the top-k-only count. Attention runs on SDPA's math
    backend here: the counter has no formula for the fused CPU kernel and would count its
    two matmuls as zero. The forward runs on a copy of the model on the meta device, which
    has shapes but no memory: counting a large `--image-size` would otherwise allocate its
    attention matrices (194 GB at 900 px).
    """
    cfg = model.cfg
    shapes_only = copy.deepcopy(model).to("meta").eval()
    x = torch.zeros(1, cfg.in_chans, cfg.image_size, cfg.image_size, device="meta", dtype=model.input_dtype)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        shapes_only(x)
    return counter.get_total_flops() // 2
