"""Forward: implicit-GEMM convolution over the selected channels only (groups=1).

GEMM view: M = N*OH*OW output pixels, N = the k_out selected output channels, K = k_in selected
input channels x kh x kw. Input channels are read through ``in_idx`` straight from the full-width
(or already compact) input, weights through ``out_idx x in_idx`` from the full-size weight, and the
epilogue writes straight into the selected channels of the output (full width, or compact). No
im2col buffer, no gathered copy of the input or the weight.
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
    split_pixels,
    store_output,
)


@triton.autotune(configs=gemm_configs(), key=CONV_TUNE_KEY)
@triton.jit(do_not_specialize=CONV_UNSPECIALIZED)
def _conv_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, in_idx_ptr, out_idx_ptr, in_count_ptr, out_count_ptr,
    M, H, W, OH, OW, K_IN, K_OUT, C_IN, C_OUT, M_BUCKET,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr,
    X_COMPACT: tl.constexpr, Y_COMPACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT: tl.constexpr, COUNTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n_img, oh, ow = split_pixels(offs_m, OH, OW)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < K_OUT
    co = tl.load(out_idx_ptr + offs_n, mask=n_ok, other=0)
    k_in = kept_count(in_count_ptr, K_IN, COUNTED)
    k_out = kept_count(out_count_ptr, K_OUT, COUNTED)
    n_live = offs_n < k_out
    k_end = tl.where(pid_n * BLOCK_N < k_out, k_in, 0)  # a tile of unselected channels stores zeros
    w_out = co * swo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih = oh * STRIDE_H - PAD_H + kh * DIL_H
            iw = ow * STRIDE_W - PAD_W + kw * DIL_W
            pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_pix = n_img * sxn + ih * sxh + iw * sxw
            for k0 in range(0, k_end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < k_in
                ci = tl.load(in_idx_ptr + offs_k, mask=k_ok, other=0)
                ci_x = offs_k if X_COMPACT else ci
                a = tl.load(x_ptr + x_pix[:, None] + ci_x[None, :] * sxc,
                            mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptr + ci[:, None] * swi + w_out[None, :] + kh * swh + kw * sww,
                            mask=k_ok[:, None] & n_live[None, :], other=0.0)
                acc = dot_acc(a, b, acc, DOT)
    store_output(acc, y_ptr, n_img, oh, ow, m_ok, offs_n, co, n_ok, n_live, b_ptr,
                 syn, syc, syh, syw, ACC, Y_COMPACT, HAS_BIAS)


def conv_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    in_idx: torch.Tensor, out_idx: torch.Tensor, y: torch.Tensor,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
    *, x_compact: bool, y_compact: bool, counts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Write the selected output channels of the convolution into ``y`` (preallocated).

    ``y`` is either full width (only channels ``out_idx`` are written; the caller zeroes the rest)
    or compact (``y_compact``: channel j holds output channel ``out_idx[j]``).

    ``counts``: ``(in_count, out_count)`` int32 device scalars; the index vectors are then
    permutations of all channels, the kept ones first (:func:`dcp_kernels.rule.kept_first`), and
    every channel of the full-width ``y`` is written (zeros outside the kept ones): nothing about
    the selection is known on the host.
    """
    n, _, h, w = x.shape
    _, _, oh, ow = y.shape
    kh, kw = weight.shape[2:]
    m, k_in, k_out = n * oh * ow, in_idx.numel(), out_idx.numel()
    dummy = weight  # never read when HAS_BIAS is off

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k_out, meta["BLOCK_N"]))

    wrap_triton(_conv_forward_kernel)[grid](
        x, weight, bias if bias is not None else dummy, y, in_idx, out_idx,
        *(counts if counts is not None else (in_idx, out_idx)),
        m, h, w, oh, ow, k_in, k_out, weight.shape[1], weight.shape[0], bucket(m),
        *x.stride(), *weight.stride(), *y.stride(),
        *stride, *padding, *dilation, KH=kh, KW=kw, ACC=accumulator(x.dtype),
        X_COMPACT=x_compact, Y_COMPACT=y_compact, HAS_BIAS=bias is not None,
        DOT=dot_mode(x.dtype), COUNTED=counts is not None,
    )
    return y
