"""Depthwise convolution (groups == C_in == C_out) over the selected channels: forward, grad-input,
grad-weight.

Output channel ``c`` reads only input channel ``c``, so only the channels ``out_idx`` are computed;
an input channel outside ``in_idx`` counts as zero (``in_keep[c]`` is 0.0 then), exactly as in the
reference. Each kernel is a direct loop over the kernel taps on a (pixels x channels) tile: there is
no channel reduction to hand to a matrix unit. The grad-weight kernel reduces all pixels of a
channel block in one program, in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import (
    DEPTHWISE_TUNE_KEY,
    DEPTHWISE_UNSPECIALIZED,
    accumulator,
    bucket,
    elementwise_configs,
    kept_count,
    reading_output_pixel,
    split_pixels,
    store_output,
)


@triton.autotune(configs=elementwise_configs(), key=DEPTHWISE_TUNE_KEY)
@triton.jit(do_not_specialize=DEPTHWISE_UNSPECIALIZED)
def _depthwise_forward_kernel(
    x_ptr, w_ptr, b_ptr, in_keep_ptr, y_ptr, out_idx_ptr, out_count_ptr,
    M, H, W, OH, OW, K_OUT, C, M_BUCKET,
    sxn, sxc, sxh, sxw, swo, swh, sww, syn, syc, syh, syw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr,
    Y_COMPACT: tl.constexpr, HAS_BIAS: tl.constexpr, COUNTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n_img, oh, ow = split_pixels(offs_m, OH, OW)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < K_OUT
    c = tl.load(out_idx_ptr + offs_c, mask=c_ok, other=0)
    c_live = offs_c < kept_count(out_count_ptr, K_OUT, COUNTED)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih = oh * STRIDE_H - PAD_H + kh * DIL_H
            iw = ow * STRIDE_W - PAD_W + kw * DIL_W
            pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_ptr + (n_img * sxn + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc,
                         mask=pix_ok[:, None] & c_live[None, :], other=0.0)
            wv = tl.load(w_ptr + c * swo + kh * swh + kw * sww, mask=c_live, other=0.0)
            acc += xv.to(ACC) * wv.to(ACC)[None, :]
    acc *= tl.load(in_keep_ptr + c, mask=c_live, other=0.0)[None, :]
    store_output(acc, y_ptr, n_img, oh, ow, m_ok, offs_c, c, c_ok, c_live, b_ptr,
                 syn, syc, syh, syw, ACC, Y_COMPACT, HAS_BIAS)


@triton.autotune(configs=elementwise_configs(), key=DEPTHWISE_TUNE_KEY)
@triton.jit(do_not_specialize=DEPTHWISE_UNSPECIALIZED)
def _depthwise_grad_input_kernel(
    gy_ptr, w_ptr, in_keep_ptr, gx_ptr, out_idx_ptr, out_count_ptr,
    M, H, W, OH, OW, K_OUT, C, M_BUCKET,
    sgn, sgc, sgh, sgw, swo, swh, sww, sxn, sxc, sxh, sxw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, GY_COMPACT: tl.constexpr,
    COUNTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n_img, ih, iw = split_pixels(offs_m, H, W)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < K_OUT
    c = tl.load(out_idx_ptr + offs_c, mask=c_ok, other=0)
    c_live = offs_c < kept_count(out_count_ptr, K_OUT, COUNTED)
    c_gy = offs_c if GY_COMPACT else c
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            oh, ow, tap_ok = reading_output_pixel(ih, iw, kh, kw, OH, OW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            pix_ok = m_ok & tap_ok
            gv = tl.load(gy_ptr + (n_img * sgn + oh * sgh + ow * sgw)[:, None] + c_gy[None, :] * sgc,
                         mask=pix_ok[:, None] & c_live[None, :], other=0.0)
            wv = tl.load(w_ptr + c * swo + kh * swh + kw * sww, mask=c_live, other=0.0)
            acc += gv.to(ACC) * wv.to(ACC)[None, :]
    acc *= tl.load(in_keep_ptr + c, mask=c_live, other=0.0)[None, :]
    gx_off = (n_img * sxn + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc
    tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.autotune(configs=elementwise_configs(), key=DEPTHWISE_TUNE_KEY)
@triton.jit(do_not_specialize=DEPTHWISE_UNSPECIALIZED)
def _depthwise_grad_weight_kernel(
    gy_ptr, x_ptr, in_keep_ptr, gw_ptr, out_idx_ptr, out_count_ptr,
    P, H, W, OH, OW, K_OUT, C, M_BUCKET,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, swo, swh, sww,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, GY_COMPACT: tl.constexpr,
    COUNTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    tap = tl.program_id(1)
    kh = tap // KW
    kw = tap % KW
    c_ok = offs_c < K_OUT
    c = tl.load(out_idx_ptr + offs_c, mask=c_ok, other=0)
    k_out = kept_count(out_count_ptr, K_OUT, COUNTED)
    c_live = offs_c < k_out
    p_stop = tl.where(tl.program_id(0) * BLOCK_C < k_out, P, 0)  # unselected channels store zeros
    c_gy = offs_c if GY_COMPACT else c
    total = tl.zeros((BLOCK_C,), dtype=ACC)
    for p0 in range(0, p_stop, BLOCK_M):
        offs_p = p0 + tl.arange(0, BLOCK_M)
        p_ok = offs_p < P
        n_img, oh, ow = split_pixels(offs_p, OH, OW)
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        iw = ow * STRIDE_W - PAD_W + kw * DIL_W
        x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        gv = tl.load(gy_ptr + (n_img * sgn + oh * sgh + ow * sgw)[:, None] + c_gy[None, :] * sgc,
                     mask=p_ok[:, None] & c_live[None, :], other=0.0)
        xv = tl.load(x_ptr + (n_img * sxn + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc,
                     mask=x_ok[:, None] & c_live[None, :], other=0.0)
        total += tl.sum(gv.to(ACC) * xv.to(ACC), axis=0)
    total *= tl.load(in_keep_ptr + c, mask=c_live, other=0.0)
    tl.store(gw_ptr + c * swo + kh * swh + kw * sww, total.to(gw_ptr.dtype.element_ty), mask=c_ok)


def _taps(weight: torch.Tensor) -> tuple[int, int]:
    return weight.shape[2], weight.shape[3]


def depthwise_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_keep: torch.Tensor,
    out_idx: torch.Tensor, y: torch.Tensor, stride, padding, dilation, *, y_compact: bool,
    out_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Channels ``out_idx`` of the depthwise conv into ``y`` (full width or compact). ``out_count``:
    ``out_idx`` is a permutation of all channels, the first ``out_count`` (an int32 device scalar)
    kept; every channel of the full-width ``y`` is written, zeros outside those."""
    n, _, h, w = x.shape
    oh, ow = y.shape[2:]
    kh, kw = _taps(weight)
    m, k_out = n * oh * ow, out_idx.numel()
    dummy = weight

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k_out, meta["BLOCK_C"]))

    wrap_triton(_depthwise_forward_kernel)[grid](
        x, weight, bias if bias is not None else dummy, in_keep, y, out_idx,
        out_idx if out_count is None else out_count, m, h, w, oh, ow, k_out, weight.shape[0], bucket(m),
        *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *y.stride(),
        *stride, *padding, *dilation, KH=kh, KW=kw, ACC=accumulator(x.dtype),
        Y_COMPACT=y_compact, HAS_BIAS=bias is not None, COUNTED=out_count is not None,
    )
    return y


