"""Utility reduction ``v_c = sum_b |sum_hw g*a| / (B*H*W)`` per channel, in float32, and the
layer's utility update ``U[idx] = decay * U[idx] + v / max(v)``.

One program per block of channels reduces every sample in a fixed order (per-sample sums over the
pixels, then their absolute values over the batch): deterministic, no atomics. Works for NCHW and
channels-last tensors through strides. With ``scale``/``shift`` the activation is ``y * scale + shift``
per channel, computed on the fly: the BN output recomputed from the conv output, never stored.

The update is one small program per layer (the kept width fits a few blocks): the max, the
normalisation, the decay and the scatter into the utility buffer in one launch, where PyTorch ops
take six.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import bucket, elementwise_configs, kept_count


# C is the kept width (the activation is compact): the key holds its power-of-two bucket instead.
@triton.autotune(configs=elementwise_configs(single_blocks=(64, 16)), key=["B", "C_BUCKET", "HW"])
@triton.jit(do_not_specialize=["C", "C_BUCKET"])
def _channel_utility_kernel(
    a_ptr, g_ptr, v_ptr, scale_ptr, shift_ptr, idx_ptr, count_ptr, B, C, C_BUCKET, HW, W,
    san, sac, sah, saw, sgn, sgc, sgh, sgw, inv_count,
    HAS_AFFINE: tl.constexpr, COUNTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    slot = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_store = slot < C
    # Counted: ``a``/``g`` are full width and slot j reads channel idx[j], kept for j < count
    # (kept_count); a block without kept slots skips the batch loop and stores zeros.
    k = kept_count(count_ptr, C, COUNTED)
    c_ok = slot < k
    batches = tl.where(tl.program_id(0) * BLOCK_C < k, B, 0)
    if COUNTED:
        offs_c = tl.load(idx_ptr + slot, mask=c_store, other=0)
    else:
        offs_c = slot
    if HAS_AFFINE:
        scale = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    a_sample = a_ptr  # pointer arithmetic is 64-bit: no int32 overflow on large batches
    g_sample = g_ptr
    for _ in range(batches):
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
            av = av.to(tl.float32)
            if HAS_AFFINE:  # masked-off lanes become `shift`, but their gradient loaded as 0
                av = av * scale[None, :] + shift[None, :]
            per_sample += tl.sum(av * gv.to(tl.float32), axis=0)
        total += tl.abs(per_sample)
        a_sample += san
        g_sample += sgn
    tl.store(v_ptr + slot, total * inv_count, mask=c_store)


# The kept width K changes on nearly every step: neither specialised on nor used to size the block,
# so one compiled binary serves every width.
UPDATE_BLOCK = 1024


@triton.jit(do_not_specialize=["K"])
def _utility_update_kernel(u_ptr, v_ptr, idx_ptr, count_ptr, K, decay, FULL: tl.constexpr, COUNTED: tl.constexpr,
                           BLOCK: tl.constexpr):
    """``U[idx[j]] = decay * U[idx[j]] + v[j] / max(v)`` for j < K (``v / max = 0`` when max is 0);
    ``COUNTED``: K is read from ``count_ptr``."""
    if COUNTED:
        K = tl.load(count_ptr)
    offs = tl.arange(0, BLOCK)
    top = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        v = tl.load(v_ptr + k0 + offs, mask=k0 + offs < K, other=0.0)
        top = tl.maximum(top, v)
    peak = tl.max(top, axis=0)
    for k0 in range(0, K, BLOCK):
        ok = k0 + offs < K
        v = tl.load(v_ptr + k0 + offs, mask=ok, other=0.0)
        if FULL:
            where = k0 + offs
        else:
            where = tl.load(idx_ptr + k0 + offs, mask=ok, other=0)
        u = tl.load(u_ptr + where, mask=ok, other=0.0)
        fresh = tl.where(peak > 0.0, v / tl.where(peak > 0.0, peak, 1.0), 0.0)  # no 0/0 computed
        tl.store(u_ptr + where, fresh + decay * u, mask=ok)


def channel_utility(a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor | None = None,
                    shift: torch.Tensor | None = None, kept: tuple[torch.Tensor, torch.Tensor] | None = None,
                    ) -> torch.Tensor:
    """Per-channel utility of activation ``a`` with gradient ``g`` (same 4-D shape), float32.

    With ``scale`` and ``shift`` (per channel) the activation is ``a * scale + shift``. ``kept``:
    ``(order, count)``, a permutation of the channels with the kept ones first and their number
    (int32 device scalar); entry j of the result is then channel ``order[j]``'s utility for
    j < count and 0 after."""
    b, c, h, w = a.shape
    v = torch.empty(c, dtype=torch.float32, device=a.device)
    has_affine = scale is not None

    def grid(meta):
        return (triton.cdiv(c, meta["BLOCK_C"]),)

    wrap_triton(_channel_utility_kernel)[grid](
        a, g, v, scale if has_affine else v, shift if has_affine else v, *(kept if kept is not None else (v, v)),
        b, c, bucket(c), h * w, w, *a.stride(), *g.stride(), 1.0 / float(b * h * w), HAS_AFFINE=has_affine,
        COUNTED=kept is not None,
    )
    return v


def update_utility(utility: torch.Tensor, v: torch.Tensor, idx: torch.Tensor | None, decay: float,
                   count: torch.Tensor | None = None) -> None:
    """``utility[idx] = decay * utility[idx] + v / max(v)`` in place, in one launch (``idx`` None: all).
    ``count``: only the first ``count`` (int32 device scalar) entries of ``idx`` and ``v``."""
    wrap_triton(_utility_update_kernel)[(1,)](
        utility, v, v if idx is None else idx, v if count is None else count, v.numel(), float(decay),
        FULL=idx is None, COUNTED=count is not None, BLOCK=UPDATE_BLOCK,
    )
