"""Triton backend: fused channel-gather convolution kernels, forward and backward.

Each kernel reads the selected channels through index vectors straight from the full-width (or
compact) tensors and writes only the selected channels: no gathered copies, no im2col buffer.

The kernels are exposed as PyTorch custom ops (autograd on the convs), so they compose with
``torch.compile``:

* ``dcp_triton::conv2d(x, weight, bias, in_idx, out_idx, ...) -> y``
* ``dcp_triton::conv2d_backward(grad_y, x, weight, in_idx, out_idx, ...) -> (grad_x, grad_w, grad_b)``
* ``dcp_triton::channel_utility(a, g) -> v``
* ``dcp_triton::update_utility(a, g, scale, shift, utility!, idx, decay)``: the layer's whole utility
  step in two launches (reduction, then normalise + decay + scatter), mutating ``utility``
* ``dcp_triton::conv2d_counted``/``conv2d_counted_backward``/``update_utility_counted``: the same with
  the selection read on the device (``(order, count)`` pairs: a permutation of the channels, kept ones
  first, and their number as an int32 tensor); full-width tensors only, every element written, so no
  shape and no host value depends on the selection (the static-shape step, CUDA-graph capturable)

On a GPU they are registered with ``torch.library.triton_op`` (Inductor sees the Triton kernels
themselves). Under ``TRITON_INTERPRET=1`` (how the test suite runs them on CPU) the interpreted
kernels cannot be traced, so the same functions are registered as opaque ``custom_op``s with an
explicit fake kernel instead.

This module imports Triton: import it only after deciding the backend is wanted (``TRITON_INTERPRET``
is read when the kernels are defined).
"""
from __future__ import annotations

from typing import Sequence  # custom-op schemas: torch 2.6 reads typing.Sequence[int], not list[int]

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
from .batch_norm import batch_norm_gate, batch_norm_gate_backward
from .batch_norm_compact import batch_norm_backward_apply as _bn_apply_kernel
from .batch_norm_compact import batch_norm_backward_partials as _bn_partials_kernel
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
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
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
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
    depthwise: bool, x_compact: bool, y_compact: bool, output_mask: Sequence[bool],
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


def _keep_mask(order: Tensor, count: Tensor) -> Tensor:
    """The float 0/1 mask of the channels ``order[:count]`` (static shapes, no host read)."""
    slots = torch.arange(order.numel(), device=order.device)
    return torch.empty(order.numel(), dtype=torch.float32, device=order.device).index_put_(
        (order,), (slots < count).float())


def _conv2d_counted(
    x: Tensor, weight: Tensor, bias: Tensor | None, in_order: Tensor, in_count: Tensor, out_order: Tensor,
    out_count: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], depthwise: bool,
) -> Tensor:
    y = empty_conv_output(x, weight, out_order, stride, padding, dilation, False)
    if y.numel() == 0:
        return y
    if depthwise:
        return depthwise_forward(x, weight, bias, _keep_mask(in_order, in_count), out_order, y, stride, padding,
                                 dilation, y_compact=False, out_count=out_count)
    return conv_forward(x, weight, bias, in_order, out_order, y, stride, padding, dilation,
                        x_compact=False, y_compact=False, counts=(in_count, out_count))


def _conv2d_counted_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, in_order: Tensor, in_count: Tensor, out_order: Tensor,
    out_count: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], depthwise: bool,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """As :func:`_conv2d_backward` with counted selections: every element of every gradient is
    written by the kernels (zeros outside the kept channels), so nothing is zero-filled first."""
    need_x, need_w, need_b = output_mask
    grad_x, grad_w, grad_b = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    work = grad_y.numel() > 0
    in_keep = _keep_mask(in_order, in_count) if depthwise and work else None
    if need_x:
        grad_x = torch.empty_like(x, memory_format=memory_format_of(x))
        if not work:
            grad_x.zero_()
        elif depthwise:
            # Depthwise: output channel c feeds input channel c only; the out selection spans them all.
            depthwise_grad_input(grad_y, weight, in_keep, out_order, grad_x, stride, padding, dilation,
                                 gy_compact=False, out_count=out_count)
        else:
            conv_grad_input(grad_y, weight, in_order, out_order, grad_x, stride, padding, dilation,
                            gy_compact=False, gx_compact=False, counts=(in_count, out_count))
    if need_w:
        grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
        if not work:
            grad_w.zero_()
        elif depthwise:
            depthwise_grad_weight(grad_y, x, in_keep, out_order, grad_w, stride, padding, dilation,
                                  gy_compact=False, out_count=out_count)
        else:
            conv_grad_weight(grad_y, x, in_order, out_order, grad_w, stride, padding, dilation,
                             gy_compact=False, x_compact=False, counts=(in_count, out_count))
    if need_b:
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_b = (grad_y.sum(dim=(0, 2, 3), dtype=accumulate) * _keep_mask(out_order, out_count)).to(weight.dtype)
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


def _update_utility_counted(
    a: Tensor, g: Tensor, scale: Tensor | None, shift: Tensor | None, utility: Tensor, order: Tensor,
    count: Tensor, decay: float,
) -> None:
    v = _utility_kernel(a, g, scale, shift, kept=(order, count)) if a.numel() else a.new_zeros(
        a.shape[1], dtype=torch.float32)
    _update_kernel(utility, v, order, decay, count=count)


