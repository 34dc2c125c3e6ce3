"""The layer step of a ``DCPConv2d``: conv -> BatchNorm -> gate, and in backward the utility update.

One entry point, :func:`layer_step`, dispatches the whole step by backend, so each backend owns it:

* ``reference``: the paper's semantics with masks (dense conv, full-width BN, ``out = a * mask``),
  the oracle;
* the compact backends (``torch``, ``triton``, ``extension``): the conv of the selected block by the
  backend's kernels, then BatchNorm and gate on the selected channels only. In training the BN and
  the gate are one autograd node (:class:`_CompactBatchNormGate`): one gather of the four BN vectors,
  batch statistics, the running statistics of the selected channels written back, and a backward
  that scatters the BN parameter gradients once and updates the utilities. It saves only what BN's
  backward needs (the conv output and the batch statistics) and recomputes the BN output for the
  utility, so no extra activation is kept and the gate returns BN's output without a copy. On
  ``torch`` in eager mode the conv joins that node too (:class:`_TorchLayerStep`: one autograd node
  per layer, forward and backward, for a step whose time on a GPU is host work).

The static-shape step (``static_shapes=True``, Triton only) has its own entry point,
:func:`counted_layer_step`: full-width tensors, the selection read on the device (kept-first
permutations with device counts), the Triton conv and BN + gate kernels skipping the unselected
channels; the same launches and shapes whatever is selected, nothing read on the host.

``layer`` is the ``DCPConv2d`` (duck-typed: parameters, buffers, ``norm``, ``decay``...): the module
keeps the state and the wiring, this module the computation. Arguments arrive already cast for
autocast (done once, in ``DCPConv2d.forward``).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..rule import UtilityUpdates, update_utilities, utility_updates_paused
from . import (
    CAPACITY_BACKEND,
    _triton_backend,
    _triton_usable,
    channel_utility,
    gathered_conv2d,
    reference,
    scatter_channels,
)
from .compact import (
    DYNAMO_TRACES_SHAPE_QUERIES,
    block_conv_backward,
    compact_conv2d,
    block_conv_forward,
    block_scatters_weight_grad,
    gather_channels,
    selects_all,
    weight_grad_format,
    weight_layout_view,
    widen,
)
from .reference import channel_mask


class Slots(NamedTuple):
    """A layer's output slots under capacity widths (docs/algorithm.md, "Static capacity widths"): its
    index vector has a fixed *capacity* of entries, the selected channels and, after them in the
    sorted vector, unselected ones as padding. ``selected`` (bool) and ``scale`` (1.0 / 0.0, float32)
    say which slot is which; the padding slots' outputs are masked to exact zeros."""

    selected: torch.Tensor
    scale: torch.Tensor


class _UtilitySink(NamedTuple):
    """Where a layer's backward puts its utility update: the layer's buffer and decay, and its row of
    the controller's network-wide update (:class:`~dcp_kernels.rule.UtilityUpdates`, slot), if any.

    Handed to the autograd functions as a plain argument: the buffer is updated in place in backward,
    which would trip autograd's version check on a retained graph if it were saved."""

    utility: torch.Tensor
    decay: float
    updates: tuple[UtilityUpdates, int] | None
    # Capacity widths: per slot of the layer's index vector, whether it holds a selected channel
    # (padding slots are not updated: they hold unselected channels). None: every slot is selected.
    slots: torch.Tensor | None = None

    @classmethod
    def of(cls, layer: Any, slots: "Slots | None" = None) -> "_UtilitySink":
        return cls(layer.utility, layer.decay, getattr(layer, "_utility_updates", None),
                   None if slots is None else slots.selected)

    def pending_row(self, *, full: bool) -> torch.Tensor | None:
        """This layer's row of the network-wide update of the backward pass under way, or None (no
        controller, a traced backward, no pass under way): then the layer updates at once."""
        if self.updates is None:
            return None
        batch, slot = self.updates
        return batch.pending_row(slot, full=full)


def _update_utilities(backend: str, a: torch.Tensor, g: torch.Tensor, sink: _UtilitySink,
                      idx: torch.Tensor | None, scale: torch.Tensor | None = None,
                      shift: torch.Tensor | None = None, mean: torch.Tensor | None = None) -> None:
    """The backward's utility work: ``v = channel_utility(a', g)``, then ``U[idx] = decay * U[idx] +
    v / max(v)`` (``idx`` None: all channels). ``a' = a * scale + shift`` per channel where
    ``scale`` and ``shift`` are given (Triton's reduction applies them on the fly, ``torch`` uses
    :func:`_affine_channel_utility`, which takes the batch ``mean`` of ``a`` too), else ``a' = a``.

    Triton: two launches (reduction, then one update program). Others: PyTorch ops (the extension's
    reduction kernel where built); the reduction then lands in the layer's row of the controller's
    network-wide update (one scatter), which runs once for all layers at the end of the backward
    pass: five launches per layer less than updating here. Nothing inside
    :func:`~dcp_kernels.rule.paused_utility_updates`."""
    if utility_updates_paused():
        return
    if backend == "triton":
        _triton_backend().update_utility(a, g, sink.utility, idx, sink.decay, scale, shift)
        return
    # The max-normalisation in update_utilities cancels the reduction's constant 1 / (B*H*W): the
    # PyTorch reduction leaves it out (one launch less per layer); the extension's kernel has it built in.
    if scale is not None:
        assert backend == "torch", "the extension's reduction takes the BN output"
        v = _affine_channel_utility(a, g, scale, shift, mean)
    elif backend == "extension":
        v = channel_utility(a, g, backend=backend)
    else:
        v = reference.channel_utility(a, g, mean=False)
    _record_utility(v, sink, idx)


