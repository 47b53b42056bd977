#!/usr/bin/env python
"""Model benchmark: mmlit's production mLiT against three other ways to compute it.

Per preset, in one process, with the variants alternated round by round (and their order
rotated each round) so that clock/thermal/neighbour drift hits every variant alike:

  mlit          (a) the production model, `create_model(preset, num_classes=100)`: the MoE
                    layer is one fused W1/V matmul, a gate-weighted sum and one W2 matmul.
  mlit+compile  (a) under torch.compile (only with --compile).
  naive         (b) the same weights, each MoE layer computed by `MoEFeedForward.forward_naive`:
                    a Python loop over experts, each applying its W1 and the shared V, W2 to
                    all tokens, weighted by its gate.
  sparse        (c) the same weights, sparse top-k dispatch as the public re-implementation
                    does it: per expert, gather the tokens routed to it, full SwiGLU (V
                    included) on them, scale by the gate, `index_add_` into the output.
  public        (e) the same weights computed the way the public re-implementation computes
                    the whole block: (c)'s dispatch behind its noisy top-k router with the
                    normal-CDF load-balancing loss, and attention with separate q/k/v
                    projections, K/V repeated per query head and an explicit softmax (no SDPA).
                    The issue's premise that the public code trains at about half the naive
                    speed is about this form, not about (c) alone.
  moe-free      (f) the production model with every MoE layer replaced by a zero output: the
                    time no MoE implementation can remove, so its img/s bounds what any MoE form
                    (fused, sparse, anything) can reach with this attention (Amdahl).
  vit-dense     (d) torchvision's VisionTransformer (36x36, patch 3) with the preset's width,
                    depth and heads and the MLP width solved so that the parameter count is
                    within a few % of the preset's.

Figures: training-step img/s (normalize on device, forward, label-smoothed cross-entropy,
backward, grad-norm clip 1.0, AdamW - the engine's step without MixUp/CutMix), inference
img/s (eval, torch.inference_mode, same batch), batch-1 latency (median over >= 100 timed
calls by default), aten operators per training step (counted with a TorchDispatchMode, see
`common.AtenOpCounter`), the host-syncing ops among them, and matmul/conv/attention FLOPs
(torch.utils.flop_counter). On CUDA, also the fraction of the card's dense bf16 peak that
(a)'s training reaches.

    python benchmarks/bench_models.py --presets xxs                  # CPU defaults, a few minutes
    python benchmarks/bench_models.py --quick                        # smoke run, seconds
    python benchmarks/bench_models.py --bf16 --compile --json out.json   # on a GPU (batch 512)
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (also puts the repository root on sys.path)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from mmlit_cli import create_model  # noqa: E402
from mmlit_cli.config import load_config  # noqa: E402
from mmlit_cli.data import Normalize  # noqa: E402
from mmlit_cli.engine import build_adamw, param_groups  # noqa: E402
from mmlit_cli.model import MLiT, MoEFeedForward  # noqa: E402

NUM_CLASSES = 100

# --------------------------------------------------------------------------- the variants


class NaiveMoE(MoEFeedForward):
    """(b): the production layer class with `forward` = the literal per-expert loop."""

    forward = MoEFeedForward.forward_naive


def naive_model(model: MLiT) -> MLiT:
    out = copy.deepcopy(model)
    for block in out.blocks:
        block.ffn.__class__ = NaiveMoE  # same parameters, same routing; only forward differs
    return out


class SparseDispatchMoE(nn.Module):
    """(c): top-k sparse dispatch over the parameters of an existing `MoEFeedForward`.

    Per expert e: the (token, slot) pairs whose top-k choice is e (`torch.where` on the top-k
    indices - a `nonzero`, i.e. a host sync per expert on CUDA), their inputs gathered,
    `W2 (silu(x W1_e) * (x V))` computed on them with V and W2 applied per expert, scaled by
    the token's gate and `index_add_`-ed into the output. Numerically the same layer as (a).
    """

    aux_loss = None  # no auxiliary loss (read by `MLiT.aux_loss`)

    def __init__(self, moe: MoEFeedForward):
        super().__init__()
        self.moe = moe  # router, w1v and w2: the very same Parameter objects

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        gates, top_idx = moe.route(x)  # gates: [.., E], zero outside the top-k
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        top_idx = top_idx.reshape(-1, moe.top_k)
        top_gate = gates.reshape(-1, moe.num_experts).gather(1, top_idx)  # [T, k]
        w1, b1, wv, bv = moe.expert_weights()
        out = torch.zeros_like(tokens)
        for e in range(moe.num_experts):
            tok, slot = torch.where(top_idx == e)
            if tok.numel() == 0:
                continue
            xe = tokens[tok]
            hidden = F.silu(F.linear(xe, w1[e], b1[e])) * F.linear(xe, wv, bv)
            ye = moe.w2(hidden) * top_gate[tok, slot].unsqueeze(-1)
            out.index_add_(0, tok, ye.to(out.dtype))
        return out.view(shape)


def sparse_model(model: MLiT) -> MLiT:
    out = copy.deepcopy(model)
    for block in out.blocks:
        block.ffn = SparseDispatchMoE(block.ffn)
    return out


class FreeMoE(nn.Module):
    """(f): an MoE layer that costs nothing - its output is zero (one multiply)."""

    aux_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.0


def moe_free_model(model: MLiT) -> MLiT:
    """Everything but the MoE layers (attention, norms, embedding, head, optimizer): the time
    no MoE implementation can remove, hence the most any MoE form can gain (Amdahl)."""
    out = copy.deepcopy(model)
    for block in out.blocks:
        block.ffn = FreeMoE()
    return out


class RepeatedKVAttention(nn.Module):
    """(e), attention: grouped-query attention the way the public re-implementation computes
    it - separate q, k and v projections, K and V copied once per query head of their group
    (`repeat`), then an explicit `softmax(q k^T / sqrt(d)) v`. Same function as
    `GroupedQueryAttention` (the weights are copied from its fused `qkv`); the output
    projection is the very same module."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        H, G, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, d
        dim = attn.qkv.in_features
        with torch.no_grad():
            w, b = attn.qkv.weight.split([H * d, G * d, G * d]), attn.qkv.bias.split([H * d, G * d, G * d])
            self.q, self.k, self.v = (nn.Linear(dim, wi.shape[0], device=wi.device, dtype=wi.dtype) for wi in w)
            for lin, wi, bi in zip((self.q, self.k, self.v), w, b):
                lin.weight.copy_(wi)
                lin.bias.copy_(bi)
        self.proj = attn.proj

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], heads, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        H, G = self.num_heads, self.num_kv_heads
        q = self._heads(self.q(x), H).permute(0, 2, 1, 3)
        # every kv head copied H // G times, next to each other: query head h reads kv head h // (H // G)
        k = self._heads(self.k(x), G).unsqueeze(3).repeat(1, 1, 1, H // G, 1).view(B, N, H, self.head_dim)
        v = self._heads(self.v(x), G).unsqueeze(3).repeat(1, 1, 1, H // G, 1).view(B, N, H, self.head_dim)
        scores = (q @ k.permute(0, 2, 3, 1)) * self.head_dim ** -0.5
        out = scores.softmax(dim=-1) @ v.permute(0, 2, 1, 3)
        return self.proj(out.permute(0, 2, 1, 3).contiguous().view(B, N, H * self.head_dim))


class NoisyGateSparseMoE(nn.Module):
    """(e), MoE layer: the public re-implementation's router and dispatch on the weights of an
    existing `MoEFeedForward`.

    Router: noisy top-k gating (Shazeer et al. 2017) - clean logits from the layer's router, a
    second projection giving a per-token noise scale `softplus(x W_noise)`, Gaussian noise
    while training, top-k, softmax over the chosen logits. Auxiliary loss (added to the
    training loss): 0.01 x CV(importance) + 0.01 x CV(load), where importance is the summed
    gates per expert and load the summed probability, through the normal CDF, that each
    expert stays in a token's top-k under fresh noise (a second top-k for the k-th and
    (k+1)-th values). Dispatch: per expert, a boolean "routed to e" per token, `torch.where`
    for its tokens, gather, full SwiGLU (V included), scale by the gate, `index_add_`.

    The auxiliary loss follows that code, not the paper it cites: the coefficient of variation
    is not squared, and the in-top-k threshold rule is that code's (an expert above the k-th
    value is compared with the k-th, one at or below the (k+1)-th with the (k+1)-th, the k-th
    with itself). The cost is the same either way; only its value would differ.
    Two deliberate differences from that code, both in its favour here: no noise at
    inference (it samples noise in eval too) and no dropout. In eval mode the layer is the
    same function as (a).
    """

    def __init__(self, moe: MoEFeedForward, importance_weight: float = 1e-2, load_weight: float = 1e-2):
        super().__init__()
        self.moe = moe  # router (the clean gate), w1v and w2: the very same Parameter objects
        ref = moe.router.weight
        self.noise = nn.Linear(moe.dim, moe.num_experts, device=ref.device, dtype=ref.dtype)
        self.importance_weight, self.load_weight = importance_weight, load_weight
        self.aux_loss: torch.Tensor | None = None

    @staticmethod
    def _cv(v: torch.Tensor) -> torch.Tensor:
        return v.std(unbiased=False) / (v.mean() + 1e-6)

    def _load_loss(self, clean: torch.Tensor, noisy: torch.Tensor, noise_scale: torch.Tensor,
                   gates: torch.Tensor) -> torch.Tensor:
        k = self.moe.top_k
        kth = noisy.topk(k + 1, dim=-1).values
        inside, outside = kth[:, k - 1:k], kth[:, k:k + 1]
        # the threshold each logit must beat to be (stay) in the top-k
        threshold = torch.where(noisy > inside, inside, torch.where(noisy <= outside, outside, noisy))
        normal = torch.distributions.Normal(torch.zeros_like(clean), torch.ones_like(clean))
        p_in = normal.cdf((clean - threshold) / noise_scale)
        return self.importance_weight * self._cv(gates.sum(0)) + self.load_weight * self._cv(p_in.sum(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        clean = moe.router(tokens)
        noise_scale = F.softplus(self.noise(tokens))
        noisy = clean + torch.randn_like(clean) * noise_scale if self.training else clean
        top_logits, top_idx = noisy.topk(moe.top_k, dim=-1)
        gates = tokens.new_zeros(noisy.shape).scatter(-1, top_idx, top_logits.softmax(dim=-1))
        self.aux_loss = self._load_loss(clean, noisy, noise_scale, gates) if self.training else None
        w1, b1, wv, bv = moe.expert_weights()
        out = torch.zeros_like(tokens)
        for e in range(moe.num_experts):
            routed = (top_idx == e).any(dim=1)
            if not routed.any():  # a host sync, as in that code
                continue
            tok = torch.where(routed)[0]
            xe = tokens[tok]
            hidden = F.silu(F.linear(xe, w1[e], b1[e])) * F.linear(xe, wv, bv)
            out.index_add_(0, tok, moe.w2(hidden) * gates[tok, e].unsqueeze(-1))
        return out.view(shape)


def public_model(model: MLiT) -> MLiT:
    out = copy.deepcopy(model)
    for block in out.blocks:
        block.attn = RepeatedKVAttention(block.attn)
        block.ffn = NoisyGateSparseMoE(block.ffn)
    return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dense_vit(cfg, target: int) -> tuple[nn.Module, dict[str, int]]:
    """torchvision ViT with the preset's image/patch size, width, depth and heads; mlp_dim
    solved (parameters are linear in it) to land on `target`, rounded to a multiple of 8
    when that stays within 2 %."""
    from torchvision.models import VisionTransformer

    def build(mlp_dim: int) -> nn.Module:
        return VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, num_layers=cfg.depth,
                                 num_heads=cfg.num_heads, hidden_dim=cfg.embed_dim, mlp_dim=mlp_dim,
                                 num_classes=cfg.num_classes)

    slope = cfg.depth * (2 * cfg.embed_dim + 1)  # fc1 weight+bias, fc2 weight per unit of mlp_dim
    base = n_params(build(64))
    exact = max(8, round(64 + (target - base) / slope))
    mlp_dim = max(8, 8 * round(exact / 8))
    if abs(base + (mlp_dim - 64) * slope - target) > 0.02 * target:
        mlp_dim = exact
    vit = build(mlp_dim)
    conf = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, num_layers=cfg.depth,
                num_heads=cfg.num_heads, hidden_dim=cfg.embed_dim, mlp_dim=mlp_dim, params=n_params(vit))
    return vit, conf


# --------------------------------------------------------------------------- steps


def _total(ops: dict[str, int] | None) -> int | None:
    return None if ops is None else sum(ops.values())


def _syncs(ops: dict[str, int] | None) -> int | None:
    return None if ops is None else sum(n for k, n in ops.items() if k in common.SYNC_OPS)


def _sorted(ops: dict[str, int] | None) -> dict[str, int] | None:
    return None if ops is None else dict(sorted(ops.items(), key=lambda kv: -kv[1]))


@dataclass
class Variant:
    name: str
    model: nn.Module  # what runs (maybe compiled)
    base: nn.Module  # the nn.Module underneath (parameters, counting)
    params: int
    train: list[float] = field(default_factory=list)  # img/s per round
    infer: list[float] = field(default_factory=list)  # img/s per round
    latency: list[float] = field(default_factory=list)  # ms per call
    step: Callable[..., Any] | None = None
    fwd_bwd: Callable[..., Any] | None = None
    update: Callable[..., Any] | None = None
    infer_fn: Callable[..., Any] | None = None
    ops: dict[str, int] | None = None  # one whole training step
    ops_model: dict[str, int] | None = None  # its forward + backward half
    ops_note: str = ""
    flops_per_step: int | None = None
    attention: str = ""

    def summary(self) -> dict[str, Any]:
        return {"params": self.params, "train_img_s": self.train, "infer_img_s": self.infer,
                "latency_ms": self.latency, "train_img_s_median": common.median(self.train),
                "infer_img_s_median": common.median(self.infer),
                "latency_ms_median": common.median(self.latency),
                "aten_ops_per_step": _total(self.ops), "aten_ops_fwd_bwd": _total(self.ops_model),
                "sync_ops_fwd_bwd": _syncs(self.ops_model), "sync_ops_per_step": _syncs(self.ops),
                "aten_op_counts_step": _sorted(self.ops), "aten_op_counts_fwd_bwd": _sorted(self.ops_model),
                "ops_note": self.ops_note, "train_flops_per_step": self.flops_per_step,
                "attention": self.attention}


def make_fns(v: Variant, device: torch.device, amp: torch.dtype | None, mean, std) -> None:
    """The training step (as `engine.Trainer._train_step`, minus lr schedule and MixUp) and
    the inference call of a variant. The step is two halves so that their ops can be counted
    apart: `fwd_bwd` (normalize, forward, loss, backward) and `update` (clip + AdamW)."""
    opt = build_adamw(param_groups(v.base, 0.05), 1e-3, (0.9, 0.999), device)  # as the engine builds it
    params = [p for p in v.base.parameters() if p.requires_grad]
    model = v.model
    normalize = Normalize(mean, std, device)  # made once, as the engine's trainer does

    def fwd_bwd(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = normalize(images.to(device, non_blocking=True))
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
            aux = v.base.aux_loss() if isinstance(v.base, MLiT) else None  # as the engine does
            if aux is not None:
                loss = loss + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = fwd_bwd(images, labels)
        update()
        return loss

    def infer(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32,
                                                    enabled=amp is not None):
            return model(normalize(images.to(device, non_blocking=True)))

    v.step, v.fwd_bwd, v.update, v.infer_fn = step, fwd_bwd, update, infer


def check_same_function(a: MLiT, others: dict[str, MLiT], device: torch.device, size: int) -> dict[str, float]:
    """Max |features(a) - features(v)| on random input (fp32, eval): the variants must agree.
    (Features, not logits: the head starts at zero, which would make every check pass.)"""
    x = torch.randn(4, 3, size, size, device=device)
    out = {}
    with torch.no_grad():
        a.eval()
        ref = a.forward_features(x)
        for name, m in others.items():
            m.eval()
            out[name] = float((m.forward_features(x) - ref).abs().max())
    return out


def autocast_preflight(model: MLiT, device: torch.device, amp: torch.dtype, size: int) -> str | None:
    """One forward + backward under autocast on two images; the error text if it fails."""
    x = torch.randn(2, 3, size, size, device=device)
    model.train()
    try:
        with torch.autocast(device.type, dtype=amp):
            out = model(x)
        out.float().sum().backward()
    except Exception as exc:  # noqa: BLE001 - reported, then measured in fp32
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    finally:
        model.zero_grad(set_to_none=True)
    return None


# --------------------------------------------------------------------------- one preset


def bench_preset(preset: str, args, device: torch.device, amp: torch.dtype | None) -> dict[str, Any]:
    cfg = load_config(preset)
    mean, std = cfg.data.mean, cfg.data.std
    S = cfg.model.image_size
    torch.manual_seed(0)
    prod = create_model(preset, num_classes=NUM_CLASSES).to(device)
    naive, sparse, public = naive_model(prod), sparse_model(prod), public_model(prod)
    check = check_same_function(prod, {"naive": naive, "sparse": sparse, "public": public}, device, S)
    amp_error = autocast_preflight(prod, device, amp, S) if amp is not None else None
    if amp_error:
        print(f"\n   WARNING: the production model fails under {amp} autocast on {device} (the engine's "
              f"setting on CUDA): {amp_error}\n   -> preset {preset} is measured in fp32\n", flush=True)
        amp = None
    target = n_params(prod)
    vit, vit_conf = dense_vit(prod.cfg, target)
    vit = vit.to(device)

    variants = [Variant("mlit", prod, prod, target)]
    if args.compile:
        base = copy.deepcopy(prod)
        variants.append(Variant("mlit+compile", torch.compile(base, dynamic=False), base, target))
    variants += [Variant("naive", naive, naive, n_params(naive)),
                 Variant("sparse", sparse, sparse, n_params(sparse)),
                 Variant("public", public, public, n_params(public)),
                 Variant("vit-dense", vit, vit, vit_conf["params"])]
    free = moe_free_model(prod)
    variants.append(Variant("moe-free", free, free, n_params(free)))
    if args.variants:
        variants = [v for v in variants if v.name in args.variants]
    for v in variants:
        make_fns(v, device, amp, mean, std)

    B = args.batch
    pin = device.type == "cuda"
    batches = []
    for _ in range(args.distinct_batches):
        images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8)
        labels = torch.randint(0, NUM_CLASSES, (B,))
        batches.append((images.pin_memory() if pin else images, labels.pin_memory() if pin else labels))
    one = torch.randint(0, 256, (1, 3, S, S), dtype=torch.uint8, device=device)
    k = 0

    def next_batch():
        nonlocal k
        k += 1
        return batches[k % len(batches)]

    print(f"\n== preset {preset}: {target:,} parameters (mlit/naive/sparse/public: the same function in eval mode; public adds its noise projection); "
          f"dense ViT: hidden {vit_conf['hidden_dim']}, depth {vit_conf['num_layers']}, heads "
          f"{vit_conf['num_heads']}, mlp {vit_conf['mlp_dim']} -> {vit_conf['params']:,} parameters "
          f"({100 * (vit_conf['params'] - target) / target:+.1f} %)", flush=True)
    print("   same function check, max |features - mlit| at init (fp32): "
          + ", ".join(f"{n} {d:.1e}" for n, d in check.items()), flush=True)

    # Warm-up: allocator, lazy AdamW state, oneDNN/cuBLAS plans, torch.compile graphs.
    failed: dict[str, str] = {}
    for v in list(variants):
        try:
            v.model.train()
            for _ in range(args.warmup):
                v.step(*next_batch())
            v.model.eval()
            for _ in range(args.warmup):
                v.infer_fn(next_batch()[0])
            for _ in range(max(args.warmup, 3)):
                v.infer_fn(one)
            common.sync(device)
        except Exception as exc:  # noqa: BLE001 - e.g. a compile failure: drop the variant, keep the rest
            if v.name == "mlit":
                raise
            failed[v.name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            print(f"   WARNING: variant {v.name} failed and is left out: {failed[v.name]}", flush=True)
            variants.remove(v)

    if not variants:
        raise SystemExit(f"preset {preset}: no variant left to measure (see the warnings above)")

    # Op, sync and FLOP counts of one steady-state training step (eager).
    for v in variants:
        if v.name.endswith("+compile"):
            eager = next((x for x in variants if x.name == "mlit"), None)
            if eager is None:
                v.ops_note = "not counted: compiled graphs bypass the aten dispatcher (add mlit for its eager count)"
                continue
            v.ops, v.ops_model, v.flops_per_step, v.attention = eager.ops, eager.ops_model, eager.flops_per_step, \
                eager.attention
            v.ops_note = "eager mlit's count (compiled graphs bypass the aten dispatcher)"
            continue
        v.model.train()
        model_ops = common.count_aten_ops(lambda: v.fwd_bwd(*next_batch()))
        update_ops = common.count_aten_ops(v.update)
        v.ops_model = dict(model_ops.counts)
        v.ops = dict(model_ops.counts + update_ops.counts)
        v.attention = common.attention_op(v.ops_model)
        v.flops_per_step = common.count_flops(lambda: v.step(*next_batch()))
    common.sync(device)

    lat_per_round = max(1, math.ceil(args.latency_calls / args.rounds))
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            v.model.train()
            for _ in range(args.round_warmup):  # untimed: the first step after a switch pays for the others
                v.step(*next_batch())
            dt = common.timed(lambda: [v.step(*next_batch()) for _ in range(args.steps)], device)
            v.train.append(args.steps * B / dt)
        for v in order:
            v.model.eval()
            for _ in range(args.round_warmup):
                v.infer_fn(next_batch()[0])
            dt = common.timed(lambda: [v.infer_fn(next_batch()[0]) for _ in range(args.steps)], device)
            v.infer.append(args.steps * B / dt)
        for v in order:
            v.model.eval()
            for _ in range(lat_per_round):
                v.latency.append(1e3 * common.timed(lambda: v.infer_fn(one), device))
        if not args.quiet:
            print(f"   round {r + 1}/{args.rounds}: train img/s "
                  + ", ".join(f"{v.name} {v.train[-1]:,.0f}" for v in variants), flush=True)

    result = {"preset": preset, "params": target, "batch": B, "amp": str(amp) if amp else "fp32",
              "amp_error": amp_error, "failed_variants": failed, "vit_config": vit_conf,
              "same_function_check": check, "variants": {v.name: v.summary() for v in variants}}
    print_tables(preset, variants, device, args, result, amp)
    return result


def print_tables(preset: str, variants: list[Variant], device, args, result: dict[str, Any],
                 amp: torch.dtype | None) -> None:
    med = {v.name: (common.median(v.train), common.median(v.infer), common.median(v.latency)) for v in variants}
    rows = []
    for v in variants:
        tr, inf, lat = med[v.name]
        ops, model_ops, syncs = _total(v.ops), _total(v.ops_model), _syncs(v.ops_model)
        star = "*" if v.ops_note else ""
        gflop = v.flops_per_step / args.batch / 1e9 if v.flops_per_step else None
        rows.append([v.name, f"{v.params:,}", common.fmt_num(tr), f"{100 * common.spread(v.train):.0f}%",
                     common.fmt_num(inf), common.fmt_num(lat, 2),
                     f"{ops:,}{star}" if ops is not None else "-",
                     f"{model_ops:,}{star}" if model_ops is not None else "-",
                     "-" if syncs is None else f"{syncs}{star}", common.fmt_num(gflop, 3), v.attention])
    headers = ["variant", "params", "train img/s", "spread", "infer img/s", "b1 lat ms", "aten ops/step",
               "of which fwd+bwd", "syncs fwd+bwd", "train GFLOP/img", "attention op"]
    precision = "bf16 autocast" if amp is not None else "fp32"
    title = (f"mLiT-{preset.upper()} on {device}, batch {args.batch}, {precision}, median of {args.rounds} rounds x "
             f"{args.steps} steps (after {args.round_warmup} untimed); latency median of {len(variants[0].latency)} calls")
    print()
    print(common.format_table(headers, rows, title))
    print("   aten ops/step = fwd+bwd + clip/AdamW (the rest); syncs = calls of the ops listed above "
          "(each one a host-device sync on CUDA); spread = (max - min) / median of the per-round train img/s")
    if any(v.ops_note for v in variants):
        print("   * " + next(v.ops_note for v in variants if v.ops_note))

    ratio_rows = []
    nan = float("nan")
    ref_ops = {x.name: _total(x.ops) for x in variants}
    refs = ("naive", "sparse", "public")
    for v in variants:
        tr, inf, lat = med[v.name]
        row = [v.name]
        row += [common.fmt_ratio(tr / med.get(ref, (nan,) * 3)[0]) for ref in refs]
        row += [common.fmt_ratio(inf / med.get(ref, (nan,) * 3)[1]) for ref in refs]
        row += [common.fmt_ratio(lat / med.get(ref, (nan,) * 3)[2]) for ref in refs]
        ops = _total(v.ops)
        row += [common.fmt_ratio(ops / ref_ops[ref]) if ops and ref_ops.get(ref) else "-" for ref in refs]
        ratio_rows.append(row)
    print()
    print(common.format_table(
        ["variant"] + [f"{what} vs {ref}" for what in ("train", "infer", "b1 lat", "ops") for ref in refs],
        ratio_rows, "ratios to the reference variants: train and infer as img/s over the reference's "
                    "(> 1 = faster); b1 lat and ops as the variant's over the reference's (< 1 = fewer ms, fewer ops)"))

    if "moe-free" in med:
        floor = med["moe-free"][0]
        bounds = [f"{ref} {common.fmt_ratio(floor / med[ref][0])}" for ref in ("naive", "sparse", "public") if ref in med]
        line = (f"   bound: with free MoE layers (moe-free) training runs at {common.fmt_num(floor)} img/s, so no MoE "
                f"implementation can train faster than that: at most " + ", ".join(bounds) + " the reference")
        if "mlit" in med:
            share = 1 - med["mlit"][0] / floor
            line += f"; the MoE layers take {100 * share:.0f} % of mlit's training step"
        print(line)
        result["moe_free_bound"] = {ref: floor / med[ref][0] for ref in ("naive", "sparse", "public") if ref in med}

    if device.type == "cuda" or args.peak_tflops:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak = args.peak_tflops * 1e12 if args.peak_tflops else common.peak_bf16_flops(name)
        print()
        if peak is None:
            print(f"   MFU: no bf16 peak known for '{name}' (pass --peak-tflops)")
        for v in variants:
            if not v.name.startswith("mlit") or peak is None or not v.flops_per_step:
                continue
            achieved = v.flops_per_step * common.median(v.train) / args.batch
            frac = achieved / peak
            result["variants"][v.name].update(achieved_tflops=achieved / 1e12, peak_tflops=peak / 1e12,
                                              peak_fraction=frac)
            print(f"   {v.name} training: {v.flops_per_step / 1e9:,.1f} GFLOP/step x "
                  f"{common.median(v.train) / args.batch:,.2f} steps/s = {achieved / 1e12:,.2f} TFLOP/s = "
                  f"{100 * frac:.2f} % of {name}'s {peak / 1e12:,.0f} TFLOP/s dense bf16 peak"
                  f"{'' if amp is not None else ' (but this was measured in fp32)'}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=None, help="comma-separated presets (default: xxs,xs,s; --quick: xxs)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--batch", type=int, default=None, help="training/inference batch (default: 64 CPU, 512 CUDA)")
    p.add_argument("--rounds", type=int, default=None, help="alternating measurement rounds (default 5)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed training steps (and inference batches) per variant per round (default 3 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 2 CPU, 10 CUDA)")
    p.add_argument("--round-warmup", type=int, default=None,
                   help="untimed steps (and inference batches) per variant at the start of each round, so the "
                        "timed ones are not the first after a switch of model (default 1; --quick: 0)")
    p.add_argument("--latency-calls", type=int, default=None, help="batch-1 calls per variant (default 100)")
    p.add_argument("--distinct-batches", type=int, default=4, help="random batches cycled through")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of mlit,mlit+compile,naive,sparse,public,vit-dense (default: all but "
                        "mlit+compile, which --compile or naming it adds); "
                        "one variant per process measures its steady state without the others' heap in the way")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for every variant (what the engine does on CUDA)")
    p.add_argument("--compile", action="store_true", help="add a torch.compile'd production model (mlit+compile)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for the MFU line")
    p.add_argument("--json", default=None, help="write the raw numbers here")
    p.add_argument("--quick", action="store_true", help="very short smoke run (xxs, batch 16, 2 rounds of 1 step)")
    p.add_argument("--quiet", action="store_true", help="no per-round lines")
    args = p.parse_args(argv)
    cuda = pick_cuda(args.device)
    if args.quick:
        defaults = dict(presets="xxs", batch=16 if not cuda else 128, rounds=2, steps=1, warmup=1, latency_calls=20,
                        round_warmup=0)
    else:
        defaults = dict(presets="xxs,xs,s", batch=512 if cuda else 64, rounds=5, steps=20 if cuda else 3,
                        warmup=10 if cuda else 2, latency_calls=100, round_warmup=1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.variants:
        known = {"mlit", "mlit+compile", "naive", "sparse", "public", "vit-dense", "moe-free"}
        args.variants = {n.strip() for n in args.variants.split(",") if n.strip()}
        if not args.variants or args.variants - known:
            p.error(f"--variants: unknown {sorted(args.variants - known)}; choose from {sorted(known)}")
        if "mlit+compile" in args.variants:
            args.compile = True
    return args


def pick_cuda(name: str) -> bool:
    return name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    amp = torch.bfloat16 if args.bf16 else None
    info = common.machine_info(device)
    print(common.machine_line(info))
    print(f"aten ops: every call reaching the dispatcher's Python key during one training step (forward, "
          f"autograd backward, clip, AdamW{' fused' if device.type == 'cuda' else ' foreach'}), "
          f"counted with a TorchDispatchMode; sync ops = {', '.join(sorted(common.SYNC_OPS))}", flush=True)
    results = []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        results.append(bench_preset(preset, args, device, amp))
    if args.json:
        common.write_json(args.json, {"machine": info, "args": vars(args), "results": results})
        print(f"\nraw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
