"""Export forms: mLiT written a second time for ONNX, the same function on the same weights.

`export.trace_to_onnx` traces a model inside `export_forms(model)`, which swaps these forms in
and restores the model after; nothing else uses them. They exist because the model as trained
exports badly: the dynamo exporter decomposes grouped-query SDPA into repeated K/V (Unsqueeze,
Expand, Reshape), a transposed K rebuilt from runtime shapes, MatMul and Softmax, and ONNX
Runtime fuses a linear layer's bias into its matmul (one Gemm) only on 2-D activations.

* `_ExportAttention`: one matmul per key/value head group, values applied as V^T P^T (wide
  rows) with `proj`'s columns permuted to match, batch-free reshapes;
* `_ExportMoE` and the attention forms: their weight matmuls (qkv, proj, W1/V, W2) run on
  2-D activations [B * N, D] (`_linear_2d`);
* `_ExportMLiT`: the last block computes only the class token, the one the head reads
  (`_ClassTokenAttention`).

What they save for `xxs` (docs/BENCHMARKS.md): the exporter's decomposed graph took 1.09-1.16x
the time of grouped attention on 2-D linear layers ("Levers measured"); the class-token block
and V^T P^T then took the fp32 file to 0.857x and dynamic int8 to 0.801x of that, 14 % and
20 % off, on a second host ("2026-11-29 (later): the last block for the class token only, and
values as V^T P^T").
`test_export_forms_compute_the_same_function_as_the_model` holds them to the model in float64.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .errors import MmlitError
from .model import Block, GroupedQueryAttention, MLiT, MoEFeedForward, split_fused_qkv


def _linear_2d(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for x [B, N, D], computed on [B * N, D]: ONNX Runtime fuses a 2-D MatMul and
    its bias Add into one Gemm (a 3-D MatMul keeps a separate Add)."""
    n = x.shape[1]
    return layer(x.reshape(-1, x.shape[-1])).view(-1, n, layer.out_features)