def _record_utility(v: torch.Tensor, sink: _UtilitySink, idx: torch.Tensor | None) -> None:
    """The layer's utility vector ``v`` (its channels ``idx``; None: all) into the controller's
    network-wide update (one scatter), or straight into the utilities without one."""
    row = sink.pending_row(full=idx is None)
    if row is None:
        update_utilities(sink.utility, v, idx, sink.decay, only=sink.slots)
    elif idx is None:
        row.copy_(v)
    else:
        row.index_copy_(0, idx, v)


_FUSED_BN_BACKWARD: bool | None = None  # None: on CUDA tensors where Triton runs; True/False: forced


def fused_bn_backward_applies(y: torch.Tensor) -> bool:
    """Whether the ``torch`` backend's BN + gate backward takes Triton's fused BN backward with the
    utility (:func:`dcp_kernels.ops.triton.batch_norm_backward_with_utility`: one read of the gradient
    and the conv output for BN's sums and the utility, where ``native_batch_norm_backward`` and the
    utility's own reduction read them three to four times). On CUDA tensors of an Ampere or newer GPU
    when Triton is usable; the CPU keeps oneDNN's BN backward and the batched-dot utility
    (:func:`_affine_channel_utility`).
    float64 keeps PyTorch's (the kernels accumulate in float32). Decided when the backward runs:
    :func:`forced_fused_bn_backward` overrides it around ``backward()`` (tests under
    ``TRITON_INTERPRET=1``, and the roofline's trace, which stands for the CUDA step on CPU tensors)."""
    if _FUSED_BN_BACKWARD is not None:
        return _FUSED_BN_BACKWARD
    return y.is_cuda and y.dtype in _FUSED_DTYPES and _fused_bn_backward_on_gpu(y.device.index)


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GPU_ANSWERS: dict[int | None, bool] = {}


@torch.compiler.assume_constant_result  # a fact about the machine: constant within a compiled graph
def _fused_bn_backward_on_gpu(index: int | None) -> bool:
    """Triton usable, and compute capability 8.0 or newer (the GPUs the kernels target: bf16 loads;
    older GPUs keep ``native_batch_norm_backward``). Asked once per device."""
    answer = _GPU_ANSWERS.get(index)
    if answer is None:
        answer = _GPU_ANSWERS[index] = _triton_usable("cuda") and torch.cuda.get_device_capability(index) >= (8, 0)
    return answer