def depthwise_grad_input(
    grad_y: torch.Tensor, weight: torch.Tensor, in_keep: torch.Tensor, out_idx: torch.Tensor,
    grad_x: torch.Tensor, stride, padding, dilation, *, gy_compact: bool, out_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grad-input of channels ``out_idx`` (times ``in_keep``) into the zeroed full-width ``grad_x``
    (``out_count``: as in :func:`depthwise_forward`; ``grad_x`` need not be zeroed then)."""
    n, _, h, w = grad_x.shape
    oh, ow = grad_y.shape[2:]
    kh, kw = _taps(weight)
    m, k_out = n * h * w, out_idx.numel()

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k_out, meta["BLOCK_C"]))

    wrap_triton(_depthwise_grad_input_kernel)[grid](
        grad_y, weight, in_keep, grad_x, out_idx, out_idx if out_count is None else out_count,
        m, h, w, oh, ow, k_out, weight.shape[0], bucket(m),
        *grad_y.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *grad_x.stride(),
        *stride, *padding, *dilation, KH=kh, KW=kw, ACC=accumulator(grad_y.dtype), GY_COMPACT=gy_compact,
        COUNTED=out_count is not None,
    )
    return grad_x


def depthwise_grad_weight(
    grad_y: torch.Tensor, x: torch.Tensor, in_keep: torch.Tensor, out_idx: torch.Tensor,
    grad_w: torch.Tensor, stride, padding, dilation, *, gy_compact: bool, out_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grad of the selected channels' filters into the zeroed full-size ``grad_w`` (``out_count``: as
    in :func:`depthwise_forward`; ``grad_w`` need not be zeroed then)."""
    n, _, h, w = x.shape
    oh, ow = grad_y.shape[2:]
    kh, kw = _taps(grad_w)
    p, k_out = n * oh * ow, out_idx.numel()

    def grid(meta):
        return (triton.cdiv(k_out, meta["BLOCK_C"]), kh * kw)

    wrap_triton(_depthwise_grad_weight_kernel)[grid](
        grad_y, x, in_keep, grad_w, out_idx, out_idx if out_count is None else out_count,
        p, h, w, oh, ow, k_out, grad_w.shape[0], bucket(p),
        *grad_y.stride(), *x.stride(), grad_w.stride(0), grad_w.stride(2), grad_w.stride(3),
        *stride, *padding, *dilation, KH=kh, KW=kw, ACC=accumulator(x.dtype), GY_COMPACT=gy_compact,
        COUNTED=out_count is not None,
    )
    return grad_w
