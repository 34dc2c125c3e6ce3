"""Training-mode BatchNorm backward of a compact conv output with the DCP utility riding along.

The ``torch`` backend's GPU step (``ops/layer.py``, :func:`~dcp_kernels.ops.layer.fused_bn_backward_applies`)
uses these instead of ``native_batch_norm_backward`` plus a separate utility reduction: BN's backward
reads ``g`` and ``y`` for its per-channel sums anyway, and the utility needs the same sums per sample.
Two kernels, every channel of the (compact) tensors live, any memory format through strides:

* ``_partials_kernel``, one program per (sample, block of channels): ``S2 = sum_hw g * xhat``
  (``xhat = (y - mean) * invstd``), ``S1 = sum_hw g`` and ``|weight * S2 + bias * S1|`` (``sum_hw g * a``
  for the BN output ``a = weight * xhat + bias``: the sample's utility term), written as a
  ``(3, N, C)`` float32 tensor. Summed over the batch by the caller (one ``sum``, fixed order:
  deterministic) they are BN's weight and bias gradients and the channel's utility. A grid over
  samples and channels keeps a GPU busy where one program per channel block (``batch_norm.py``'s
  reduction) would run a handful of programs;
* then the input gradient ``grad_y = weight * invstd * (g - sum S1 / M - xhat * sum S2 / M)`` with
  ``M = N*H*W``, one read of ``g`` and ``y`` and one write, as cuDNN's second BN backward kernel: the
  static step's kernel (``batch_norm.py``) with every channel of the compact tensors kept.

Accumulation in float32 whatever the activation dtype (bf16/fp16 are read as they are: no float32
copy of an activation).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import _single_config, bucket
from .batch_norm import _bn_backward_apply_kernel, _sample_tile

if _single_config():
    _PARTIAL_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_C": 16}, num_warps=4)]
else:
    _PARTIAL_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_C": c}, num_warps=w)
                        for m, c, w in ((64, 32, 4), (128, 32, 4), (32, 64, 4), (256, 16, 8))]


# C is the kept width, which moves from step to step under exact widths: the autotuning key holds its
# power-of-two bucket, and no compiled variant is specialised on it.
@triton.autotune(configs=_PARTIAL_CONFIGS, key=["C_BUCKET", "HW"])
@triton.jit(do_not_specialize=["C", "C_BUCKET"])
def _partials_kernel(
    g_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, p_ptr, B, C, C_BUCKET, HW, W,
    sgn, sgc, sgh, sgw, syn, syc, syh, syw,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # 64-bit offsets: no int32 overflow on large activations
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = chan < C
    mean = tl.load(mean_ptr + chan, mask=c_ok, other=0.0).to(tl.float32)
    g_sample = g_ptr + n * sgn
    y_sample = y_ptr + n * syn
    acc_g = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc_gx = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_M):
        gv, yv = _sample_tile(g_sample, y_sample, p0, HW, W, c_ok, chan, sgc, sgh, sgw, syc, syh, syw, BLOCK_M)
        acc_g += gv
        acc_gx += gv * (yv.to(tl.float32) - mean[None, :])  # masked lanes: gv = 0
    invstd = tl.load(invstd_ptr + chan, mask=c_ok, other=0.0).to(tl.float32)
    s1 = tl.sum(acc_g, axis=0)
    s2 = tl.sum(acc_gx, axis=0) * invstd
    weight = tl.load(w_ptr + chan, mask=c_ok, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + chan, mask=c_ok, other=0.0).to(tl.float32)
    row = n * C + chan
    tl.store(p_ptr + row, s2, mask=c_ok)
    tl.store(p_ptr + B * C + row, s1, mask=c_ok)
    tl.store(p_ptr + 2 * B * C + row, tl.abs(weight * s2 + bias * s1), mask=c_ok)


def batch_norm_backward_partials(grad_out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """``(3, N, C)`` float32: per sample and channel ``S2 = sum_hw g * (y - mean) * invstd``,
    ``S1 = sum_hw g`` and ``|weight * S2 + bias * S1|``. One launch."""
    n, c, h, w = y.shape
    # The kernels read the per-channel vectors with unit stride (no copy when they have it).
    weight, bias, mean, invstd = (t.contiguous() for t in (weight, bias, mean, invstd))
    partials = torch.empty(3, n, c, dtype=torch.float32, device=y.device)
    if partials.numel():
        wrap_triton(_partials_kernel)[lambda meta: (n, triton.cdiv(c, meta["BLOCK_C"]))](
            grad_out, y, weight, bias, mean, invstd, partials, n, c, bucket(c), h * w, w, *grad_out.stride(),
            *y.stride(),
        )
    return partials


def batch_norm_backward_apply(grad_out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                              invstd: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """BN's input gradient from ``sums`` (contiguous ``(2+, C)`` float32: the batch sums of
    :func:`batch_norm_backward_partials`' first two rows), in ``y``'s dtype and memory format. One
    launch."""
    n, c, h, w = y.shape
    weight, mean, invstd, sums = (t.contiguous() for t in (weight, mean, invstd, sums))
    grad_y = torch.empty_like(y)
    m = n * h * w
    if grad_y.numel():  # sums[0], sums[1]: the weight and bias gradients' sums the kernel reads
        wrap_triton(_bn_backward_apply_kernel)[
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))](
            grad_out, y, grad_y, sums, sums, weight, mean, invstd, sums[0], sums[1], m, c, bucket(c), h * w, w,
            *grad_out.stride(), *y.stride(), *grad_y.stride(), 1.0 / m, INDEXED=False,
        )
    return grad_y