class forced_fused_bn_backward:  # noqa: N801 - used like a function: ``with forced_fused_bn_backward(True):``
    """Context manager: the ``torch`` backend takes (``True``) or skips (``False``) the fused BN
    backward whatever the device, restoring the automatic choice after. ``True`` on CPU tensors needs
    ``TRITON_INTERPRET=1`` (its kernels run in Triton's interpreter)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        global _FUSED_BN_BACKWARD
        self._before, _FUSED_BN_BACKWARD = _FUSED_BN_BACKWARD, self.enabled

    def __exit__(self, *exc: object) -> None:
        global _FUSED_BN_BACKWARD
        _FUSED_BN_BACKWARD = self._before


@torch.compiler.assume_constant_result  # a settings read, constant within a compiled graph (no graph break)
def _cuda_matmul_in_full_fp32() -> bool:
    """Whether float32 matrix products on CUDA run in full fp32 (no TF32 or bf16 passes)."""
    return torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32


def _affine_channel_utility(y: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                           mean: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_b |sum_hw g * (y * scale + shift)|`` per channel, float32, without forming the BN
    output: ``sum_hw g * a = scale * sum_hw g * y + shift * sum_hw g``. On CUDA the first sum is a
    batched dot product (one ``bmm`` reading ``g`` and ``y`` once, nothing written at activation size)
    where both are contiguous float32. On the CPU it is the product and its sum: the ``bmm`` (one
    length-``H*W`` dot per sample and channel) measured 2-3x slower at CIFAR shapes, and a VGG-16
    CIFAR step (batch 64, 2 threads, Intel Xeon, 2026-12-08) 11% slower than with the product (0.658
    against 0.590 s; the finalized network 0.586 s), more than the ``bmm`` calls themselves took.

    bf16 (autocast): no float32 copy of an activation. ``y`` is centred by its batch ``mean`` (rounded
    to bf16; the shift absorbs the rounding) in bf16, multiplied by ``g`` and reduced with float32
    accumulation: four passes of 2-byte reads and writes where float32 copies, product and reduction
    took about twice the bytes. The utility then carries bf16's rounding (about 2e-3 of the largest,
    where the float32 product had 4e-6). The centring keeps that rounding relative to ``y - mean``:
    uncentred, ``scale * sum g * y`` and ``shift * sum g`` nearly cancel when a channel's mean is
    large against its spread, and the rounding of ``g * y`` would dominate. fp16 keeps the float32
    product: its range would overflow on ``g * y`` with GradScaler's scaled gradients."""
    batch, channels = y.shape[:2]
    # bmm only where it runs in full fp32: with TF32 (or bf16) matmuls allowed, the two sums' rounding
    # would not cancel well in scale * gy + shift * g_sum. A Dynamo that cannot trace the layout test
    # in a backward (torch 2.6) takes the product and sum, which inductor fuses into one reduction.
    if y.dtype == torch.bfloat16 and mean is not None:
        center = mean.to(y.dtype)
        # a = scale * (y - center) + (shift + scale * center), exactly, with center as rounded.
        shift = torch.addcmul(shift.float(), scale.float(), center.float())
        gy = torch.sum(g * (y - center.view(1, -1, 1, 1)), dim=(2, 3), dtype=torch.float32)
    elif ((DYNAMO_TRACES_SHAPE_QUERIES or not torch.compiler.is_dynamo_compiling())
            and y.is_cuda and _cuda_matmul_in_full_fp32() and y.dtype == g.dtype == torch.float32
            and y.is_contiguous() and g.is_contiguous()):
        gy = torch.bmm(g.view(batch * channels, 1, -1), y.view(batch * channels, -1, 1)).view(batch, channels)
    else:  # the CPU, channels_last, TF32 matmuls, fp16, float64: the product in float32 (at least) and its sum
        gy = (g.float() * y.float()).sum(dim=(2, 3))
    g_sum = g.sum(dim=(2, 3), dtype=torch.float32)
    return torch.linalg.vector_norm(torch.addcmul(g_sum * shift.float(), gy, scale.float()), ord=1, dim=0)


class _CompactGate(torch.autograd.Function):
    """Gate on the compact path without a fused BN: ``a_c`` holds only the selected channels.

    Forward returns them scattered into a zero full-width tensor (``scatter=True``) or as they are
    (compact activations between converted layers). Backward, in training, updates the layer's
    utilities from ``a`` and its gradient ``g``, both compact.
    """

    @staticmethod
    def forward(ctx, a_c, out_idx, channels, sink, track, scatter, backend):
        ctx.track, ctx.full = track, selects_all(out_idx, channels)
        ctx.backend = backend
        ctx.scatter = scatter and not ctx.full
        ctx.sink = sink  # not saved (see _UtilitySink)
        ctx.save_for_backward(a_c if track else None, out_idx)
        if ctx.scatter:
            return widen(a_c, out_idx, channels)
        # A new tensor even when nothing moves: a following in-place ReLU must not overwrite the
        # activation the utility update reads in backward.
        return a_c.clone()

    @staticmethod
    @once_differentiable  # saves gathered blocks and statistics: no exact second derivative
    def backward(ctx, grad_out):
        a_c, out_idx = ctx.saved_tensors
        g_c = gather_channels(grad_out, out_idx) if ctx.scatter else grad_out
        if ctx.track:
            _update_utilities(ctx.backend, a_c, g_c, ctx.sink, None if ctx.full else out_idx)
        return g_c, None, None, None, None, None, None


def _bn_gate_forward(y_c, weight, bias, stats, out_idx, channels, momentum, eps, scatter, slots=None):
    """Training-mode BN of the compact ``y_c`` and the gate: (output, tensors to save, full).

    One gather of the four per-channel vectors; the running statistics of the selected channels
    updated in place (``stats``: ``(running_mean, running_var)`` or ``None``). ``slots``: capacity
    widths (:class:`Slots`), whose padding slots get a zero BN affine (exact zero outputs, zero
    gradients behind them) and keep their running statistics."""
    full = selects_all(out_idx, channels)
    if slots is not None:
        return _bn_gate_forward_slots(y_c, weight, bias, stats, out_idx, channels, momentum, eps, scatter, slots,
                                      full)
    if full:
        w_c, b_c = weight, bias
        rm_c, rv_c = stats if stats is not None else (None, None)
    else:
        # One gather for the four per-channel vectors (four index_selects otherwise).
        vectors = torch.stack([weight, bias, *stats] if stats is not None else [weight, bias])
        # Rows by indexing, not unbind: native_batch_norm updates the running-stat rows in place, and
        # under torch.compile an in-place update of an unbind view specializes the kept width.
        picked = vectors.index_select(1, out_idx)
        w_c, b_c = picked[0], picked[1]
        rm_c, rv_c = (picked[2], picked[3]) if stats is not None else (None, None)
    # native_batch_norm updates rm_c/rv_c in place: the running statistics themselves when every
    # channel is selected, else the gathered copies written back below.
    a_c, mean, invstd = torch.native_batch_norm(y_c, w_c, b_c, rm_c, rv_c, True, momentum, eps)
    if stats is not None and not full:
        stats[0].index_copy_(0, out_idx, rm_c)
        stats[1].index_copy_(0, out_idx, rv_c)
    out = widen(a_c, out_idx, channels) if scatter and not full else a_c
    # Nothing saved refers to a_c: a following in-place ReLU may overwrite it.
    return out, (y_c, w_c, b_c, mean, invstd, None), full


