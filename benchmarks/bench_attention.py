#!/usr/bin/env python
"""Which of SDPA's attention kernels mLiT's attention can use, and how fast each is.

mLiT's heads are 18 wide (xxs, s: 108/6, 144/8; xs 16) with grouped K/V (`enable_gqa`).
On CUDA, FlashAttention and memory-efficient attention want a head dim divisible by 8, and
the memory-efficient kernel does not take grouped K/V, so SDPA may fall back to its math path
(the [B, H, T, T] scores in memory). This times one attention call, forward and backward, at
the preset's shapes for each backend that accepts them, and two levers: K/V repeated to every
head (no GQA), and q/k/v zero-padded to a head dim of 24 or 32 (the same output: zeros add
nothing to q.k, and the padded output columns are dropped). A CUDA run chooses a layout
itself, timing its own attention layer (`mmlit_cli.runtime.tune_attention`, padding to the
next multiple of 8 on the weights, not on q/k/v as here); this table shows which of SDPA's
kernels each shape gets.

    python benchmarks/bench_attention.py --device cuda --presets xxs,s --batch 512
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (also puts the repository root on sys.path)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmlit_cli.config import load_config  # noqa: E402

BACKENDS = ("flash", "efficient", "cudnn", "math")


def _backend(name: str):
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_to: int | None, repeat_kv: bool):
    """The attention output [B, H, T, d] of q [B, H, T, d] and k, v [B, KV, T, d], by one lever."""
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[-1]
    if repeat_kv and kv_heads != heads:
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    if pad_to and pad_to > d:
        q, k, v = (F.pad(t, (0, pad_to - d)) for t in (q, k, v))
        scale = d ** -0.5  # the unpadded head's scale
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=k.shape[1] != heads)
        return out[..., :d]
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != heads)


def time_variant(backend: str, shapes: tuple[int, int, int, int, int], device: torch.device, dtype: torch.dtype,
                 pad_to: int | None, repeat_kv: bool, steps: int) -> tuple[float | None, str]:
    """(ms per forward + backward, or None when the backend refuses; the reason, first line)."""
    from torch.nn.attention import sdpa_kernel
    B, H, KV, T, d = shapes
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, H, T, d, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(B, KV, T, d, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(B, KV, T, d, generator=gen).to(device, dtype).requires_grad_()
    grad = torch.randn(B, H, T, d, generator=gen).to(device, dtype)

    def step():
        q.grad = k.grad = v.grad = None
        attention_call(q, k, v, pad_to, repeat_kv).backward(grad)

    with warnings.catch_warnings(record=True) as caught, sdpa_kernel(_backend(backend)):
        warnings.simplefilter("always")
        try:
            step()
            seconds = common.timed(lambda: [step() for _ in range(steps)], device)
        except Exception as e:  # noqa: BLE001 - a refusal (RuntimeError) or a kernel's own failure: a row
            # SDPA warns why each kernel refused ("... requires last dimension ... divisible by 8")
            why = [line.strip() for w in caught for line in str(w.message).splitlines()
                   if line.strip() and not line.rstrip().endswith(":") and "No viable backend" not in line]
            return None, ("; ".join(dict.fromkeys(why)) or str(e).splitlines()[0])[:90]
    return 1000 * seconds / steps, ""


def attention_rows(preset: str, device: torch.device, batch: int, steps: int) -> list[list[str]]:
    cfg = load_config(preset).model
    tokens = cfg.num_patches + 1
    d = cfg.embed_dim // cfg.num_heads
    shapes = (batch, cfg.num_heads, cfg.num_kv_heads, tokens, d)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    levers = [("as built (GQA)", None, False), ("K/V repeated", None, True)]
    levers += [(f"padded to {p} (GQA)", p, False) for p in (24, 32) if p > d]
    levers += [(f"padded to {p}, K/V repeated", p, True) for p in (24, 32) if p > d]
    rows = []
    for label, pad_to, repeat_kv in levers:
        for backend in BACKENDS:
            if backend in ("efficient", "cudnn") and device.type != "cuda":
                continue  # CUDA kernels
            ms, why = time_variant(backend, shapes, device, dtype, pad_to, repeat_kv, steps)
            rows.append([preset, f"{cfg.num_heads}/{cfg.num_kv_heads} x {d}", label, backend,
                         "-" if ms is None else f"{ms:.3f}", why or ""])
    return rows


def attention_table(presets: list[str], device: torch.device, batch: int, steps: int) -> str:
    rows = [row for preset in presets for row in attention_rows(preset, device, batch, steps)]
    dtype = "bf16" if device.type == "cuda" else "fp32"
    return common.format_table(["preset", "heads/kv x dim", "lever", "backend", "ms fwd+bwd", "refused because"],
                               rows, f"one attention call, batch {batch}, {dtype}, on {device} "
                                     f"({steps} timed calls each)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="xxs,s")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    print(common.machine_line(common.machine_info(device)), flush=True)
    print(attention_table([s.strip() for s in args.presets.split(",") if s.strip()], device, args.batch, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
