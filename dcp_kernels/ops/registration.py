"""What every compiled backend registers with PyTorch: fake (meta) kernels and the autograd formula.

The Triton ops (``dcp_triton::*``) and the C++/CUDA extension's ops (``dcp::*``) share one schema:

* ``conv2d(x, weight, bias, in_idx, out_idx, stride, padding, dilation, depthwise, x_compact, y_compact) -> y``
* ``conv2d_backward(grad_y, x, weight, in_idx, out_idx, stride, padding, dilation, depthwise, x_compact,
  y_compact, output_mask) -> (grad_x, grad_w, grad_b)`` (a gradient not asked for comes back empty)
* ``channel_utility(a, g) -> v`` (float32)

so they share these fake kernels (used by ``torch.compile``, ``torch.export`` and the meta device)
and one autograd registration.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out that way (and not also plain contiguous), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_conv_output(x: Tensor, weight: Tensor, out_idx: Tensor, stride, padding, dilation, y_compact: bool,
                      memory_format: torch.memory_format | None = None) -> Tensor:
    """An uninitialised output of the op: (N, len(out_idx) or C_out, H', W')."""
    n, _, h, w = x.shape
    oh = conv_output_size(h, weight.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_output_size(w, weight.shape[3], stride[1], padding[1], dilation[1])
    channels = out_idx.shape[0] if y_compact else weight.shape[0]
    fmt = memory_format_of(x) if memory_format is None else memory_format
    return torch.empty((n, channels, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)


def check_same_device(**tensors: Tensor | None) -> None:
    """Fake kernels run where real ones would refuse mixed devices; refuse them the same way."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise RuntimeError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def fake_conv2d(x, weight, bias, in_idx, out_idx, stride, padding, dilation, depthwise, x_compact, y_compact,
                memory_format=None):
    check_same_device(x=x, weight=weight, bias=bias, in_idx=in_idx, out_idx=out_idx)
    return empty_conv_output(x, weight, out_idx, stride, padding, dilation, y_compact, memory_format)


def fake_channel_utility(a: Tensor, g: Tensor) -> Tensor:
    return a.new_empty(a.shape[1], dtype=torch.float32)


def fake_conv2d_backward(grad_y, x, weight, in_idx, out_idx, stride, padding, dilation, depthwise,
                         x_compact, y_compact, output_mask, x_memory_format=None):
    check_same_device(grad_y=grad_y, x=x, weight=weight, in_idx=in_idx, out_idx=out_idx)
    need_x, need_w, need_b = output_mask
    fmt = memory_format_of(x) if x_memory_format is None else x_memory_format
    return (
        torch.empty_like(x, memory_format=fmt) if need_x else x.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else x.new_empty(0),
        weight.new_empty(weight.shape[0]) if need_b else x.new_empty(0),
    )


def register_conv_autograd(forward_op: Any, backward_op: Callable[..., tuple[Tensor, Tensor, Tensor]]) -> None:
    """Attach the op's backward (``backward_op`` computes all three gradients in one call)."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, in_idx, out_idx, stride, padding, dilation, depthwise, x_compact, y_compact = inputs
        ctx.save_for_backward(x, weight, in_idx, out_idx)
        ctx.conf = (stride, padding, dilation, depthwise, x_compact, y_compact)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_y):
        x, weight, in_idx, out_idx = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        grad_x, grad_w, grad_b = backward_op(grad_y, x, weight, in_idx, out_idx, *ctx.conf, [need_x, need_w, need_b])
        return (grad_x if need_x else None, grad_w if need_w else None, grad_b if need_b else None,
                None, None, None, None, None, None, None, None)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