def _bn_gate_forward_slots(y_c, weight, bias, stats, out_idx, channels, momentum, eps, scatter, slots: Slots,
                           full: bool):
    """:func:`_bn_gate_forward` under capacity widths. The BN weight and bias of the padding slots are
    zeroed (one multiply of the gathered vectors, not of the activation): their outputs are exact
    zeros, so BN's backward gives them zero input gradients, as the reference's gate does. Their
    running statistics are written back unchanged (the reference updates selected channels only)."""
    vectors = torch.stack([weight, bias, *stats] if stats is not None else [weight, bias])
    picked = vectors if full else vectors.index_select(1, out_idx)
    affine = picked[:2] * slots.scale.to(picked.dtype)  # float32 scale: keep bf16/fp16 parameters' dtype
    w_c, b_c = affine[0], affine[1]
    rm_c = rv_c = None
    if stats is not None:
        running = picked[2:].clone()  # native_batch_norm updates these rows in place
        rm_c, rv_c = running[0], running[1]
    a_c, mean, invstd = torch.native_batch_norm(y_c, w_c, b_c, rm_c, rv_c, True, momentum, eps)
    if stats is not None:
        updated = torch.where(slots.selected, running, picked[2:])
        if full:
            stats[0].copy_(updated[0])
            stats[1].copy_(updated[1])
        else:
            stats[0].index_copy_(0, out_idx, updated[0])
            stats[1].index_copy_(0, out_idx, updated[1])
    out = widen(a_c, out_idx, channels) if scatter and not full else a_c
    return out, (y_c, w_c, b_c, mean, invstd, slots.scale), full


def _bn_gate_backward(grad_out, saved, out_idx, channels, scatter, full, eps, backend, sink: _UtilitySink,
                      need_y, need_w, need_b, zeros: torch.Tensor | None = None):
    """Backward of :func:`_bn_gate_forward`: (grad_y_c, grad_bn_weight, grad_bn_bias), the BN parameter
    gradients full-size (zeros outside ``out_idx``; the rows of ``zeros``, a (2, channels) zero
    tensor, when given) or None; updates the utilities (``sink``)."""
    y_c, w_c, b_c, mean, invstd, slot_scale = saved
    g_c = gather_channels(grad_out, out_idx) if scatter and not full else grad_out
    idx = None if full else out_idx
    fused = backend == "torch" and fused_bn_backward_applies(y_c)
    if fused:  # BN's backward and the utility from one read of g_c and y_c (see fused_bn_backward_applies)
        grad_y, rows, v = _triton_backend().batch_norm_backward_with_utility(
            g_c, y_c, w_c, b_c, mean, invstd, need_y)
    else:
        grad_y, *rows = torch.ops.aten.native_batch_norm_backward(
            g_c, y_c, w_c, None, None, mean, invstd, True, eps, [need_y, need_w or need_b, need_w or need_b]
        )
    grad_w = grad_b = None
    if need_w or need_b:
        # rows: the weight and bias gradients, made one tensor where they are multiplied or scattered
        # (one launch for both).
        if slot_scale is not None:  # capacity widths: the padding slots' affine was zeroed in forward
            rows = _stacked(rows)
            rows = rows * slot_scale.to(rows.dtype)
        if not full:
            rows = _stacked(rows)
            both = rows.new_zeros(2, channels) if zeros is None else zeros
            rows = both.index_copy_(1, out_idx, rows)
        grad_w, grad_b = rows[0], rows[1]
    # The BN output is not saved for the utility (one activation less kept from forward to backward):
    # Triton's reduction applies y * scale + shift on the fly, ``torch`` reduces g * y and g and applies
    # them per (sample, channel) (_affine_channel_utility). The extension's reduction takes the BN
    # output: the forward's own op recomputes it from the same input.
    if fused:
        if not utility_updates_paused():
            _record_utility(v, sink, idx)
    elif backend in ("triton", "torch"):
        scale = w_c * invstd
        shift = torch.addcmul(b_c, mean, scale, value=-1)
        _update_utilities(backend, y_c, g_c, sink, idx, scale, shift, mean)
    else:
        a_c = torch.native_batch_norm(y_c, w_c, b_c, None, None, True, 0.0, eps)[0]
        _update_utilities(backend, a_c, g_c, sink, idx)
    return grad_y, (grad_w if need_w else None), (grad_b if need_b else None)