def _register(name: str, fn, fake):
    if interpreting():
        op = torch.library.custom_op(f"dcp_triton::{name}", fn, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(f"dcp_triton::{name}", fn, mutates_args=())


def _register_utility_update(name: str, fn):
    name = f"dcp_triton::{name}"
    if interpreting():
        op = torch.library.custom_op(name, fn, mutates_args=("utility",))
        op.register_fake(lambda *args: None)
        return op
    return torch.library.triton_op(name, fn, mutates_args={"utility"})


def _fake_conv2d_counted(x, weight, bias, in_order, in_count, out_order, out_count, stride, padding, dilation,
                         depthwise):
    return fake_conv2d(x, weight, bias, in_order, out_order, stride, padding, dilation, depthwise, False, False)


def _fake_conv2d_counted_backward(grad_y, x, weight, in_order, in_count, out_order, out_count, stride, padding,
                                  dilation, depthwise, output_mask):
    return fake_conv2d_backward(grad_y, x, weight, in_order, out_order, stride, padding, dilation, depthwise,
                                False, False, output_mask)


conv2d_op = _register("conv2d", _conv2d, fake_conv2d)
update_utility_op = _register_utility_update("update_utility", _update_utility)
update_utility_counted_op = _register_utility_update("update_utility_counted", _update_utility_counted)
conv2d_counted_op = _register("conv2d_counted", _conv2d_counted, _fake_conv2d_counted)
conv2d_counted_backward_op = _register("conv2d_counted_backward", _conv2d_counted_backward,
                                       _fake_conv2d_counted_backward)
conv2d_backward_op = _register("conv2d_backward", _conv2d_backward, fake_conv2d_backward)
channel_utility_op = _register("channel_utility", _channel_utility, fake_channel_utility)


def _fake_bn_partials(grad_out, y, weight, bias, mean, invstd):
    return y.new_empty(3, y.shape[0], y.shape[1], dtype=torch.float32)


def _fake_bn_apply(grad_out, y, weight, mean, invstd, sums):
    return torch.empty_like(y)


bn_backward_partials_op = _register("bn_backward_partials", _bn_partials_kernel, _fake_bn_partials)
bn_backward_apply_op = _register("bn_backward_apply", _bn_apply_kernel, _fake_bn_apply)


register_conv_autograd(conv2d_op, conv2d_backward_op)


def _counted_setup_context(ctx, inputs, output):
    x, weight, bias, in_order, in_count, out_order, out_count, stride, padding, dilation, depthwise = inputs
    ctx.save_for_backward(x, weight, in_order, in_count, out_order, out_count)
    ctx.conf = (stride, padding, dilation, depthwise)
    ctx.has_bias = bias is not None


def _counted_backward(ctx, grad_y):
    x, weight, in_order, in_count, out_order, out_count = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x, grad_w, grad_b = conv2d_counted_backward_op(
        grad_y, x, weight, in_order, in_count, out_order, out_count, *ctx.conf,
        [need_x, need_w, need_b and ctx.has_bias])
    return (grad_x if need_x else None, grad_w if need_w else None, grad_b if need_b and ctx.has_bias else None,
            None, None, None, None, None, None, None, None)


conv2d_counted_op.register_autograd(_counted_backward, setup_context=_counted_setup_context)


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


def counted_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, in_kept: tuple[Tensor, Tensor], out_kept: tuple[Tensor, Tensor],
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], depthwise: bool,
) -> Tensor:
    """The conv of the kept block with the selection read on the device: ``in_kept``/``out_kept`` are
    ``(order, count)`` pairs (:func:`dcp_kernels.rule.kept_first`). Full-width input and output (zeros
    outside the kept channels); no shape and no host value depends on the selection."""
    return conv2d_counted_op(x, weight, bias, *in_kept, *out_kept, list(stride), list(padding), list(dilation),
                             depthwise)


def update_utility_counted(a: Tensor, g: Tensor, utility: Tensor, kept: tuple[Tensor, Tensor], decay: float,
                           scale: Tensor | None = None, shift: Tensor | None = None) -> None:
    """:func:`update_utility` for full-width ``a``/``g`` and a counted selection ``kept``: the kept
    channels' utilities only, two launches, nothing read on the host."""
    update_utility_counted_op(a, g, scale, shift, utility, *kept, float(decay))


def batch_norm_backward_with_utility(grad_out: Tensor, y: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                                     invstd: Tensor, need_input_grad: bool = True,
                                     ) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(grad_y, param_grads, v)`` of training-mode BN over every channel of ``y`` (the compact conv
    output; ``mean``/``invstd`` the forward's saved statistics): ``param_grads`` is ``(2, C)``, the
    weight and the bias gradients in ``weight``'s dtype; ``v`` each channel's DCP utility of the BN
    output ``weight * (y - mean) * invstd + bias`` without the constant ``1 / (N*H*W)`` (float32). Three
    launches: per-sample partial sums (one read of ``grad_out`` and ``y``), their sum over the batch,
    the input gradient (a second read and one write; ``grad_y`` None unless ``need_input_grad``).
    ``grad_y`` has ``y``'s dtype and memory format."""
    sums = bn_backward_partials_op(grad_out, y, weight, bias, mean, invstd).sum(1)
    grad_y = bn_backward_apply_op(grad_out, y, weight, mean, invstd, sums) if need_input_grad else None
    # The parameter gradients may be views of ``sums`` (float32 weights): nothing writes them in place.
    return grad_y, sums[:2].to(weight.dtype), sums[2]


def update_utility_from(v: Tensor, utility: Tensor, kept: tuple[Tensor, Tensor], decay: float) -> None:
    """``utility[order[j]] = decay * utility[order[j]] + v[j] / max(v)`` for j < count: the update of a
    utility vector ``v`` already reduced (by :func:`batch_norm_gate_backward`), one launch."""
    _update_kernel(utility, v, kept[0], decay, count=kept[1])


__all__ = ["batch_norm_backward_with_utility", "batch_norm_gate", "batch_norm_gate_backward", "channel_utility", "counted_conv2d", "gathered_conv2d",
           "update_utility", "update_utility_counted", "update_utility_from"]
