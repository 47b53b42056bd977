"""mLiT: the ultra-light vision transformer of arXiv 2407.17783.

    x -> PatchEmbed -> [cls] + pos_embed -> Block x depth -> LayerNorm -> head(cls)
    Block(x) = x + Attention(LN(x));  x + MoEFeedForward(LN(x))

Attention is grouped-query (fewer key/value heads than query heads) through
`scaled_dot_product_attention`. The feed-forward is a mixture of SwiGLU experts whose V and
W2 are shared by the layer; only W1 is per expert:

    expert_e(x) = W2 (silu(x W1_e) * (x V))

Because V and W2 are shared and a token's gate weights sum to one,

    sum_e g_e expert_e(x) = W2 ((sum_e g_e silu(x W1_e)) * (x V))

so a layer is one matmul for every W1 and V together, a gate-weighted sum and one matmul
for W2 - no per-expert dispatch loop. `MoEFeedForward.forward_naive` keeps the literal
per-expert form as the test oracle.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


# the input dtypes torch.autocast casts to its own (float64 it leaves as it is)
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


class PatchEmbed(nn.Module):
    """Non-overlapping patches (conv with kernel = stride = patch) -> tokens [B, N, D]."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def split_fused_qkv(fused: torch.Tensor, num_heads: int, num_kv_heads: int, dim: int, per_head: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v out of `GroupedQueryAttention.qkv`, whose outputs are q's `num_heads` heads,
    then k's and v's `num_kv_heads` each, in that order along axis `dim` of `fused`. `per_head`
    is that axis's length per head: 1 for an axis of heads (the outputs viewed as [.., heads,
    head_dim]), head_dim for one of features (the weight's rows, the bias). The one place that
    layout is written: the attention and its export forms (`export_forms`) split with it."""
    return fused.split([num_heads * per_head, num_kv_heads * per_head, num_kv_heads * per_head], dim=dim)


class GroupedQueryAttention(nn.Module):
    """Multi-head attention where `num_kv_heads` key/value heads serve `num_heads` query heads.

    `kernel_head_dim` and `kernel_repeat_kv` change how SDPA is called, not what is computed
    (`forward_kernel_layout`); a run sets them for its device (`runtime.tune_attention`)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, qkv_bias: bool = True,
                 kernel_head_dim: int | None = None, kernel_repeat_kv: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        # One fused projection for q, k and v: a single matmul instead of three.
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * self.head_dim, dim)
        self.set_kernel_layout(kernel_head_dim or self.head_dim, kernel_repeat_kv)

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        return split_fused_qkv(qkv.transpose(1, 2), self.num_heads, self.num_kv_heads, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_layout() != (self.head_dim, False):
            return self.forward_kernel_layout(x)
        B, N, _ = x.shape
        q, k, v = self.split_qkv(x)
        # enable_gqa lets SDPA broadcast kv heads itself: no repeated K/V copies in memory.
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.proj(out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))

    def forward_kernel_layout(self, x: torch.Tensor) -> torch.Tensor:
        """`forward`, with SDPA given heads zero-padded to `kernel_head_dim` and, with
        `kernel_repeat_kv`, a K/V head per query head. On CUDA, SDPA's fused kernels want a head
        dim divisible by 8 (18 in xxs and s) and its memory-efficient kernel takes no grouped K/V;
        refused, it falls back to its math path (the [B, H, T, T] scores in memory). The layout
        is made on the weights, so no activation is copied: zero rows in the q/k/v projection
        add nothing to q.k (the scale stays the unpadded head's) and give zero output columns,
        which zero columns in `proj` drop; repeated K/V rows give the heads GQA shares. The
        projection's output, kept for the backward pass, grows by the padding and the repeats."""
        B, N, D = x.shape
        H, KV, d, width = self.num_heads, self.num_kv_heads, self.head_dim, self.kernel_head_dim
        repeat = H // KV if self.kernel_repeat_kv else 1
        kv_heads = KV * repeat

        def per_head(t: torch.Tensor) -> torch.Tensor:  # the qkv weight [.., D] or bias, one row block per head
            q, k, v = split_fused_qkv(t.unflatten(0, (H + 2 * KV, d)), H, KV, dim=0)
            heads = torch.cat([q, k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)])
            pad = (0, 0) * (t.dim() - 1) + (0, width - d)
            return F.pad(heads, pad).flatten(0, 1)

        bias = None if self.qkv.bias is None else per_head(self.qkv.bias)
        qkv = F.linear(x, per_head(self.qkv.weight), bias).view(B, N, H + 2 * kv_heads, width)
        q, k, v = split_fused_qkv(qkv.transpose(1, 2), H, kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5, enable_gqa=kv_heads != H)
        proj_weight = F.pad(self.proj.weight.unflatten(1, (H, d)), (0, width - d)).flatten(1)
        return F.linear(out.transpose(1, 2).reshape(B, N, H * width), proj_weight, self.proj.bias)

    def kernel_layout(self) -> tuple[int, bool]:
        return self.kernel_head_dim, self.kernel_repeat_kv

    def set_kernel_layout(self, head_dim: int, repeat_kv: bool) -> None:
        if head_dim < self.head_dim:
            raise ValueError(f"kernel_head_dim {head_dim} is below the head dim {self.head_dim}")
        self.kernel_head_dim, self.kernel_repeat_kv = head_dim, repeat_kv and self.num_kv_heads != self.num_heads

    def kernel_layouts(self) -> list[tuple[int, bool]]:
        """The layouts worth timing on CUDA: as built first; heads padded to a multiple of 8;
        K/V repeated (grouped K/V only)."""
        d = self.head_dim
        widths = [d] if d % 8 == 0 else [d, -(-d // 8) * 8]
        repeats = [False, True] if self.num_kv_heads != self.num_heads else [False]
        return [(w, r) for r in repeats for w in widths]


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward `W2 (silu(x W1) * (x V))` (used by the MAE decoder)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w1v = nn.Linear(dim, 2 * hidden)  # W1 and V in one matmul
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, v = self.w1v(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(a) * v)


class MoEFeedForward(nn.Module):
    """Mixture of SwiGLU experts with shared V and W2; a linear top-k router.

    Parameters: `router` (dim -> E), `w1v` holding every expert's W1 and the shared V stacked
    as rows `[W1_0; ...; W1_{E-1}; V]` (one matmul), and the shared `w2`.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int = 2,
                 router_noise: float = 0.0, aux_loss_weight: float = 0.0):
        super().__init__()
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        self.router_noise, self.aux_loss_weight = router_noise, aux_loss_weight
        self.router = nn.Linear(dim, num_experts)
        self.w1v = nn.Linear(dim, (num_experts + 1) * hidden)
        self.w2 = nn.Linear(hidden, dim)
        # Expert usage: filled only while `track_usage` is on, so the hot loop pays nothing.
        self.track_usage = False
        self.register_buffer("expert_counts", torch.zeros(num_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate weights [.., E] (zero outside each token's top-k, softmax over the chosen logits)
        and the chosen expert indices [.., k]."""
        logits = self.router(x)
        if self.training and self.router_noise > 0:
            logits = logits + torch.randn_like(logits) * self.router_noise
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        # Gate softmax in fp32 (at least): `forward` casts the gates to the activations' dtype
        # only for the mixing matmul.
        weights = top_logits.to(torch.promote_types(top_logits.dtype, torch.float32)).softmax(dim=-1)
        gates = torch.zeros(logits.shape, dtype=weights.dtype, device=logits.device).scatter(-1, top_idx, weights)
        if self.track_usage:
            self.expert_counts += F.one_hot(top_idx, self.num_experts).flatten(0, -2).sum(0).to(self.expert_counts)
        if self.training and self.aux_loss_weight > 0:
            # Switch-Transformer load balancing, E * sum_e f_e * P_e: f_e the share of the
            # token-to-expert assignments that went to expert e (the shares sum to 1 for any
            # top-k), P_e its mean router probability. Perfectly balanced routing gives 1.
            probs = logits.float().softmax(dim=-1).flatten(0, -2)
            routed = F.one_hot(top_idx, self.num_experts).flatten(0, -2).float().mean(0)
            self.aux_loss = self.aux_loss_weight * self.num_experts * (routed * probs.mean(0)).sum()
        else:
            self.aux_loss = None
        return gates, top_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates, _ = self.route(x)
        a, v = self.w1v(x).split([self.num_experts * self.hidden, self.hidden], dim=-1)
        a = F.silu(a).unflatten(-1, (self.num_experts, self.hidden))  # [.., E, hidden]
        # The fp32 gates meet the activations in their dtype (bf16 under autocast or in a model
        # cast with .to(torch.bfloat16)): a matmul needs one dtype.
        mixed = (gates.to(a.dtype).unsqueeze(-2) @ a).squeeze(-2)  # sum_e g_e silu(x W1_e)
        return self.w2(mixed * v)

    def expert_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(W1_e weights, W1_e biases, V weight, V bias) as separate tensors."""
        w, b = self.w1v.weight, self.w1v.bias
        H, E = self.hidden, self.num_experts
        return ([w[e * H:(e + 1) * H] for e in range(E)], [b[e * H:(e + 1) * H] for e in range(E)],
                w[E * H:], b[E * H:])

    def forward_naive(self, x: torch.Tensor) -> torch.Tensor:
        """The literal definition: every expert applied to every token, weighted by its gate."""
        gates, _ = self.route(x)
        w1, b1, wv, bv = self.expert_weights()
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            expert = self.w2(F.silu(F.linear(x, w1[e], b1[e])) * F.linear(x, wv, bv))
            out = out + gates[..., e:e + 1].to(expert.dtype) * expert
        return out


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)); x + ffn(LN(x))."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, ffn: nn.Module,
                 qkv_bias: bool = True, drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = GroupedQueryAttention(dim, num_heads, num_kv_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.ffn = ffn
        # Identity when off: one module call less per branch, which shows at batch-1 latency.
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.ffn(self.norm2(x)))


class MLiT(nn.Module):
    """The mLiT classifier (and, with `num_classes=0`, the MAE encoder)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D))
        drop = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.num_kv_heads,
                  MoEFeedForward(D, hidden, experts, cfg.top_k, cfg.router_noise, cfg.aux_loss_weight),
                  cfg.qkv_bias, drop[i], cfg.norm_eps)
            for i, (hidden, experts) in enumerate(zip(cfg.hidden_sizes(), cfg.experts_per_layer())))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def num_features(self) -> int:
        """Width of the features the head reads (timm's name): the class token's embed_dim."""
        return self.cfg.embed_dim

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for `num_classes` (0: none, the model returns the class token's features),
        zero-initialised as at construction, on the old head's device and dtype; as timm's. The
        pooling is the class token's ("token", timm's name; the only one). Class names the model
        carried (`load_model`) are dropped when the number of classes changes: they named the old head."""
        if global_pool not in (None, "token"):
            raise ValueError(f"mLiT pools by its class token: global_pool must be 'token' or None, got {global_pool!r}")
        cfg = dataclasses.replace(self.cfg, num_classes=num_classes)
        cfg.validate()
        self.cfg, like = cfg, self.norm.weight
        self.head = nn.Linear(self.cfg.embed_dim, num_classes, device=like.device, dtype=like.dtype) \
            if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        if len(getattr(self, "class_names", None) or [None] * num_classes) != num_classes:
            self.class_names = None
        if isinstance(getattr(self, "pretrained_cfg", None), dict):
            self.pretrained_cfg["num_classes"] = num_classes
            if len(self.pretrained_cfg.get("label_names") or [None] * num_classes) != num_classes:
                self.pretrained_cfg["label_names"] = None

    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.ffn for b in self.blocks]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embedding, no class token: [B, N, D]."""
        C, S = self.cfg.in_chans, self.cfg.image_size
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"mLiT takes a torch.Tensor of float images [N, {C}, {S}, {S}], got a {type(x).__name__} "
                             f"(mmlit_cli.preprocess makes one from files, Pillow images or arrays)")
        if x.dim() != 4 or tuple(x.shape[1:]) != (C, S, S) or not x.is_floating_point():
            # as timm's patch embedding asserts its image size: the shape error from deep inside says less
            raise ValueError(f"mLiT takes float images [N, {C}, {S}, {S}], normalised; got {x.dtype} "
                             f"{list(x.shape)} (mmlit_cli.preprocess makes them from files or Pillow images)")
        weights = self.input_dtype  # (dtypes are fixed when compiled: the check leaves nothing in the graph)
        if x.dtype != weights and not (x.dtype in _AUTOCAST_CASTS and torch.is_autocast_enabled(x.device.type)):
            raise ValueError(f"this mLiT's weights are {weights} and its input {x.dtype}: pass x.to({weights})")
        return self.patch_embed(x) + self.pos_embed[:, 1:]

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the images must have (the patch embedding's): float32, or what `model.to(...)` made it."""
        return self.patch_embed.proj.weight.dtype

    def cls_embed(self, batch: int) -> torch.Tensor:
        return (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class token + the given (already position-embedded) patch tokens -> blocks -> norm."""
        x = torch.cat([self.cls_embed(tokens.shape[0]), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.embed(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The class token's features through the head (`pre_logits`: before it, as timm's)."""
        pooled = features[:, 0]
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the load-balancing losses of the last forward (None when off)."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def set_usage_tracking(self, on: bool) -> None:
        for m in self.moe_layers():
            m.track_usage = on
            m.expert_counts.zero_()

    def expert_usage(self) -> list[list[float]]:
        """Per layer, the share of routed token slots each expert received since tracking began."""
        out = []
        for m in self.moe_layers():
            total = m.expert_counts.sum().clamp_min(1)
            out.append((m.expert_counts / total).tolist())
        return out

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def layer_id(self, name: str) -> int:
        """Depth index for layer-wise lr decay: 0 = embeddings, 1..depth = blocks, depth+1 = head."""
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.cfg.depth + 1


def resize_pos_embed(pos_embed: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Bicubic resampling of a [1, 1 + g*g, D] position embedding to another square grid (a
    checkpoint trained at another image size; timm's `resample_abs_pos_embed`)."""
    old_grid = int((pos_embed.shape[1] - 1) ** 0.5)
    new_grid = int((new_tokens - 1) ** 0.5)
    if old_grid == new_grid:
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)
