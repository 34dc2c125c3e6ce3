"""Shared pieces of the Triton kernels: launch configurations and small index helpers.

Autotuning: on a GPU each kernel is tuned over a handful of tile shapes, keyed on the problem
sizes. The configurations follow what works for implicit-GEMM convolutions on Ampere (A100) and
Hopper (H100): 64-128 wide tiles in M and N, K steps of 32 (fp32/TF32) or 64 (16-bit inputs),
4-8 warps and 3-4 pipeline stages. They have not been tuned on real hardware by this project yet
(see docs/benchmarks.md). Under ``TRITON_INTERPRET=1`` (CPU testing) autotuning would only repeat
the same exact computation, so a single configuration is used; ``DCP_TRITON_AUTOTUNE=0`` does the
same on a GPU (correctness runs: one compile per kernel instead of one per configuration, and tiles
small enough that the test shapes span several of them).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import triton_interpreting as interpreting


def _single_config() -> bool:
    return interpreting() or os.environ.get("DCP_TRITON_AUTOTUNE", "1") == "0"


# Autotune keys name the layer's full shape, never the kept widths: those change on nearly every
# training step (9-10 of 13 VGG layers, measured), and a key holding them re-benchmarks every
# configuration for every new width. One tuning per layer serves every step. The kept widths and
# the key-only arguments are not specialized on either (``do_not_specialize``; Triton otherwise
# compiles a variant per divisibility-by-16 class of an int argument): one binary per layer.
CONV_TUNE_KEY = ["C_IN", "C_OUT", "H", "W", "KH", "KW", "STRIDE_H", "STRIDE_W", "M_BUCKET"]
DEPTHWISE_TUNE_KEY = ["C", "H", "W", "KH", "KW", "STRIDE_H", "STRIDE_W", "M_BUCKET"]
CONV_UNSPECIALIZED = ["K_IN", "K_OUT", "C_IN", "C_OUT", "M_BUCKET"]
DEPTHWISE_UNSPECIALIZED = ["K_OUT", "C", "M_BUCKET"]


def bucket(n: int) -> int:
    """The power of two at or above ``n``: batch sizes (the last, short batch of an epoch) share a
    tuning within a factor of two."""
    return 1 << max(int(n) - 1, 0).bit_length()


def gemm_configs(single_blocks: tuple[int, int, int] = (32, 32, 32)) -> list[triton.Config]:
    """Tile shapes (BLOCK_M, BLOCK_N, BLOCK_K) for the implicit-GEMM kernels."""
    if _single_config():
        bm, bn, bk = single_blocks
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4)]
    shapes = [
        (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3), (32, 64, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def elementwise_configs(single_blocks: tuple[int, int] = (32, 16)) -> list[triton.Config]:
    """Tile shapes (BLOCK_M, BLOCK_C) for the depthwise and reduction kernels."""
    if _single_config():
        bm, bc = single_blocks
        return [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=4)]
    shapes = [(64, 32, 4), (128, 32, 4), (64, 64, 4), (256, 16, 8), (32, 128, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_C": c}, num_warps=w) for m, c, w in shapes]


def accumulator(dtype: torch.dtype):
    """Accumulation type: float64 for float64 inputs (gradcheck), float32 for every other dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_mode(dtype: torch.dtype) -> str:
    """How :func:`dot_acc` multiplies tiles of ``dtype``: ``tf32``, ``ieee`` or ``upcast``.

    fp32 uses TF32 exactly when PyTorch lets cuDNN use it (dense ``nn.Conv2d`` on CUDA runs fp32
    convolutions in TF32 unless ``torch.backends.cudnn.allow_tf32`` is False), so the Triton
    backend's numerics match the dense model it replaces; fp64 is always exact (``ieee``).
    ``upcast``: Triton 3.8's CPU interpreter returns garbage for ``tl.dot`` on bf16 operands, so
    there bf16 tiles are widened to fp32 first (exact: a bf16 product fits in fp32), which is the
    arithmetic a GPU's bf16 MMA with fp32 accumulation does.
    """
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    if dtype == torch.float64 or (dtype == torch.float32 and not torch.backends.cudnn.allow_tf32):
        return "ieee"
    return "tf32"


@triton.jit
def dot_acc(a, b, acc, MODE: tl.constexpr):
    """``acc + a @ b`` on a tile pair (see :func:`dot_mode`)."""
    if MODE == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=MODE)


@triton.jit
def split_pixels(offs, OH, OW):
    """Flat pixel index over (N, OH, OW) -> (n, oh, ow); ``n`` widened to int64 for addressing."""
    n = offs // (OH * OW)
    rem = offs % (OH * OW)
    return n.to(tl.int64), rem // OW, rem % OW


@triton.jit
def reading_output_pixel(ih, iw, kh, kw, OH, OW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W):
    """The output pixel (oh, ow) whose kernel tap (kh, kw) read input pixel (ih, iw), and whether
    one exists (the backward-data index map: taps that fall between strides or outside the output
    are masked)."""
    th = ih + PAD_H - kh * DIL_H
    tw = iw + PAD_W - kw * DIL_W
    # Clamp before dividing so negative offsets never reach integer division.
    th_c = tl.where(th >= 0, th, 0)
    tw_c = tl.where(tw >= 0, tw, 0)
    oh = th_c // STRIDE_H
    ow = tw_c // STRIDE_W
    ok = (th >= 0) & (tw >= 0) & (th_c % STRIDE_H == 0) & (tw_c % STRIDE_W == 0) & (oh < OH) & (ow < OW)
    return oh, ow, ok


@triton.jit
def kept_count(count_ptr, K, COUNTED: tl.constexpr):
    """How many channels of an index vector are kept: the host's ``K``, or (``COUNTED``) the int32
    read from ``count_ptr``. Counted index vectors are permutations of all channels, the kept ones
    first (rule.kept_first): the grid then spans every channel, lanes past the count are not read,
    and a tile with no kept lane skips its reduction, so it stores exact zeros (the unselected
    channels of a full-width output)."""
    if COUNTED:
        return tl.load(count_ptr)
    else:
        return K


@triton.jit
def store_output(acc, y_ptr, n_img, oh, ow, m_ok, offs, chan, chan_ok, chan_live, b_ptr,
                 syn, syc, syh, syw, ACC: tl.constexpr, Y_COMPACT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Forward epilogue: bias (of the live channels), then the store into output channel ``chan`` (full
    width) or ``offs`` (compact) of the (pixels x channels) tile."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + chan, mask=chan_live, other=0.0).to(ACC)[None, :]
    y_chan = offs if Y_COMPACT else chan
    y_off = (n_img * syn + oh * syh + ow * syw)[:, None] + y_chan[None, :] * syc
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & chan_ok[None, :])
