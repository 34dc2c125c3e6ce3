"""Backward data: grad-input of the selected input channels only (groups=1), as an implicit GEMM.

GEMM view: M = N*H*W input pixels, N = the k_in selected input channels, K = k_out selected output
channels x kh x kw. For each kernel tap the output pixel that read this input pixel is found by
inverting the convolution's index map; taps that no output pixel used (stride > 1) are masked.
The gradient of the output is read through ``out_idx`` (or compact), the weight through the
``out_idx x in_idx`` block, and the result is written into the selected input channels only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import (
    CONV_TUNE_KEY,
    CONV_UNSPECIALIZED,
    accumulator,
    bucket,
    dot_acc,
    dot_mode,
    gemm_configs,
    kept_count,
    reading_output_pixel,
    split_pixels,
)


@triton.autotune(configs=gemm_configs(), key=CONV_TUNE_KEY)
@triton.jit(do_not_specialize=CONV_UNSPECIALIZED)
def _conv_grad_input_kernel(
    gy_ptr, w_ptr, gx_ptr, in_idx_ptr, out_idx_ptr, in_count_ptr, out_count_ptr,
    M, H, W, OH, OW, K_IN, K_OUT, C_IN, C_OUT, M_BUCKET,
    sgn, sgc, sgh, sgw, swo, swi, swh, sww, sxn, sxc, sxh, sxw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr,
    GY_COMPACT: tl.constexpr, GX_COMPACT: tl.constexpr, DOT: tl.constexpr, COUNTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n_img, ih, iw = split_pixels(offs_m, H, W)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < K_IN
    ci = tl.load(in_idx_ptr + offs_n, mask=n_ok, other=0)
    k_out = kept_count(out_count_ptr, K_OUT, COUNTED)
    k_in = kept_count(in_count_ptr, K_IN, COUNTED)
    n_live = offs_n < k_in
    k_end = tl.where(pid_n * BLOCK_N < k_in, k_out, 0)  # a tile of unselected channels stores zeros
    w_in = ci * swi
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            oh, ow, tap_ok = reading_output_pixel(ih, iw, kh, kw, OH, OW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            pix_ok = m_ok & tap_ok
            gy_pix = n_img * sgn + oh * sgh + ow * sgw
            for k0 in range(0, k_end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < k_out
                co = tl.load(out_idx_ptr + offs_k, mask=k_ok, other=0)
                co_gy = offs_k if GY_COMPACT else co
                a = tl.load(gy_ptr + gy_pix[:, None] + co_gy[None, :] * sgc,
                            mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptr + co[:, None] * swo + w_in[None, :] + kh * swh + kw * sww,
                            mask=k_ok[:, None] & n_live[None, :], other=0.0)
                acc = dot_acc(a, b, acc, DOT)
    x_chan = offs_n if GX_COMPACT else ci
    gx_off = (n_img * sxn + ih * sxh + iw * sxw)[:, None] + x_chan[None, :] * sxc
    tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def conv_grad_input(
    grad_y: torch.Tensor, weight: torch.Tensor, in_idx: torch.Tensor, out_idx: torch.Tensor,
    grad_x: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
    *, gy_compact: bool, gx_compact: bool, counts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Write the grad-input of channels ``in_idx`` into ``grad_x`` (preallocated, zeroed by the caller
    when full width; compact when ``gx_compact``). ``counts``: as in :func:`conv_forward` (every
    channel of the full-width ``grad_x`` is then written, so it need not be zeroed)."""
    n, _, h, w = grad_x.shape
    _, _, oh, ow = grad_y.shape
    kh, kw = weight.shape[2:]
    m, k_in, k_out = n * h * w, in_idx.numel(), out_idx.numel()

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k_in, meta["BLOCK_N"]))

    wrap_triton(_conv_grad_input_kernel)[grid](
        grad_y, weight, grad_x, in_idx, out_idx, *(counts if counts is not None else (in_idx, out_idx)),
        m, h, w, oh, ow, k_in, k_out, weight.shape[1], weight.shape[0], bucket(m),
        *grad_y.stride(), *weight.stride(), *grad_x.stride(),
        *stride, *padding, *dilation, KH=kh, KW=kw, ACC=accumulator(grad_y.dtype),
        GY_COMPACT=gy_compact, GX_COMPACT=gx_compact, DOT=dot_mode(grad_y.dtype),
        COUNTED=counts is not None,
    )
    return grad_x
