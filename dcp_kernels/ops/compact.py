"""Compact PyTorch backend: gather the selected channels, convolve compact tensors, scatter back.

Only the selected block of work is done, forward and backward: the input gather reads ``k_in``
channels, the convolution runs at ``k_out x k_in``, and the backward computes grad-input only for
the selected input channels and grad-weight only for the selected block (written into full-size
zero tensors, so optimizers see ordinary full-size gradients).

The input may also arrive already compact (``x_compact=True``: ``x`` holds exactly the channels
``in_idx``, in order), as it does between two converted layers; then there is no gather and the
grad-input stays compact.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence  # typing.Sequence: custom-op schemas on torch 2.6 (no list[int])

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .reference import channel_mask
from .registration import empty_conv_output, fake_conv2d_backward, memory_format_of


def zeros_except(shape, idx: torch.Tensor, values: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    """A tensor of ``shape`` holding ``values`` at channels ``idx`` (dim 1) and zeros elsewhere."""
    # Measured on CPU: a full memset plus index_copy_ beats index_fill_ on the complement.
    out = torch.empty(shape, dtype=values.dtype, device=values.device, memory_format=memory_format).zero_()
    return out.index_copy_(1, idx, values)


def widen(values: torch.Tensor, idx: torch.Tensor, channels: int) -> torch.Tensor:
    """The compact (N, k, H, W) ``values`` placed at channels ``idx`` of a zero (N, channels, H, W),
    in ``values``' memory format."""
    return zeros_except((values.shape[0], channels) + tuple(values.shape[2:]), idx, values, memory_format_of(values))