def _stacked(rows: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    return rows if isinstance(rows, torch.Tensor) else torch.stack(rows)


class _CompactBatchNormGate(torch.autograd.Function):
    """Training-mode BatchNorm (batch statistics, affine) of the compact conv output ``y_c``, then the
    gate, as one autograd node. Used only while the utilities are tracked (see
    :func:`_fused_batch_norm_applies`), so its backward updates them (outside
    :func:`~dcp_kernels.rule.paused_utility_updates`).

    ``stats`` is ``(running_mean, running_var)`` or ``None``; their selected entries are updated
    with ``momentum`` (the unselected ones are left as they are, docs/algorithm.md "BatchNorm").
    """

    @staticmethod
    def forward(ctx, y_c, weight, bias, stats, out_idx, channels, momentum, eps, sink, scatter, backend, slots):
        out, saved, full = _bn_gate_forward(y_c, weight, bias, stats, out_idx, channels, momentum, eps, scatter,
                                            slots)
        ctx.conf = (channels, scatter, full, eps, backend)
        ctx.sink = sink  # not saved (see _UtilitySink)
        ctx.save_for_backward(*saved, out_idx)
        return out

    @staticmethod
    @once_differentiable  # saves gathered blocks and statistics: no exact second derivative
    def backward(ctx, grad_out):
        *saved, out_idx = ctx.saved_tensors
        channels, scatter, full, eps, backend = ctx.conf
        need_y, need_w, need_b = ctx.needs_input_grad[:3]
        grads = _bn_gate_backward(grad_out, saved, out_idx, channels, scatter, full, eps, backend,
                                  ctx.sink, need_y, need_w, need_b)
        return grads + (None,) * 9


class _TorchLayerStep(torch.autograd.Function):
    """The ``torch`` backend's whole training step of a layer with a fused BN, in eager mode: the
    compact conv of the selected block, BN and the gate as **one** autograd node (one Python
    forward and backward per layer instead of two: the step is host-bound on a GPU, see
    docs/benchmarks-gpu.md). The computation is :class:`compact._CompactConv2d`'s and
    :class:`_CompactBatchNormGate`'s, through the same helpers. Under ``torch.compile`` the two
    stay separate (the conv must be the opaque custom op there)."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, stats, in_idx, out_idx, conv, channels, momentum, eps,
                sink, scatter, slots):
        # conv: (stride, padding, dilation, groups, x_compact, in_scale)
        y_c, conv_saved, ctx.conv_kept = block_conv_forward(x, weight, bias, in_idx, out_idx, *conv)
        out, bn_saved, full = _bn_gate_forward(y_c, bn_weight, bn_bias, stats, out_idx, channels, momentum, eps,
                                               scatter, slots)
        ctx.save_for_backward(*conv_saved, *bn_saved, out_idx)
        ctx.conv_count = len(conv_saved)
        # One zero buffer for the weight's and the BN parameters' gradients where they share a dtype.
        ctx.shared_zeros = ((weight.shape, weight_grad_format(weight, conv[3]))
                            if weight.dtype == bn_weight.dtype == bn_bias.dtype else None)
        ctx.conf = (channels, scatter, full, eps)
        ctx.sink = sink  # not saved (see _UtilitySink)
        return out

    @staticmethod
    @once_differentiable  # saves gathered blocks and statistics: no exact second derivative
    def backward(ctx, grad_out):
        *saved, out_idx = ctx.saved_tensors
        conv_saved, bn_saved = saved[:ctx.conv_count], saved[ctx.conv_count:]
        channels, scatter, full, eps = ctx.conf
        need_x, need_w, need_b, need_bn_w, need_bn_b = ctx.needs_input_grad[:5]
        need_conv = need_x or need_w or need_b
        w_zeros = bn_zeros = None
        if (ctx.shared_zeros is not None and need_w and (need_bn_w or need_bn_b) and not full
                and block_scatters_weight_grad(conv_saved, ctx.conv_kept)):
            # Both gradients are scattered into zeros: one allocation and one fill for the two.
            w_shape, w_format = ctx.shared_zeros
            w_numel = w_shape.numel()
            zeros = grad_out.new_zeros(w_numel + 2 * channels, dtype=bn_saved[1].dtype)
            w_zeros = weight_layout_view(zeros[:w_numel], w_shape, w_format)
            bn_zeros = zeros[w_numel:].view(2, channels)
        grad_y_c, grad_bn_w, grad_bn_b = _bn_gate_backward(
            grad_out, bn_saved, out_idx, channels, scatter, full, eps, "torch", ctx.sink,
            need_conv, need_bn_w, need_bn_b, bn_zeros)
        grads = (None, None, None)
        if need_conv:
            grads = block_conv_backward(grad_y_c, conv_saved, ctx.conv_kept, need_x, need_w, need_b, w_zeros)
        return (*grads, grad_bn_w, grad_bn_b) + (None,) * 10


class _GateMask(torch.autograd.Function):
    """Reference gate (the paper's): ``out = a * mask``; the utility update sees ``g = grad * mask``."""

    @staticmethod
    def forward(ctx, a, mask, out_idx, utility, decay, track):
        ctx.track, ctx.decay = track, decay
        ctx.utility = utility  # not saved: see _CompactGate
        ctx.save_for_backward(a if track else None, mask, out_idx)
        return a * mask

    @staticmethod
    def backward(ctx, grad_out):
        a, mask, out_idx = ctx.saved_tensors
        g = grad_out * mask
        if ctx.track and not utility_updates_paused():
            v = channel_utility(a.detach(), g.detach(), backend="reference").index_select(0, out_idx)
            update_utilities(ctx.utility, v, out_idx, ctx.decay)
        return g, None, None, None, None, None


class _NormGate(torch.autograd.Function):
    """Identity on the output of a norm layer right after a prunable conv (``DCPConv2d.utility_at_norm``):
    the conv's utility update is measured here, as the gate after an owned BatchNorm measures it.
    Behind a GroupNorm the conv's own output would give none: the norm's output does not change when
    a sample's group is scaled or shifted, so the gradient at its input is orthogonal to each
    sample's group, and with one channel per group every ``sum_hw g * a`` is exactly zero."""

    @staticmethod
    def forward(ctx, a, sink):
        ctx.sink = sink  # not saved: see _CompactGate
        ctx.save_for_backward(a)
        # A copy, not a view: the norm's own forward may apply an in-place activation to its output
        # (timm's GroupNormAct), which autograd forbids on a custom Function's view output.
        return a.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (a,) = ctx.saved_tensors
        if not utility_updates_paused():
            v = reference.channel_utility(a.detach(), grad_out.detach(), mean=False)
            _record_utility(v * ctx.sink.slots, ctx.sink, None)
        return grad_out, None


def norm_gate(layer: Any, a: torch.Tensor) -> torch.Tensor:
    """``a`` (the output of the norm after ``layer``, full width) with ``layer``'s utility update
    attached to its backward, while training. Full width and masked by ``layer.selected``: no index
    vector, so no host read under static shapes."""
    if not (layer.training and torch.is_grad_enabled()):
        return a
    sink = _UtilitySink(layer.utility, layer.decay, getattr(layer, "_utility_updates", None), layer.selected)
    return _NormGate.apply(a, sink)


def batch_norm(bn: torch.nn.BatchNorm2d, y: torch.Tensor, out_idx: torch.Tensor, *, full: bool,
               slots: Slots | None = None) -> torch.Tensor:
    """``bn`` applied to ``y``, which holds either all channels (``full``) or only ``out_idx``, as
    an autograd-composed function (the reference path, eval mode, and BN without affine or gate).

    Running statistics of unselected channels are left untouched, whatever the layout (under
    capacity widths, ``slots``: the padding slots' too).
    """
    use_batch_stats = bn.training or bn.running_mean is None
    update_stats = bn.training and bn.track_running_stats
    factor = _momentum(bn) if update_stats else 0.0
    # Capacity padding slots count as unselected: every path below that writes back selectively.
    keeps_all = selects_all(out_idx, bn.num_features) and slots is None
    compact = not full and not keeps_all

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.index_select(0, out_idx) if (t is not None and compact) else t

    rm = rv = None
    if bn.running_mean is not None and (not bn.training or bn.track_running_stats):
        rm, rv = bn.running_mean, bn.running_var
        if compact:
            rm, rv = rm.index_select(0, out_idx), rv.index_select(0, out_idx)
        elif update_stats and not keeps_all:
            # Work on copies and write back only the selected entries below.
            rm, rv = rm.clone(), rv.clone()
    a = F.batch_norm(y, rm, rv, pick(bn.weight), pick(bn.bias), use_batch_stats, factor, bn.eps)
    if update_stats and not keeps_all:
        with torch.no_grad():
            if slots is not None:
                # rm, rv hold one entry per slot (compact) or per channel (out_idx = arange): the
                # padding slots keep their old values.
                rm = torch.where(slots.selected, rm, bn.running_mean.index_select(0, out_idx))
                rv = torch.where(slots.selected, rv, bn.running_var.index_select(0, out_idx))
                bn.running_mean.index_copy_(0, out_idx, rm)
                bn.running_var.index_copy_(0, out_idx, rv)
            elif compact:
                bn.running_mean.index_copy_(0, out_idx, rm)
                bn.running_var.index_copy_(0, out_idx, rv)
            else:
                bn.running_mean.index_copy_(0, out_idx, rm.index_select(0, out_idx))
                bn.running_var.index_copy_(0, out_idx, rv.index_select(0, out_idx))
    return a


def _momentum(bn: torch.nn.BatchNorm2d) -> float:
    """Counts the batch (as ``nn.BatchNorm2d`` does) and returns this update's averaging factor."""
    bn.num_batches_tracked.add_(1)
    # momentum=None is a cumulative average: its factor needs the count on the host (a sync, as in
    # nn.BatchNorm2d itself).
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def _fused_batch_norm_applies(bn: torch.nn.BatchNorm2d | None, track: bool) -> bool:
    """Training-mode affine BN (batch statistics), the utilities being tracked: the common training
    step, which :class:`_CompactBatchNormGate` fuses."""
    return bn is not None and track and bn.training and bn.affine


def layer_step(layer: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               padding: tuple[int, int], in_idx: torch.Tensor | None, out_idx: torch.Tensor | None,
               x_compact: bool, backend: str, in_scale: torch.Tensor | None = None,
               slots: Slots | None = None) -> torch.Tensor:
    """``gate(BN(conv(x)))`` of ``layer`` on ``backend`` (a resolved name), forward and backward.

    ``in_idx``/``out_idx``: the live input channels and the selected output channels (``None``: all;
    ``out_idx`` is ``None`` exactly when the layer is not prunable, and then there is no gate).
    ``x_compact``: ``x`` holds only the channels ``in_idx``.

    Capacity widths (docs/algorithm.md, "Static capacity widths"; ``torch`` only): ``in_idx`` and
    ``out_idx`` then have fixed lengths, padded with unselected channels; ``in_scale`` (1/0 per entry
    of ``in_idx``) zeroes the weight columns of the input padding, ``slots`` says which output slots
    are selected, and the padding outputs are exact zeros. Same results as the exact index vectors.
    """
    if (in_scale is not None or slots is not None) and backend != CAPACITY_BACKEND:
        raise RuntimeError(f"capacity widths run on backend 'torch', not {backend!r}")
    device = x.device
    if in_idx is None:
        in_idx = _all_channels(layer.in_channels, device)
    gated = out_idx is not None
    if not gated:
        out_idx = _all_channels(layer.out_channels, device)
    track = layer.training and gated and torch.is_grad_enabled() and not layer.utility_at_norm
    bn = layer.norm
    if backend == "reference":
        if x_compact:
            x = scatter_channels(x, in_idx, layer.in_channels)
        y = gathered_conv2d(
            x, weight, bias, in_idx, _all_channels(layer.out_channels, device), layer.stride, padding,
            layer.dilation, layer.groups, backend="reference", validate=False,
        )
        layer.last_output_hw = (y.shape[2], y.shape[3])
        a = y if bn is None else batch_norm(bn, y, out_idx, full=True)
        if not gated:
            return a
        mask = channel_mask(out_idx, layer.out_channels, a.dtype).view(1, -1, 1, 1)
        return _GateMask.apply(a, mask, out_idx, layer.utility, layer.decay, track)
    scatter = not layer.compact_output
    fused_bn = _fused_batch_norm_applies(bn, track)
    if fused_bn:
        stats = (bn.running_mean, bn.running_var) if bn.track_running_stats else None
        momentum = _momentum(bn) if stats is not None else 0.0
        if backend == "torch" and not torch.compiler.is_compiling():
            out = _TorchLayerStep.apply(
                x, weight, bias, bn.weight, bn.bias, stats, in_idx, out_idx,
                (layer.stride, padding, layer.dilation, layer.groups, x_compact, in_scale), layer.out_channels,
                momentum, bn.eps, _UtilitySink.of(layer, slots), scatter, slots,
            )
            layer.last_output_hw = (out.shape[2], out.shape[3])
            return out
    if in_scale is not None or slots is not None:
        y_c = compact_conv2d(x, weight, bias, in_idx, out_idx, layer.stride, padding, layer.dilation, layer.groups,
                             x_compact, in_scale)
    else:
        y_c = gathered_conv2d(
            x, weight, bias, in_idx, out_idx, layer.stride, padding, layer.dilation, layer.groups,
            backend=backend, layout="compact", input_layout="compact" if x_compact else "full", validate=False,
        )
    layer.last_output_hw = (y_c.shape[2], y_c.shape[3])
    if fused_bn:
        return _CompactBatchNormGate.apply(
            y_c, bn.weight, bn.bias, stats, out_idx, layer.out_channels, momentum, bn.eps,
            _UtilitySink.of(layer, slots), scatter, backend, slots,
        )
    a_c = y_c if bn is None else batch_norm(bn, y_c, out_idx, full=not gated, slots=slots)
    if not gated:
        return a_c
    if slots is not None:  # the padding slots' outputs: exact zeros, as the reference's gate makes them
        a_c = a_c * slots.scale.to(a_c.dtype).view(1, -1, 1, 1)
    return _CompactGate.apply(a_c, out_idx, layer.out_channels, _UtilitySink.of(layer, slots), track, scatter,
                              backend)


class _CountedBatchNormGate(torch.autograd.Function):
    """The static-shape form of :class:`_CompactBatchNormGate`: training-mode BN of the kept channels
    of the full-width conv output ``y`` and the gate, by the Triton kernels of
    ``ops/triton/batch_norm.py`` (two launches forward, three backward with the utility update).

    The unselected channels are neither normalised nor read: the output holds exact zeros there
    and their running statistics stay as they were; their BN parameter gradients are exactly 0. The
    selection is read on the device only (the ``kept`` pair), so the same launches with the same
    shapes run whatever is selected. Saves ``y`` and the batch statistics; the utility is reduced in
    the same pass as BN's backward sums.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, stats, kept, momentum, eps, sink):
        kernels = _triton_backend()
        out, mean, invstd = kernels.batch_norm_gate(y, weight, bias, stats, kept, momentum, eps)
        ctx.sink = sink  # not saved (see _UtilitySink)
        ctx.save_for_backward(y, weight, bias, mean, invstd, *kept)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, weight, bias, mean, invstd, *kept = ctx.saved_tensors
        kernels = _triton_backend()
        # The reduction writes the utility straight into the layer's row of the network-wide update
        # (every channel: 0 outside the selection), or it is applied here with one more launch.
        paused = utility_updates_paused()
        row = None if paused else ctx.sink.pending_row(full=True)
        grad_y, grad_w, grad_b, v = kernels.batch_norm_gate_backward(grad_out, y, weight, bias, mean, invstd,
                                                                      tuple(kept), utility_out=row)
        if row is None and not paused:
            kernels.update_utility_from(v, ctx.sink.utility, tuple(kept), ctx.sink.decay)
        need_w, need_b = ctx.needs_input_grad[1:3]
        return grad_y, (grad_w if need_w else None), (grad_b if need_b else None), *(None,) * 5


class _CountedGate(torch.autograd.Function):
    """The static-shape gate without a fused BN: ``out = a * mask`` on full-width ``a``; backward, when
    tracking, updates the selected channels' utilities from ``a`` and ``g = grad * mask``."""

    @staticmethod
    def forward(ctx, a, mask, kept, utility, decay, track):
        ctx.track, ctx.decay = track, decay
        ctx.utility = utility  # not saved: see _CompactGate
        ctx.save_for_backward(a if track else None, mask, *kept)
        return a * mask.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad_out):
        a, mask, *kept = ctx.saved_tensors
        g = grad_out * mask.view(1, -1, 1, 1)
        if ctx.track and not utility_updates_paused():
            _triton_backend().update_utility_counted(a, g, utility=ctx.utility, kept=tuple(kept), decay=ctx.decay)
        return g, None, None, None, None, None


def _masked_batch_norm(bn: torch.nn.BatchNorm2d, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``bn`` on the full-width ``y``, the running statistics of the ``mask`` channels only updated
    (static shapes: a masked write-back instead of an index copy)."""
    update_stats = bn.training and bn.track_running_stats
    if not update_stats:
        return bn(y)
    factor = _momentum(bn)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    a = F.batch_norm(y, rm, rv, bn.weight, bn.bias, True, factor, bn.eps)
    with torch.no_grad():
        torch.where(mask, rm, bn.running_mean, out=bn.running_mean)
        torch.where(mask, rv, bn.running_var, out=bn.running_var)
    return a


def counted_layer_step(layer: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       padding: tuple[int, int], in_kept: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``gate(BN(conv(x)))`` of ``layer`` as a static-shape step on the Triton kernels.

    ``x`` is full width; ``in_kept`` the input source's ``(order, count)`` and the layer's own
    selection is its ``selected`` mask and ``kept()`` pair (rule.kept_first). Every tensor is full
    width (zeros outside the kept channels), every launch and shape is the same whatever is
    selected, and nothing is read on the host: the step a CUDA graph can capture.
    """
    gated = layer.prunable
    out_kept = layer.kept() if gated else _all_kept(layer.out_channels, x.device)
    y = _triton_backend().counted_conv2d(
        x, weight, bias, in_kept, out_kept, layer.stride, padding, layer.dilation, layer.groups > 1)
    layer.last_output_hw = (y.shape[2], y.shape[3])
    bn = layer.norm
    if not gated:
        return y if bn is None else bn(y)
    track = layer.training and torch.is_grad_enabled() and not layer.utility_at_norm
    mask = layer.selected
    if _fused_batch_norm_applies(bn, track):
        stats = (bn.running_mean, bn.running_var) if bn.track_running_stats else None
        momentum = _momentum(bn) if stats is not None else 0.0
        return _CountedBatchNormGate.apply(y, bn.weight, bn.bias, stats, out_kept, momentum, bn.eps,
                                           _UtilitySink.of(layer))
    a = y if bn is None else _masked_batch_norm(bn, y, mask)
    return _CountedGate.apply(a, mask, out_kept, layer.utility, layer.decay, track)


_ARANGE_CACHE: dict[tuple[int, torch.device], torch.Tensor] = {}
_ALL_KEPT_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _all_kept(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, count)`` of a selection of all ``n`` channels (rule.kept_first), one per (n, device)."""
    key = (n, device)
    kept = _ALL_KEPT_CACHE.get(key)
    if kept is None:
        kept = _ALL_KEPT_CACHE[key] = (torch.arange(n, device=device),
                                      torch.full((1,), n, dtype=torch.int32, device=device))
    return kept


def _all_channels(n: int, device: torch.device) -> torch.Tensor:
    """``arange(n)`` on ``device``, one shared tensor per (n, device)."""
    key = (n, device)
    idx = _ARANGE_CACHE.get(key)
    if idx is None:
        idx = _ARANGE_CACHE[key] = torch.arange(n, device=device)
    return idx