def _linear_with(layer: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """A `Linear` holding a copy of `weight` and `bias` (rows or columns of `layer`'s)."""
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out = out.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out.eval()


def _q_and_kv_rows(attn: GroupedQueryAttention, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `attn.qkv`'s weight or bias (`fused`) that make the queries, and those that
    make the keys and values, k's then v's."""
    q, k, v = split_fused_qkv(fused, attn.num_heads, attn.num_kv_heads, dim=0, per_head=attn.head_dim)
    return q, torch.cat([k, v])


class _ExportAttention(torch.nn.Module):
    """`GroupedQueryAttention.forward`'s function, written for a lean ONNX graph:

    * the query heads that share a key/value head are stacked along the token axis, so each
      group is one matmul against its K (no repeated K/V);
    * values are applied as V^T P^T, which gives each group's output as [head_dim, group * n]:
      rows group * n wide (290 for `xxs`) rather than head_dim (18) wide, which ONNX Runtime
      computes faster (57 against 74 µs per `xxs` layer in isolation, docs/BENCHMARKS.md,
      "2026-11-29 (later)");
    * that output, rows ordered (kv head, head_dim, query head in group), becomes token-major
      with one transpose of a [features, tokens] matrix, and `proj`'s input columns are
      permuted to the same order here, once, instead of moving the activations back;
    * every reshape uses -1 for the batch axis (no runtime shape arithmetic).

    Query head h uses kv head h // (heads / kv_heads), as SDPA's `enable_gqa` does."""

    def __init__(self, attn: GroupedQueryAttention):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.qkv = attn.qkv
        group, dim = self.num_heads // self.num_kv_heads, attn.proj.out_features
        by_kv_d_group = attn.proj.weight.view(dim, self.num_kv_heads, group, self.head_dim).transpose(2, 3)
        self.proj = _linear_with(attn.proj, by_kv_d_group.reshape(dim, -1), attn.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        heads, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        group = heads // kv
        q, k, v = split_fused_qkv(_linear_2d(self.qkv, x).view(-1, n, heads + 2 * kv, d), heads, kv, dim=2)
        q = q.reshape(-1, n, kv, group, d).permute(0, 2, 3, 1, 4).reshape(-1, kv, group * n, d)
        scores = (q * d ** -0.5) @ k.permute(0, 2, 3, 1)  # [B, kv, group * n, n]
        out_t = v.permute(0, 2, 3, 1) @ scores.softmax(dim=-1).transpose(-1, -2)  # [B, kv, d, group * n]
        out = out_t.reshape(-1, kv * d * group, n).transpose(1, 2)  # [B, n, (kv, d, group)]
        return _linear_2d(self.proj, out)


class _ClassTokenAttention(torch.nn.Module):
    """A `GroupedQueryAttention`'s output for the class token alone, [B, 1, D]: its query
    against every token's key and value. `qkv` is split into a query projection (run on one
    token) and a key/value projection (run on all), two weight matmuls for int8 to quantize."""

    def __init__(self, attn: GroupedQueryAttention):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        (w_q, w_kv), bias = _q_and_kv_rows(attn, attn.qkv.weight), attn.qkv.bias
        b_q, b_kv = (None, None) if bias is None else _q_and_kv_rows(attn, bias)
        self.q, self.kv = _linear_with(attn.qkv, w_q, b_q), _linear_with(attn.qkv, w_kv, b_kv)
        self.proj = attn.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        kv, d = self.num_kv_heads, self.head_dim
        # `self.kv`'s outputs are k's heads, then v's: the fused layout without q's heads.
        k, v = _linear_2d(self.kv, x).view(-1, n, 2 * kv, d).split([kv, kv], dim=2)
        q = self.q(x[:, 0]).view(-1, kv, self.num_heads // kv, d)
        scores = (q * d ** -0.5) @ k.permute(0, 2, 3, 1)  # [B, kv, group, n]
        out = scores.softmax(dim=-1) @ v.permute(0, 2, 1, 3)  # [B, kv, group, d]
        return self.proj(out.reshape(-1, self.num_heads * d)).unsqueeze(1)  # 2-D: one Gemm


class _ExportMoE(MoEFeedForward):
    """`MoEFeedForward.forward` (same routing: `route` is not touched) with W1/V and W2 on 2-D
    activations (`_linear_2d`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates, _ = self.route(x)
        a, v = _linear_2d(self.w1v, x).split([self.num_experts * self.hidden, self.hidden], dim=-1)
        a = F.silu(a).unflatten(-1, (self.num_experts, self.hidden))
        mixed = (gates.to(a.dtype).unsqueeze(-2) @ a).squeeze(-2)
        return _linear_2d(self.w2, mixed * v)


class _ExportMLiT(MLiT):
    """`MLiT.forward` with a last block that computes the class token only. The head reads
    nothing else, so the other tokens' last-block outputs never reach the logits: the last
    attention keeps one query row (`_ClassTokenAttention`), and the last norm, MoE layer and
    the final norm run on one token. For `xxs` this alone took the fp32 file to 0.910x and
    dynamic int8 to 0.916x of their time, 9 % and 8 % off (docs/BENCHMARKS.md, "2026-11-29
    (later)")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_embed(x.shape[0]), self.embed(x)], dim=1)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        cls = x[:, :1] + last.attn(last.norm1(x))
        cls = cls + last.ffn(last.norm2(cls))
        return self.head(self.norm(cls[:, 0]))


@contextmanager
def export_forms(model: MLiT):
    """Trace `model` as `_ExportMLiT`, with `_ExportAttention` (`_ClassTokenAttention` in the
    last block) and `_ExportMoE`: the same function and weights; the model is restored after.
    The permuted and split weights are copies made on entry: changing the model's weights
    inside the context does not reach them."""
    if type(model) is not MLiT:
        raise MmlitError(f"ONNX export takes an mLiT classifier, not {type(model).__name__}")
    swapped: list[tuple[Block, GroupedQueryAttention]] = []
    try:
        for i, block in enumerate(model.blocks):
            form = _ClassTokenAttention if i == len(model.blocks) - 1 else _ExportAttention
            swapped.append((block, block.attn))
            block.attn, block.ffn.__class__ = form(block.attn), _ExportMoE
        model.__class__ = _ExportMLiT
        yield model
    finally:
        model.__class__ = MLiT
        for block, attn in swapped:
            block.attn, block.ffn.__class__ = attn, MoEFeedForward
