"""Triton backend: fused channel-gather convolution kernels, forward and backward.

Each kernel reads the selected channels through index vectors straight from the full-width (or
compact) tensors and writes only the selected channels: no gathered copies, no im2col buffer.

The kernels are exposed as three PyTorch custom ops (autograd on the first), so they compose with
``torch.compile``:

* ``dcp_triton::conv2d(x, weight, bias, in_idx, out_idx, ...) -> y``
* ``dcp_triton::conv2d_backward(grad_y, x, weight, in_idx, out_idx, ...) -> (grad_x, grad_w, grad_b)``
* ``dcp_triton::channel_utility(a, g) -> v``
* ``dcp_triton::update_utility(a, g, scale, shift, utility!, idx, decay)``: the layer's whole utility
  step in two launches (reduction, then normalise + decay + scatter), mutating ``utility``

On a GPU they are registered with ``torch.library.triton_op`` (Inductor sees the Triton kernels
themselves). Under ``TRITON_INTERPRET=1`` (how the test suite runs them on CPU) the interpreted
kernels cannot be traced, so the same functions are registered as opaque ``custom_op``s with an
explicit fake kernel instead.

This module imports Triton: import it only after deciding the backend is wanted (``TRITON_INTERPRET``
is read when the kernels are defined).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import channel_mask
from ..registration import (
    empty_conv_output,
    fake_channel_utility,
    fake_conv2d,
    fake_conv2d_backward,
    memory_format_of,
    register_conv_autograd,
)
from ._common import interpreting
from .depthwise import depthwise_forward, depthwise_grad_input, depthwise_grad_weight
from .forward import conv_forward
from .grad_input import conv_grad_input
from .grad_weight import conv_grad_weight
from .utility import channel_utility as _utility_kernel
from .utility import update_utility as _update_kernel


def _output(x: Tensor, weight: Tensor, out_idx: Tensor, stride, padding, dilation, y_compact: bool) -> Tensor:
    """The output tensor: compact (every element gets written) or full width, zeroed."""
    y = empty_conv_output(x, weight, out_idx, stride, padding, dilation, y_compact)
    return y if y_compact else y.zero_()


def _conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, in_idx: Tensor, out_idx: Tensor,
    stride: list[int], padding: list[int], dilation: list[int],
    depthwise: bool, x_compact: bool, y_compact: bool,
) -> Tensor:
    y = _output(x, weight, out_idx, stride, padding, dilation, y_compact)
    if y.numel() == 0:
        return y
    if depthwise:
        in_keep = channel_mask(in_idx, weight.shape[0], torch.float32)
        return depthwise_forward(x, weight, bias, in_keep, out_idx, y, stride, padding, dilation, y_compact=y_compact)
    return conv_forward(x, weight, bias, in_idx, out_idx, y, stride, padding, dilation,
                        x_compact=x_compact, y_compact=y_compact)


def _conv2d_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, in_idx: Tensor, out_idx: Tensor,
    stride: list[int], padding: list[int], dilation: list[int],
    depthwise: bool, x_compact: bool, y_compact: bool, output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_w, grad_b); a gradient not asked for in ``output_mask`` comes back empty (0,)."""
    need_x, need_w, need_b = output_mask
    # Custom-op outputs may not alias each other: one fresh empty tensor per gradient not asked for.
    grad_x, grad_w, grad_b = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    in_keep = channel_mask(in_idx, weight.shape[0], torch.float32) if depthwise else None
    work = grad_y.numel() > 0
    if need_x:
        grad_x = torch.zeros_like(x, memory_format=memory_format_of(x))
        if work and depthwise:
            depthwise_grad_input(grad_y, weight, in_keep, out_idx, grad_x, stride, padding, dilation,
                                 gy_compact=y_compact)
        elif work:
            conv_grad_input(grad_y, weight, in_idx, out_idx, grad_x, stride, padding, dilation,
                            gy_compact=y_compact, gx_compact=x_compact)
    if need_w:
        grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        if work and depthwise:
            depthwise_grad_weight(grad_y, x, in_keep, out_idx, grad_w, stride, padding, dilation,
                                  gy_compact=y_compact)
        elif work:
            conv_grad_weight(grad_y, x, in_idx, out_idx, grad_w, stride, padding, dilation,
                             gy_compact=y_compact, x_compact=x_compact)
    if need_b:
        selected = grad_y if y_compact else grad_y.index_select(1, out_idx)
        grad_b = weight.new_zeros(weight.shape[0])
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_b.index_copy_(0, out_idx, selected.sum(dim=(0, 2, 3), dtype=accumulate).to(weight.dtype))
    return grad_x, grad_w, grad_b


def _utility_vector(a: Tensor, g: Tensor, scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
    """The reduction kernel's result; zeros for an empty batch (no kernel launched)."""
    if a.numel() == 0:
        return torch.zeros(a.shape[1], dtype=torch.float32, device=a.device)
    return _utility_kernel(a, g, scale, shift)


def _channel_utility(a: Tensor, g: Tensor) -> Tensor:
    return _utility_vector(a, g)


def _update_utility(
    a: Tensor, g: Tensor, scale: Tensor | None, shift: Tensor | None, utility: Tensor, idx: Tensor | None,
    decay: float,
) -> None:
    _update_kernel(utility, _utility_vector(a, g, scale, shift), idx, decay)


def _register(name: str, fn, fake):
    if interpreting():
        op = torch.library.custom_op(f"dcp_triton::{name}", fn, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(f"dcp_triton::{name}", fn, mutates_args=())


def _register_utility_update():
    name = "dcp_triton::update_utility"
    if interpreting():
        op = torch.library.custom_op(name, _update_utility, mutates_args=("utility",))
        op.register_fake(lambda *args: None)
        return op
    return torch.library.triton_op(name, _update_utility, mutates_args={"utility"})


conv2d_op = _register("conv2d", _conv2d, fake_conv2d)
update_utility_op = _register_utility_update()
conv2d_backward_op = _register("conv2d_backward", _conv2d_backward, fake_conv2d_backward)
channel_utility_op = _register("channel_utility", _channel_utility, fake_channel_utility)


register_conv_autograd(conv2d_op, conv2d_backward_op)


def gathered_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, in_idx: Tensor, out_idx: Tensor,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
    *, x_compact: bool = False, y_compact: bool = False,
) -> Tensor:
    """The op contract on Triton kernels; arguments are validated by the dispatcher."""
    return conv2d_op(x, weight, bias, in_idx, out_idx, list(stride), list(padding), list(dilation),
                     groups > 1, x_compact, y_compact)


def channel_utility(a: Tensor, g: Tensor) -> Tensor:
    """``sum_b |sum_hw g*a| / (B*H*W)`` per channel, float32, by the deterministic Triton kernel."""
    return channel_utility_op(a, g)


def update_utility(a: Tensor, g: Tensor, utility: Tensor, idx: Tensor | None, decay: float,
                   scale: Tensor | None = None, shift: Tensor | None = None) -> None:
    """``utility[idx] = decay * utility[idx] + v / max(v)`` with ``v = channel_utility(a', g)``, where
    ``a' = a * scale + shift`` per channel when given (``idx`` None: every channel); two launches."""
    update_utility_op(a, g, scale, shift, utility, idx, float(decay))