def gather_channels(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t.index_select(1, idx)`` in ``t``'s memory format: ATen's gather writes NCHW whatever its
    input, which would turn a channels_last stream into NCHW copies (and cuDNN transposes) from the
    first gather on. A channels_last tensor is gathered on the last dimension of its NHWC view
    (not under a Dynamo that cannot trace the layout test in a backward, torch 2.6: plain gather)."""
    if (DYNAMO_TRACES_SHAPE_QUERIES or not torch.compiler.is_dynamo_compiling()) and \
            memory_format_of(t) is torch.channels_last:
        return t.permute(0, 2, 3, 1).index_select(3, idx).permute(0, 3, 1, 2)
    return t.index_select(1, idx)


def selects_all(idx: torch.Tensor, size: int) -> bool:
    """Whether ``idx`` selects every one of ``size`` channels: the one test the library uses to skip
    a gather, a scatter or a write-back (compact backend, layers, finalize).

    Indices are sorted and unique (validated by the dispatcher or built by the controller), so a
    full-length index vector is exactly ``arange(size)``.

    Under ``torch.compile`` a selected width is a symbolic size: testing it against ``size`` would
    put a guard on it, and a layer reaching (or leaving) its full width would recompile the model.
    So the answer is True only where the width is statically known to be full (eager, or a width the
    graph holds as a constant); a symbolic width answers False (the gather path, exact for a full
    index vector too) and adds no guard. Where Dynamo cannot trace ``statically_known_true`` (torch
    2.6: a graph break in every layer) every width under Dynamo answers False."""
    if not DYNAMO_TRACES_SHAPE_QUERIES and torch.compiler.is_dynamo_compiling():
        return False
    return statically_known_true(idx.numel() == size)


def _dynamo_traces_statically_known_true() -> bool:
    """Whether Dynamo traces ``statically_known_true`` in the graph (newer torch) rather than
    breaking the graph at it (torch 2.6). Also the test for layout queries (``is_contiguous``) in an
    autograd.Function's backward, which torch 2.6's Dynamo refuses as well and 2.14's traces: the
    two were seen together, and no version between was tested."""
    try:
        from torch._dynamo.trace_rules import manual_torch_name_rule_map
    except ImportError:  # pragma: no cover - a torch without this table: take the safe answer
        return False
    return f"{statically_known_true.__module__}.statically_known_true" in manual_torch_name_rule_map


DYNAMO_TRACES_SHAPE_QUERIES = _dynamo_traces_statically_known_true()


def block_rows(out_idx: torch.Tensor, in_idx: torch.Tensor, c_in: int) -> torch.Tensor:
    """Rows of the (C_out * C_in, kh * kw) weight view that form the ``out_idx x in_idx`` block
    (flat indices; the Linear head's feature columns and Triton's grad-weight scatter use them)."""
    return torch.add(in_idx.unsqueeze(0), out_idx.unsqueeze(1), alpha=c_in).flatten()  # one kernel


def is_depthwise_weight(weight: torch.Tensor, groups: int) -> bool:
    """Whether a conv of ``weight`` (C_out, C_in / groups, kh, kw) with ``groups`` is depthwise
    (groups == C_in == C_out > 1); ``1 < groups`` otherwise is a grouped conv."""
    return groups > 1 and weight.shape[1] == 1 and groups == weight.shape[0]


def grouped_block_rows(out_idx: torch.Tensor, in_idx: torch.Tensor, in_per_group: int, out_per_group: int,
                       groups: int) -> torch.Tensor:
    """Rows of the (C_out * C_in/groups, kh * kw) weight view of a grouped conv that form its
    selected block: each kept output ``o`` (of group ``o // out_per_group``) reads the kept inputs of
    its own group, at their positions within the group.

    Needs the same number of kept inputs in every group (the selection rule's "equal counts per
    block", docs/algorithm.md): the kept inputs then form a (groups, k_in / groups) table.
    """
    local = torch.remainder(in_idx, in_per_group).view(groups, -1)
    columns = local.index_select(0, torch.div(out_idx, out_per_group, rounding_mode="floor"))
    return torch.add(columns, out_idx.unsqueeze(1), alpha=in_per_group).flatten()


class _Block(NamedTuple):
    """What the compact convolution of the ``out_idx x in_idx`` block runs on, gathered once."""

    x_c: torch.Tensor  # the input channels read (times the depthwise input mask), or x as it is
    w_c: torch.Tensor  # the weight block
    b_c: torch.Tensor | None
    read_idx: torch.Tensor  # input channels read (depthwise: out_idx)
    input_scale: torch.Tensor | None  # depthwise: 0/1 per read channel (outside in_idx: 0)
    rows: torch.Tensor | None  # grouped convs: rows of the flat weight view forming the block
    columns: bool  # groups=1, part of the inputs: the block is weight[out_idx][:, in_idx]
    in_scale: torch.Tensor | None  # capacity widths: 1/0 per read input slot (selected / padding)
    groups: int  # of the compact convolution
    depthwise: bool
    x_as_is: bool  # x was used without a gather (every channel read, or already compact)
    full_out: bool


def _gather_block(x, weight, bias, in_idx, out_idx, groups, x_compact, in_scale=None) -> _Block:
    """Gather the compact operands of the block.

    ``in_scale`` (capacity widths, docs/algorithm.md "Static capacity widths"): 1 or 0 per entry of
    ``in_idx``; the weight columns of the 0 entries (padding slots holding unselected channels) are
    zeroed, so those channels contribute nothing whatever their values, exactly as if not read.

    For depthwise convolutions (groups == C_in == C_out) output channel ``c`` reads only input
    channel ``c``: the computed channels are ``out_idx`` and an input channel outside ``in_idx``
    counts as zero (its output is the bias alone). A grouped convolution (1 < groups, not depthwise)
    runs as a smaller grouped convolution: ``in_idx`` and ``out_idx`` keep the same number of
    channels in every group (the selection rule guarantees it).
    """
    in_per_group, c_out = weight.shape[1], weight.shape[0]
    c_in = in_per_group * groups
    depthwise = is_depthwise_weight(weight, groups)
    full_out = selects_all(out_idx, c_out)
    b_c = None if bias is None else (bias if full_out else bias.index_select(0, out_idx))
    input_scale = rows = None
    if depthwise:
        read_idx, full_in, groups = out_idx, full_out, out_idx.numel()
        if in_scale is not None:
            input_scale = (x.new_zeros(c_in).index_copy_(0, in_idx, in_scale.to(x.dtype))
                           .index_select(0, out_idx).view(1, -1, 1, 1))
            in_scale = None  # applied to the input, not to the weight
        elif not selects_all(in_idx, c_in):
            input_scale = channel_mask(in_idx, c_in, x.dtype).index_select(0, out_idx).view(1, -1, 1, 1)
    else:
        read_idx, full_in = in_idx, selects_all(in_idx, c_in)
    columns = not (depthwise or full_in) and groups == 1
    if not (depthwise or full_in or columns):
        rows = grouped_block_rows(out_idx, in_idx, in_per_group, c_out // groups, groups)
    w_c = _weight_block(weight, out_idx, in_idx, rows, columns, full_out, in_scale, groups, memory_format_of(x))
    x_c = x if (full_in or x_compact) else gather_channels(x, read_idx)
    if input_scale is not None:
        x_c = x_c * input_scale
    return _Block(x_c, w_c, b_c, read_idx, input_scale, rows, columns, in_scale, groups, depthwise,
                  full_in or x_compact, full_out)


def _column_scale(in_scale: torch.Tensor, k_out: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``in_scale`` (one entry per read input channel) as a (k_out, k_in / groups, 1, 1) factor of the
    weight block's columns: row ``o`` of a grouped block reads the inputs of its own group."""
    scale = in_scale.to(dtype)
    if groups == 1:
        return scale.view(1, -1, 1, 1)
    return scale.view(groups, -1).repeat_interleave(k_out // groups, 0)[:, :, None, None]


def _weight_block(weight: torch.Tensor, out_idx: torch.Tensor, in_idx: torch.Tensor, rows: torch.Tensor | None,
                  columns: bool, full_out: bool, in_scale: torch.Tensor | None = None,
                  groups: int = 1, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The block of ``weight`` the compact convolution runs with, in one gather: the ``out_idx x
    in_idx`` block (``columns``), the flat weight rows ``rows`` of a grouped conv as a (k_out,
    k_in / groups, kh, kw) block, or whole input rows of ``out_idx`` (neither).

    The groups=1 block is indexed by the two index vectors (broadcast, nothing materialized), not
    by flat (k_out * k_in) row indices: those cost 8 bytes per block row, kept for backward, which
    put VGG-16's step above dense's peak memory at prune 0.3 (docs/benchmarks.md), and a launch to
    build them. With ``in_scale`` the block's input columns are scaled by it (:func:`_gather_block`).

    The block has the input's ``memory_format`` (cuDNN and oneDNN convolve in one format: a block in
    another would be transposed inside the convolution). A channels_last weight is gathered in its
    NHWC view, so the block comes out channels_last without a copy."""
    if _is_whole_weight(rows, columns, full_out):
        w_c = weight
    elif memory_format_of(weight) is torch.channels_last and rows is None:
        w_nhwc = weight.permute(0, 2, 3, 1)  # (O, kh, kw, I), contiguous
        if not full_out:
            w_nhwc = w_nhwc.index_select(0, out_idx)
        if columns:
            w_nhwc = w_nhwc.index_select(3, in_idx)
        w_c = w_nhwc.permute(0, 3, 1, 2)
    elif columns:
        w_c = weight.index_select(1, in_idx) if full_out else weight[out_idx.unsqueeze(1), in_idx]
    elif rows is None:
        w_c = weight.index_select(0, out_idx)
    else:
        w_c = weight.reshape(weight.shape[0] * weight.shape[1], -1).index_select(0, rows)
        w_c = w_c.view(out_idx.numel(), -1, *weight.shape[2:])
    if in_scale is not None:
        w_c = w_c * _column_scale(in_scale, w_c.shape[0], groups, w_c.dtype)
    return w_c.contiguous(memory_format=memory_format)


def _is_whole_weight(rows: torch.Tensor | None, columns: bool, full_out: bool) -> bool:
    """Whether the block :func:`_weight_block` picks is the whole weight (nothing to gather or scatter)."""
    return rows is None and not columns and full_out


def _scatter_weight_block(grad_w: torch.Tensor, gw_c: torch.Tensor, out_idx: torch.Tensor, in_idx: torch.Tensor,
                          rows: torch.Tensor | None, columns: bool, full_out: bool) -> torch.Tensor:
    """Write the block's gradient ``gw_c`` into ``grad_w`` (full-size zeros) where
    :func:`_weight_block` gathered the block from (its cases, in the same order)."""
    if columns and full_out:
        grad_w.index_copy_(1, in_idx, gw_c)
    elif columns:
        grad_w.index_put_((out_idx.unsqueeze(1), in_idx), gw_c)
    elif rows is None:  # whole input rows of the selected outputs
        grad_w.index_copy_(0, out_idx, gw_c)
    else:
        grad_w.view(grad_w.shape[0] * grad_w.shape[1], -1).index_copy_(
            0, rows, gw_c.reshape(gw_c.shape[0] * gw_c.shape[1], -1))
    return grad_w


def _block_backward(grad_y_c, block: _Block, out_idx, stride, padding, dilation, x_shape, w_shape,
                    x_memory_format, has_bias: bool, need_x: bool, need_w: bool, need_b: bool,
                    w_zeros: torch.Tensor | None = None, w_memory_format=torch.contiguous_format):
    """(grad_x, grad_w, grad_b) of the block's convolution, in the full (or x's compact) layout;
    None for a gradient not asked for. Grad-weight is non-zero only on the block; it is scattered
    into ``w_zeros`` when given (zeros of the weight's shape, allocated with other gradients)."""
    x_c, w_c, read_idx, rows = block.x_c, block.w_c, block.read_idx, block.rows
    gx_c, gw_c, gb_c = torch.ops.aten.convolution_backward(
        grad_y_c, x_c, w_c, [w_c.shape[0]] if has_bias else None,
        list(stride), list(padding), list(dilation), False, [0, 0], block.groups,
        [need_x, need_w, need_b and has_bias],
    )
    grad_x = grad_w = grad_b = None
    if need_x:
        if block.input_scale is not None:
            gx_c = gx_c * block.input_scale
        grad_x = gx_c if block.x_as_is else zeros_except(x_shape, read_idx, gx_c, x_memory_format)
    if need_w:
        if block.in_scale is not None:  # the columns were scaled in forward (_weight_block)
            gw_c = gw_c * _column_scale(block.in_scale, gw_c.shape[0], block.groups, gw_c.dtype)
        if _is_whole_weight(rows, block.columns, block.full_out):
            grad_w = gw_c
        else:
            zeros = w_zeros if w_zeros is not None else weight_layout_view(
                gw_c.new_zeros(w_shape.numel()), w_shape, w_memory_format)
            grad_w = _scatter_weight_block(zeros, gw_c, out_idx, read_idx, rows, block.columns, block.full_out)
    if need_b and has_bias:
        grad_b = gb_c if block.full_out else gb_c.new_zeros(w_shape[0]).index_copy_(0, out_idx, gb_c)
    return grad_x, grad_w, grad_b


def block_conv_forward(x, weight, bias, in_idx, out_idx, stride, padding, dilation, groups, x_compact,
                       in_scale=None):
    """The compact convolution of the block, for an autograd Function's forward:
    ``(y_c, tensors to save, state to keep on ctx)``; :func:`block_conv_backward` takes the last two.

    The gathered input is saved (grad-weight reads it), so backward does not gather it again. The
    gathered weight block is saved when it is no bigger than the saved input; otherwise the weight
    itself is (a reference, no copy) and backward gathers the block again (one launch): in the deep
    layers of VGG-like networks at CIFAR size the blocks outweigh the activations, and keeping them
    put the step's peak memory above dense's (docs/benchmarks.md)."""
    block = _gather_block(x, weight, bias, in_idx, out_idx, groups, x_compact, in_scale)
    y_c = F.conv2d(block.x_c, block.w_c, block.b_c, stride, padding, dilation, block.groups)
    regather = block.w_c is not weight and block.w_c.numel() > block.x_c.numel()
    saved = (block.x_c, weight if regather else block.w_c, block.read_idx, out_idx, block.input_scale, block.rows,
             block.in_scale)
    kept = (block._replace(x_c=None, w_c=None, b_c=None, read_idx=None, input_scale=None, rows=None, in_scale=None),
            (stride, padding, dilation, x.shape, weight.shape, memory_format_of(x), bias is not None, regather,
             weight_grad_format(weight, groups)))
    return y_c, saved, kept


def block_scatters_weight_grad(saved, kept) -> bool:
    """Whether :func:`block_conv_backward` scatters grad-weight into zeros (the block is not the whole
    weight), so that a caller may hand it the zeros (``w_zeros``)."""
    return not _is_whole_weight(saved[5], kept[0].columns, kept[0].full_out)


def block_conv_backward(grad_y_c, saved, kept, need_x: bool, need_w: bool, need_b: bool,
                        w_zeros: torch.Tensor | None = None):
    """(grad_x, grad_w, grad_b) of :func:`block_conv_forward` from what it saved and kept (grad-weight
    scattered into ``w_zeros`` when given, see :func:`block_scatters_weight_grad`)."""
    x_c, w_c, read_idx, out_idx, input_scale, rows, in_scale = saved
    meta, (stride, padding, dilation, x_shape, w_shape, x_memory_format, has_bias, regather, w_memory_format) = kept
    if regather:  # forward kept the weight, not its block (see block_conv_forward)
        w_c = _weight_block(w_c, out_idx, read_idx, rows, meta.columns, meta.full_out, in_scale, meta.groups,
                            memory_format_of(x_c))
    block = meta._replace(x_c=x_c, w_c=w_c, read_idx=read_idx, input_scale=input_scale, rows=rows, in_scale=in_scale)
    return _block_backward(grad_y_c, block, out_idx, stride, padding, dilation, x_shape, w_shape,
                           x_memory_format, has_bias, need_x, need_w, need_b, w_zeros, w_memory_format)


def weight_grad_format(weight: torch.Tensor, groups: int) -> torch.memory_format:
    """The layout a weight's scattered gradient is written in: the weight's own (autograd accumulates
    it so), except for a grouped conv's block, which is scattered by flat rows of a contiguous tensor."""
    if groups > 1 and not is_depthwise_weight(weight, groups):
        return torch.contiguous_format
    return memory_format_of(weight)


def weight_layout_view(flat: torch.Tensor, shape: torch.Size, memory_format: torch.memory_format) -> torch.Tensor:
    """``flat`` (``shape.numel()`` elements) seen as a tensor of ``shape`` in ``memory_format``: where
    a weight's gradient is scattered, in the weight's own layout (as autograd accumulates it)."""
    if memory_format is torch.channels_last:
        o, i, kh, kw = shape
        return flat.view(o, kh, kw, i).permute(0, 3, 1, 2)
    return flat.view(shape)


class _CompactConv2d(torch.autograd.Function):
    """Convolution of the ``out_idx x in_idx`` block (see :func:`_gather_block`); returns the
    compact (N, k_out, H', W') output. Saves the gathered operands for its backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, in_idx, out_idx, stride, padding, dilation, groups, x_compact, in_scale):
        y_c, saved, ctx.kept = block_conv_forward(x, weight, bias, in_idx, out_idx, stride, padding, dilation,
                                                  groups, x_compact, in_scale)
        ctx.save_for_backward(*saved)
        return y_c

    @staticmethod
    @once_differentiable  # saves the gathered block: no exact second derivative
    def backward(ctx, grad_y_c):
        grads = block_conv_backward(grad_y_c, ctx.saved_tensors, ctx.kept, *ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None, None, None, None)


# Under torch.compile the same computation runs as an opaque custom op. Traced through, the aten
# convolution on the gathered weight block gets sizes inductor specializes (its conv lowering), so
# every new combination of kept widths would compile a new graph; as an op with a fake kernel the
# widths stay symbolic and one graph serves every selection, as for the Triton and extension ops.
# Eager keeps the autograd Function above: no custom-op dispatch per layer, and its backward reuses
# the gathered operands instead of gathering them again.
@torch.library.custom_op("dcp_torch::compact_conv2d", mutates_args=())
def _compact_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_idx: torch.Tensor,
                       out_idx: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                       groups: int, x_compact: bool, in_scale: torch.Tensor | None = None) -> torch.Tensor:
    block = _gather_block(x, weight, bias, in_idx, out_idx, groups, x_compact, in_scale)
    y_c = F.conv2d(block.x_c, block.w_c, block.b_c, stride, padding, dilation, block.groups)
    # The layout the fake kernel promises (inductor plans with the fake's strides).
    return y_c.contiguous(memory_format=memory_format_of(x))


@_compact_conv2d_op.register_fake
def _(x, weight, bias, in_idx, out_idx, stride, padding, dilation, groups, x_compact, in_scale=None):
    return empty_conv_output(x, weight, out_idx, stride, padding, dilation, y_compact=True)


@torch.library.custom_op("dcp_torch::compact_conv2d_backward", mutates_args=())
def _compact_conv2d_backward_op(grad_y_c: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                                in_idx: torch.Tensor, out_idx: torch.Tensor, stride: Sequence[int],
                                padding: Sequence[int], dilation: Sequence[int], groups: int, x_compact: bool,
                                output_mask: Sequence[bool],
                                in_scale: torch.Tensor | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    block = _gather_block(x, weight, None, in_idx, out_idx, groups, x_compact, in_scale)
    grads = _block_backward(grad_y_c, block, out_idx, stride, padding, dilation, x.shape, weight.shape,
                            memory_format_of(x), has_bias, *output_mask)
    grad_x, grad_w, grad_b = grads
    # The layouts the fake kernel promises; a fresh empty tensor for each gradient not asked for
    # (custom-op outputs may not alias each other).
    return (x.new_empty(0) if grad_x is None else grad_x.contiguous(memory_format=memory_format_of(x)),
            x.new_empty(0) if grad_w is None else grad_w.contiguous(),
            x.new_empty(0) if grad_b is None else grad_b)


@_compact_conv2d_backward_op.register_fake
def _(grad_y_c, x, weight, has_bias, in_idx, out_idx, stride, padding, dilation, groups, x_compact, output_mask,
      in_scale=None):
    need_x, need_w, need_b = output_mask
    return fake_conv2d_backward(grad_y_c, x, weight, in_idx, out_idx, stride, padding, dilation,
                                is_depthwise_weight(weight, groups), x_compact,
                                True, [need_x, need_w, need_b and has_bias])


def _op_setup_context(ctx, inputs, output):
    x, weight, bias, in_idx, out_idx, stride, padding, dilation, groups, x_compact, in_scale = inputs
    ctx.save_for_backward(x, weight, in_idx, out_idx, in_scale)
    ctx.conf = (bias is not None, stride, padding, dilation, groups, x_compact)


def _op_backward(ctx, grad_y_c):
    x, weight, in_idx, out_idx, in_scale = ctx.saved_tensors
    has_bias, stride, padding, dilation, groups, x_compact = ctx.conf
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and has_bias
    grad_x, grad_w, grad_b = _compact_conv2d_backward_op(grad_y_c, x, weight, has_bias, in_idx, out_idx, stride,
                                                         padding, dilation, groups, x_compact, [need_x, need_w, need_b],
                                                         in_scale)
    return (grad_x if need_x else None, grad_w if need_w else None, grad_b if need_b else None,
            None, None, None, None, None, None, None, None)


_compact_conv2d_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def compact_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_idx: torch.Tensor,
    out_idx: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    x_compact: bool = False,
    in_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The selected block's output, compact: (N, len(out_idx), H', W'). ``in_scale``: see
    :func:`_gather_block` (capacity widths)."""
    if torch.compiler.is_compiling():
        return _compact_conv2d_op(x, weight, bias, in_idx, out_idx, list(stride), list(padding), list(dilation),
                                  groups, x_compact, in_scale)
    return _CompactConv2d.apply(x, weight, bias, in_idx, out_idx, stride, padding, dilation, groups, x_compact,
                                in_scale)


class _ScatterChannels(torch.autograd.Function):
    """Place compact channels into a zero full-width tensor; backward gathers them back."""

    @staticmethod
    def forward(ctx, y_c, out_idx, channels):
        ctx.save_for_backward(out_idx)
        return widen(y_c, out_idx, channels)

    @staticmethod
    def backward(ctx, grad_out):
        (out_idx,) = ctx.saved_tensors
        return gather_channels(grad_out, out_idx), None, None


def scatter_channels(y_c: torch.Tensor, out_idx: torch.Tensor, channels: int) -> torch.Tensor:
    """Full-width (N, channels, H, W) tensor holding ``y_c`` at ``out_idx`` and exact zeros elsewhere."""
    if selects_all(out_idx, channels):
        return y_c
    return _ScatterChannels.apply(y_c, out_idx, channels)

