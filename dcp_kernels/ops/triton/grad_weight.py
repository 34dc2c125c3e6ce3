"""Backward weight: grad of the ``out_idx x in_idx`` weight block only (groups=1), implicit GEMM.

GEMM view: M = the k_out selected output channels, N = k_in selected input channels x kh x kw,
K = N*OH*OW output pixels (the reduction). Deterministic: each program reduces its own pixel range
in a fixed order; when the tile grid is too small to fill the GPU the pixel range is split
(split-K) into fp32 partial sums in a scratch buffer that are added in a fixed order afterwards,
never with atomics. With one split the kernel writes straight into the full-size grad-weight.
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
    interpreting,
    kept_count,
    split_pixels,
)


@triton.autotune(configs=gemm_configs(), key=CONV_TUNE_KEY + ["SPLIT"])
@triton.jit(do_not_specialize=CONV_UNSPECIALIZED)
def _conv_grad_weight_kernel(
    gy_ptr, x_ptr, dst_ptr, in_idx_ptr, out_idx_ptr, in_count_ptr, out_count_ptr,
    P, H, W, OH, OW, K_IN, K_OUT, C_IN, C_OUT, M_BUCKET, PIXELS_PER_SPLIT,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    sdo, sdi, sdh, sdw, sd_split,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, SPLIT: tl.constexpr,
    GY_COMPACT: tl.constexpr, X_COMPACT: tl.constexpr, DOT: tl.constexpr, COUNTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < K_OUT
    co = tl.load(out_idx_ptr + offs_m, mask=m_ok, other=0)
    co_gy = offs_m if GY_COMPACT else co
    # Columns: r = selected input channel * KH*KW + tap.
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < K_IN * KH * KW
    ci_sel = offs_n // (KH * KW)
    tap = offs_n % (KH * KW)
    kh = tap // KW
    kw = tap % KW
    ci = tl.load(in_idx_ptr + ci_sel, mask=n_ok, other=0)
    ci_x = ci_sel if X_COMPACT else ci
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    p_start = pid_k * PIXELS_PER_SPLIT
    p_end = tl.minimum(p_start + PIXELS_PER_SPLIT, P)
    # Counted (see kept_count): rows and columns span every channel; only the kept block is read,
    # and a tile outside it skips the reduction and stores zeros.
    k_out = kept_count(out_count_ptr, K_OUT, COUNTED)
    k_in = kept_count(in_count_ptr, K_IN, COUNTED)
    m_live = offs_m < k_out
    n_live = n_ok & (ci_sel < k_in)
    tile_live = (pid_m * BLOCK_M < k_out) & (pid_n * BLOCK_N < k_in * (KH * KW))
    p_stop = tl.where(tile_live, p_end, p_start)
    for p0 in range(p_start, p_stop, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        p_ok = offs_p < p_end
        n_img, oh, ow = split_pixels(offs_p, OH, OW)
        a = tl.load(gy_ptr + co_gy[:, None] * sgc + (n_img * sgn + oh * sgh + ow * sgw)[None, :],
                    mask=m_live[:, None] & p_ok[None, :], other=0.0)
        ih = oh[:, None] * STRIDE_H - PAD_H + kh[None, :] * DIL_H
        iw = ow[:, None] * STRIDE_W - PAD_W + kw[None, :] * DIL_W
        x_ok = p_ok[:, None] & n_live[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_ptr + (n_img * sxn)[:, None] + ci_x[None, :] * sxc + ih * sxh + iw * sxw,
                    mask=x_ok, other=0.0)
        acc = dot_acc(a, b, acc, DOT)
    if SPLIT == 1 or COUNTED:
        # Straight into the full-size grad-weight at (out_idx, in_idx, kh, kw); counted with splits,
        # into this split's full-size partial sums (every element written, zeros outside the block).
        d_off = pid_k * sd_split + co[:, None] * sdo + (ci * sdi + kh * sdh + kw * sdw)[None, :]
        tl.store(dst_ptr + d_off, acc.to(dst_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        # Partial sums of this split, in the accumulator type: (SPLIT, K_OUT, K_IN*KH*KW) scratch.
        d_off = pid_k * sd_split + offs_m[:, None] * sdo + offs_n[None, :] * sdi
        tl.store(dst_ptr + d_off, acc, mask=m_ok[:, None] & n_ok[None, :])


def choose_split(c_out: int, columns: int, pixels: int, device: torch.device) -> int:
    """How many pixel ranges to reduce separately so the grid fills the GPU (1 on CPU/interpreter).

    Sized from the layer's full width (``c_out`` filters, ``columns`` = C_in*kh*kw), not the kept
    one: the split is part of the autotune key, and kept widths change every step."""
    if interpreting() or device.type != "cuda":
        return 1
    tiles = triton.cdiv(c_out, 64) * triton.cdiv(columns, 64)
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    split = max(1, target // max(tiles, 1))
    # Keep at least 16 K-steps of 64 pixels per split so partial sums stay worth their traffic.
    return int(min(split, max(1, pixels // 1024), 64))


def conv_grad_weight(
    grad_y: torch.Tensor, x: torch.Tensor, in_idx: torch.Tensor, out_idx: torch.Tensor,
    grad_w: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
    *, gy_compact: bool, x_compact: bool, split: int | None = None,
    counts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Write the grad of the ``out_idx x in_idx`` block into the full-size ``grad_w`` (zeroed by
    the caller). ``split`` forces the number of pixel ranges (tests); default: :func:`choose_split`.
    ``counts``: as in :func:`conv_forward`; every element of ``grad_w`` is then written (zeros
    outside the block), so it need not be zeroed, and no shape depends on the kept widths."""
    n, _, h, w = x.shape
    _, _, oh, ow = grad_y.shape
    kh, kw = grad_w.shape[2:]
    p, k_in, k_out = n * oh * ow, in_idx.numel(), out_idx.numel()
    columns = k_in * kh * kw
    if split is None:
        split = choose_split(grad_w.shape[0], grad_w.shape[1] * kh * kw, p, x.device)
    pixels_per_split = triton.cdiv(p, split)
    if split == 1:
        dst, dst_strides = grad_w, (*grad_w.stride(), 0)
    elif counts is not None:
        # Full-size partial sums per split (static shape; the kernel writes every element).
        dst = torch.empty((split, *grad_w.shape), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        dst_strides = (*dst.stride()[1:], dst.stride(0))
    else:
        dst = torch.empty((split, k_out, columns), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        dst_strides = (dst.stride(1), dst.stride(2), 0, 0, dst.stride(0))

    def grid(meta):
        return (triton.cdiv(k_out, meta["BLOCK_M"]), triton.cdiv(columns, meta["BLOCK_N"]), split)

    wrap_triton(_conv_grad_weight_kernel)[grid](
        grad_y, x, dst, in_idx, out_idx, *(counts if counts is not None else (in_idx, out_idx)),
        p, h, w, oh, ow, k_in, k_out, grad_w.shape[1], grad_w.shape[0], bucket(p), pixels_per_split,
        *grad_y.stride(), *x.stride(), *dst_strides,
        *stride, *padding, *dilation, KH=kh, KW=kw, ACC=accumulator(x.dtype), SPLIT=split,
        GY_COMPACT=gy_compact, X_COMPACT=x_compact, DOT=dot_mode(x.dtype), COUNTED=counts is not None,
    )
    if split > 1 and counts is not None:
        grad_w.copy_(dst.sum(0))  # fixed-order reduction
    elif split > 1:
        block = dst.sum(0).view(k_out, k_in, kh, kw).to(grad_w.dtype)  # fixed-order reduction
        grad_w.index_put_((out_idx.unsqueeze(1), in_idx), block)
    return grad_w
