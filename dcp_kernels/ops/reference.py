"""Reference backend: dense convolution plus 0/1 channel masks.

This is the paper's semantics (the authors multiply channels by a mask) and the oracle every
fast path is tested against. It computes every channel, so it is never faster than dense.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_mask(idx: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """A (size,) tensor with 1 at ``idx`` and 0 elsewhere."""
    mask = torch.zeros(size, dtype=dtype, device=idx.device)
    mask[idx] = 1
    return mask


def gathered_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_idx: torch.Tensor,
    out_idx: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """Dense conv of the masked input, masked output: full width, zeros outside ``out_idx``."""
    in_mask = channel_mask(in_idx, x.shape[1], x.dtype).view(1, -1, 1, 1)
    out_mask = channel_mask(out_idx, weight.shape[0], x.dtype).view(1, -1, 1, 1)
    y = F.conv2d(x * in_mask, weight, bias, stride, padding, dilation, groups)
    return y * out_mask


def channel_utility(a: torch.Tensor, g: torch.Tensor, *, mean: bool = True) -> torch.Tensor:
    """``v_c = sum_b |sum_hw g*a| / (B*H*W)`` in float32, one value per channel of ``a``.

    ``mean=False`` leaves out the constant ``1 / (B*H*W)``: one kernel less where a max-normalisation
    follows (the utility update), which cancels it.
    """
    batch, _, height, width = a.shape
    per_sample = (g.float() * a.float()).sum(dim=(2, 3))
    # The 1-norm over the batch: |.| and the sum in one reduction kernel.
    v = torch.linalg.vector_norm(per_sample, ord=1, dim=0)
    return v / float(batch * height * width) if mean else v
