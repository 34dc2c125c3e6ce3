"""Training-mode BatchNorm and the gate over the kept channels only, for the static-shape step.

The conv output ``y`` is full width; the selection is ``(order, count)`` read on the device (kept
channels first, see ``dcp_kernels.rule.kept_first``). Four kernels, each over a grid spanning every
channel (spare lanes masked, tiles without a kept channel skip their loops):

* ``_bn_stats_kernel``: per kept channel, the batch mean and variance (one pass over N*H*W, tiles
  combined with Chan's parallel-variance formula, fixed order: deterministic), the inverse standard
  deviation, and the running statistics of the kept channels updated in place;
* ``_bn_apply_kernel``: ``out = (y - mean) * invstd * weight + bias`` on the kept channels and exact
  zeros elsewhere: BN and the gate in one pass, every element of ``out`` written;
* ``_bn_backward_reduce_kernel``: per kept channel and sample, ``S1 = sum_hw g`` and
  ``S2 = sum_hw g * xhat``; over the batch they give BN's parameter gradients (``sum S2``, ``sum S1``),
  and ``sum_b |weight * S2 + bias * S1|`` is the channel's DCP utility (``sum_hw g * a`` for the BN
  output ``a = weight * xhat + bias``): the utility reduction rides along, no second pass;
* ``_bn_backward_apply_kernel``: ``grad_y = weight * invstd * (g - mean(g) - xhat * mean(g * xhat))``
  on the kept channels, zeros elsewhere.

The gradient arriving at an unselected channel is never read (the gate's backward zeroes it), so
nothing multiplies by a mask. Accumulation in fp32 whatever the activation dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import _single_config, bucket

# Channel blocks of 16-32 and pixel tiles of 64-256: the reductions stream N*H*W per channel block.
if _single_config():
    _STATS_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_C": 16}, num_warps=4)]
else:
    _STATS_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_C": c}, num_warps=w)
                      for m, c, w in ((64, 32, 4), (128, 16, 4), (256, 16, 8), (128, 32, 8))]


@triton.jit
def _channel_block(idx_ptr, count_ptr, C, B, BLOCK_C: tl.constexpr):
    """A reduction program's channel slots: (slot, in range, kept, channel index, batches to reduce:
    ``B``, or 0 for a block without a kept slot, which then stores zeros)."""
    slot = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_store = slot < C
    kept = tl.load(count_ptr)
    chan = tl.load(idx_ptr + slot, mask=c_store, other=0)
    return slot, c_store, slot < kept, chan, tl.where(tl.program_id(0) * BLOCK_C < kept, B, 0)


@triton.jit
def _pixel_channel_tile(idx_ptr, count_ptr, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                        INDEXED: tl.constexpr):
    """An elementwise program's (pixels x channel slots) tile: (pixels, pixel in range, slot in
    range, kept, channel index). ``INDEXED`` False: compact tensors, slot j is channel j and every
    slot in range is kept (``idx_ptr``/``count_ptr`` unread)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_store = slot < C
    if INDEXED:  # one return statement: Triton checks every return for one type
        live = slot < tl.load(count_ptr)
        chan = tl.load(idx_ptr + slot, mask=c_store, other=0)
    else:
        live = c_store
        chan = slot.to(tl.int64)
    return offs_m, offs_m < M, c_store, live, chan


