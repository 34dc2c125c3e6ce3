"""Utility reduction ``v_c = sum_b |sum_hw g*a| / (B*H*W)`` per channel, in float32.

One program per block of channels reduces every sample in a fixed order (per-sample sums over the
pixels, then their absolute values over the batch): deterministic, no atomics. Works for NCHW and
channels-last tensors through strides.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import bucket, elementwise_configs


# C is the kept width (the activation is compact): the key holds its power-of-two bucket instead.
@triton.autotune(configs=elementwise_configs(single_blocks=(64, 16)), key=["B", "C_BUCKET", "HW"])
@triton.jit(do_not_specialize=["C", "C_BUCKET"])
def _channel_utility_kernel(
    a_ptr, g_ptr, v_ptr, B, C, C_BUCKET, HW, W,
    san, sac, sah, saw, sgn, sgc, sgh, sgw, inv_count,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    a_sample = a_ptr  # pointer arithmetic is 64-bit: no int32 overflow on large batches
    g_sample = g_ptr
    for _ in range(B):
        per_sample = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p0 in range(0, HW, BLOCK_M):
            offs_p = p0 + tl.arange(0, BLOCK_M)
            p_ok = offs_p < HW
            h = offs_p // W
            w = offs_p % W
            ok = p_ok[:, None] & c_ok[None, :]
            av = tl.load(a_sample + (h * sah + w * saw)[:, None] + offs_c[None, :] * sac,
                         mask=ok, other=0.0)
            gv = tl.load(g_sample + (h * sgh + w * sgw)[:, None] + offs_c[None, :] * sgc,
                         mask=ok, other=0.0)
            per_sample += tl.sum(av.to(tl.float32) * gv.to(tl.float32), axis=0)
        total += tl.abs(per_sample)
        a_sample += san
        g_sample += sgn
    tl.store(v_ptr + offs_c, total * inv_count, mask=c_ok)


def channel_utility(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-channel utility of activation ``a`` with gradient ``g`` (same 4-D shape), float32."""
    b, c, h, w = a.shape
    v = torch.empty(c, dtype=torch.float32, device=a.device)

    def grid(meta):
        return (triton.cdiv(c, meta["BLOCK_C"]),)

    wrap_triton(_channel_utility_kernel)[grid](
        a, g, v, b, c, bucket(c), h * w, w, *a.stride(), *g.stride(), 1.0 / float(b * h * w),
    )
    return v