@triton.jit
def _pixel_offsets(offs_m, HW, W, sn, sh, sw):
    """Element offsets of flat pixel indices over (N, H, W) for strides ``sn, sh, sw`` (64-bit)."""
    n = (offs_m // HW).to(tl.int64)
    p = offs_m % HW
    return n * sn + (p // W) * sh + (p % W) * sw


@triton.jit
def _sample_tile(g_sample, y_sample, p0, HW, W, live, chan, sgc, sgh, sgw, syc, syh, syw, BLOCK_M: tl.constexpr):
    """One sample's (pixels p0.. x channel slots) tiles of ``g`` (float32) and ``y`` (as stored);
    lanes outside the pixels or the live channels are 0."""
    offs_p = p0 + tl.arange(0, BLOCK_M)
    ok = (offs_p < HW)[:, None] & live[None, :]
    h = offs_p // W
    w = offs_p % W
    gv = tl.load(g_sample + (h * sgh + w * sgw)[:, None] + chan[None, :] * sgc, mask=ok, other=0.0)
    yv = tl.load(y_sample + (h * syh + w * syw)[:, None] + chan[None, :] * syc, mask=ok, other=0.0)
    return gv.to(tl.float32), yv


# restore_value: autotuning runs each configuration on the real arguments; the running statistics it
# updates in place must come back as they were.
@triton.autotune(configs=_STATS_CONFIGS, key=["B", "C", "HW"], restore_value=["rm_ptr", "rv_ptr"])
@triton.jit
def _bn_stats_kernel(
    y_ptr, idx_ptr, count_ptr, rm_ptr, rv_ptr, mean_ptr, invstd_ptr,
    B, C, HW, W, syn, syc, syh, syw, momentum, eps, unbias,
    TRACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    _, c_store, live, chan, batches = _channel_block(idx_ptr, count_ptr, C, B, BLOCK_C)
    seen = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    y_sample = y_ptr
    for _ in range(batches):
        for p0 in range(0, HW, BLOCK_M):
            offs_p = p0 + tl.arange(0, BLOCK_M)
            p_ok = offs_p < HW
            ok = p_ok[:, None] & live[None, :]
            v = tl.load(y_sample + ((offs_p // W) * syh + (offs_p % W) * syw)[:, None] + chan[None, :] * syc,
                        mask=ok, other=0.0).to(tl.float32)
            count = tl.sum(p_ok.to(tl.float32), axis=0)
            tile_mean = tl.sum(v, axis=0) / count
            d = tl.where(ok, v - tile_mean[None, :], 0.0)
            total = seen + count
            delta = tile_mean - mean
            mean += delta * (count / total)
            m2 += tl.sum(d * d, axis=0) + delta * delta * (seen * count / total)
            seen = total
        y_sample += syn
    var = m2 / tl.where(seen > 0, seen, 1.0)
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + chan, tl.where(live, mean, 0.0), mask=c_store)
    tl.store(invstd_ptr + chan, tl.where(live, invstd, 0.0), mask=c_store)
    if TRACK:
        rm = tl.load(rm_ptr + chan, mask=live, other=0.0)
        rv = tl.load(rv_ptr + chan, mask=live, other=0.0)
        tl.store(rm_ptr + chan, (momentum * mean + (1.0 - momentum) * rm.to(tl.float32)).to(rm_ptr.dtype.element_ty),
                 mask=live)
        tl.store(rv_ptr + chan, (momentum * var * unbias + (1.0 - momentum) * rv.to(tl.float32)).to(
            rv_ptr.dtype.element_ty), mask=live)


if _single_config():
    _APPLY_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_C": 16}, num_warps=4)]
else:
    _APPLY_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_C": c}, num_warps=w)
                      for m, c, w in ((64, 32, 4), (128, 32, 4), (64, 64, 4), (256, 16, 8))]


@triton.autotune(configs=_APPLY_CONFIGS, key=["M", "C", "HW"])
@triton.jit
def _bn_apply_kernel(
    y_ptr, out_ptr, idx_ptr, count_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr,
    M, C, HW, W, syn, syc, syh, syw, son, soc, soh, sow,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m, m_ok, c_store, live, chan = _pixel_channel_tile(idx_ptr, count_ptr, M, C, BLOCK_M, BLOCK_C, True)
    scale = tl.load(w_ptr + chan, mask=live, other=0.0).to(tl.float32) * tl.load(invstd_ptr + chan, mask=live,
                                                                                 other=0.0)
    shift = tl.load(b_ptr + chan, mask=live, other=0.0).to(tl.float32) - tl.load(mean_ptr + chan, mask=live,
                                                                                other=0.0) * scale
    v = tl.load(y_ptr + _pixel_offsets(offs_m, HW, W, syn, syh, syw)[:, None] + chan[None, :] * syc,
                mask=m_ok[:, None] & live[None, :], other=0.0).to(tl.float32)
    out = tl.where(live[None, :], v * scale[None, :] + shift[None, :], 0.0)
    tl.store(out_ptr + _pixel_offsets(offs_m, HW, W, son, soh, sow)[:, None] + chan[None, :] * soc,
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_store[None, :])


@triton.autotune(configs=_STATS_CONFIGS, key=["B", "C", "HW"])
@triton.jit
def _bn_backward_reduce_kernel(
    g_ptr, y_ptr, idx_ptr, count_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, gw_ptr, gb_ptr, v_ptr,
    B, C, HW, W, sgn, sgc, sgh, sgw, syn, syc, syh, syw, inv_count,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, V_BY_CHANNEL: tl.constexpr,
):
    slot, c_store, live, chan, batches = _channel_block(idx_ptr, count_ptr, C, B, BLOCK_C)
    mean = tl.load(mean_ptr + chan, mask=live, other=0.0)
    invstd = tl.load(invstd_ptr + chan, mask=live, other=0.0)
    weight = tl.load(w_ptr + chan, mask=live, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + chan, mask=live, other=0.0).to(tl.float32)
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    utility = tl.zeros((BLOCK_C,), dtype=tl.float32)
    g_sample = g_ptr
    y_sample = y_ptr
    for _ in range(batches):
        s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p0 in range(0, HW, BLOCK_M):
            gv, yv = _sample_tile(g_sample, y_sample, p0, HW, W, live, chan, sgc, sgh, sgw, syc, syh, syw, BLOCK_M)
            xhat = (yv.to(tl.float32) - mean[None, :]) * invstd[None, :]
            s1 += tl.sum(gv, axis=0)
            s2 += tl.sum(gv * xhat, axis=0)
        sum_g += s1
        sum_gx += s2
        utility += tl.abs(weight * s2 + bias * s1)
        g_sample += sgn
        y_sample += syn
    tl.store(gw_ptr + chan, tl.where(live, sum_gx, 0.0).to(gw_ptr.dtype.element_ty), mask=c_store)
    tl.store(gb_ptr + chan, tl.where(live, sum_g, 0.0).to(gb_ptr.dtype.element_ty), mask=c_store)
    if V_BY_CHANNEL:  # at the channel, 0 outside the selection: every entry written
        tl.store(v_ptr + chan, tl.where(live, utility * inv_count, 0.0), mask=c_store)
    else:  # in the permutation's slots (past the count: 0)
        tl.store(v_ptr + slot, utility * inv_count, mask=c_store)


# Also the torch backend's fused BN backward on compact tensors (INDEXED False, batch_norm_compact.py),
# whose width C moves from step to step: the autotuning key holds its power-of-two bucket, and no
# compiled variant is specialised on it.
@triton.autotune(configs=_APPLY_CONFIGS, key=["M", "C_BUCKET", "HW"])
@triton.jit(do_not_specialize=["C", "C_BUCKET"])
def _bn_backward_apply_kernel(
    g_ptr, y_ptr, gy_ptr, idx_ptr, count_ptr, w_ptr, mean_ptr, invstd_ptr, gw_ptr, gb_ptr,
    M, C, C_BUCKET, HW, W, sgn, sgc, sgh, sgw, syn, syc, syh, syw, sdn, sdc, sdh, sdw, inv_m,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, INDEXED: tl.constexpr,
):
    offs_m, m_ok, c_store, live, chan = _pixel_channel_tile(idx_ptr, count_ptr, M, C, BLOCK_M, BLOCK_C, INDEXED)
    mean = tl.load(mean_ptr + chan, mask=live, other=0.0)
    invstd = tl.load(invstd_ptr + chan, mask=live, other=0.0)
    scale = tl.load(w_ptr + chan, mask=live, other=0.0).to(tl.float32) * invstd
    mean_g = tl.load(gb_ptr + chan, mask=live, other=0.0).to(tl.float32) * inv_m
    mean_gx = tl.load(gw_ptr + chan, mask=live, other=0.0).to(tl.float32) * inv_m
    ok = m_ok[:, None] & live[None, :]
    gv = tl.load(g_ptr + _pixel_offsets(offs_m, HW, W, sgn, sgh, sgw)[:, None] + chan[None, :] * sgc,
                 mask=ok, other=0.0).to(tl.float32)
    yv = tl.load(y_ptr + _pixel_offsets(offs_m, HW, W, syn, syh, syw)[:, None] + chan[None, :] * syc,
                 mask=ok, other=0.0).to(tl.float32)
    xhat = (yv - mean[None, :]) * invstd[None, :]
    grad = tl.where(live[None, :], scale[None, :] * (gv - mean_g[None, :] - xhat * mean_gx[None, :]), 0.0)
    tl.store(gy_ptr + _pixel_offsets(offs_m, HW, W, sdn, sdh, sdw)[:, None] + chan[None, :] * sdc,
             grad.to(gy_ptr.dtype.element_ty), mask=m_ok[:, None] & c_store[None, :])


def _check_batch(y: torch.Tensor) -> None:
    if y.shape[0] * y.shape[2] * y.shape[3] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}")


def batch_norm_gate(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running: tuple[torch.Tensor, torch.Tensor] | None,
    kept: tuple[torch.Tensor, torch.Tensor], momentum: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, invstd)``: training BN of the kept channels of the full-width ``y`` and the gate
    (zeros elsewhere); the running statistics of the kept channels updated in place (``running``:
    ``(running_mean, running_var)`` or None). ``mean``/``invstd`` are full-length float32 vectors
    (0 outside the kept channels). Two launches."""
    _check_batch(y)
    n, c, h, w = y.shape
    order, count = kept
    mean = torch.empty(c, dtype=torch.float32, device=y.device)
    invstd = torch.empty_like(mean)
    rm, rv = running if running is not None else (mean, mean)
    m = n * h * w
    wrap_triton(_bn_stats_kernel)[lambda meta: (triton.cdiv(c, meta["BLOCK_C"]),)](
        y, order, count, rm, rv, mean, invstd, n, c, h * w, w, *y.stride(), float(momentum), float(eps),
        m / (m - 1), TRACK=running is not None,
    )
    out = torch.empty_like(y)
    wrap_triton(_bn_apply_kernel)[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))](
        y, out, order, count, weight, bias, mean, invstd, m, c, h * w, w, *y.stride(), *out.stride(),
    )
    return out, mean, invstd


def batch_norm_gate_backward(
    grad_out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
    invstd: torch.Tensor, kept: tuple[torch.Tensor, torch.Tensor], utility_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_y, grad_weight, grad_bias, v)`` of :func:`batch_norm_gate`, where ``v`` (float32) is each
    kept channel's DCP utility of the BN output: in ``order``'s slots (0 past the count), or, written
    into ``utility_out`` when given (a float32 vector of ``C``), at the channels (0 outside the
    selection). Two launches; every element of every result written."""
    n, c, h, w = y.shape
    order, count = kept
    grad_w = torch.empty_like(weight)
    grad_b = torch.empty_like(bias)
    v = torch.empty(c, dtype=torch.float32, device=y.device) if utility_out is None else utility_out
    m = n * h * w
    wrap_triton(_bn_backward_reduce_kernel)[lambda meta: (triton.cdiv(c, meta["BLOCK_C"]),)](
        grad_out, y, order, count, weight, bias, mean, invstd, grad_w, grad_b, v, n, c, h * w, w,
        *grad_out.stride(), *y.stride(), 1.0 / m, V_BY_CHANNEL=utility_out is not None,
    )
    grad_y = torch.empty_like(y)
    wrap_triton(_bn_backward_apply_kernel)[
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))](
        grad_out, y, grad_y, order, count, weight, mean, invstd, grad_w, grad_b, m, c, bucket(c), h * w, w,
        *grad_out.stride(), *y.stride(), *grad_y.stride(), 1.0 / m, INDEXED=True,
    )
    return grad_y, grad_w, grad_b, v
