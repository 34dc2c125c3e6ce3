"""Cut the unselected channels out for good: an ordinary, physically smaller ``nn.Module``."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from .graph.optable import is_norm_like, registered_kind
from .modules import ConcatSource, DCPConv2d, DCPLinear, DCPTokenLinear
from .norms import DCPGlobalResponseNorm, DCPGroupNorm
from .ops.compact import selects_all
from .plan import set_submodule

if TYPE_CHECKING:  # pragma: no cover
    from .propagation import Propagation


def _kept(source) -> torch.Tensor | None:
    """Indices a layer keeps: its own selection, or its input source's (None: all)."""
    if source is None or not source.prunable:
        return None
    idx = source.selected_indices()
    return None if selects_all(idx, source.out_channels) else idx


def _plain_conv(layer: DCPConv2d, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` holding the kept rows/columns of ``layer``'s weight. For a depthwise
    conv ``in_keep`` and ``out_keep`` are the same channels (channel c reads only channel c); a
    grouped conv stays grouped (same ``groups``), each kept output keeping the columns of the kept
    inputs of its own group. A conv subclass with its own forward (:attr:`DCPConv2d.own_forward`)
    stays of its class when its forward only pads; a weight-transforming one becomes an
    ``nn.Conv2d`` holding the kept block of its transformed weight."""
    depthwise = layer.depthwise
    if depthwise and in_keep is not None and out_keep is not None and not torch.equal(in_keep, out_keep):
        raise ValueError(f"{layer}: a depthwise conv keeps the same input and output channels")
    own = layer.own_forward
    if own is not None and in_keep is None and out_keep is None:
        return own.copy_with(layer, layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                             layer.groups, share=True)
    if in_keep is None and out_keep is None:
        # Nothing cut: keep the (copied) Parameter objects themselves, so parameters tied between
        # layers stay tied in the finalized model.
        conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
        conv.weight, conv.bias = layer.weight, layer.bias
        conv.train(layer.training)
        return conv
    if own is not None and own.transforms_weight:
        # Weight standardization is over all of a filter's inputs: the kept block of the transformed
        # weight is baked into an ordinary conv (the same outputs; the transform itself cannot be
        # kept, as standardizing the kept block alone gives other weights).
        weight, bias = own.weight_and_bias(layer)
    else:
        weight = layer.weight.detach()
        bias = None if layer.bias is None else layer.bias.detach()
    if out_keep is not None:
        weight = weight.index_select(0, out_keep)
        bias = None if bias is None else bias.index_select(0, out_keep)
    groups = layer.groups
    if in_keep is not None and layer.grouped:
        rows = out_keep if out_keep is not None else torch.arange(layer.out_channels, device=weight.device)
        # The kept inputs' positions within their group, one row of the table per group (equal
        # counts per group), picked for each kept output by its group.
        local = torch.remainder(in_keep, layer.in_channels // groups).view(groups, -1)
        columns = local.index_select(0, torch.div(rows, layer.out_channels // groups, rounding_mode="floor"))
        weight = weight.gather(1, columns.view(*columns.shape, 1, 1).expand(-1, -1, *weight.shape[2:]))
    elif in_keep is not None and not depthwise:
        weight = weight.index_select(1, in_keep)
    if depthwise:
        groups = weight.shape[0]
    if own is not None and not own.transforms_weight:  # run-time padding: keep the module's class and forward
        conv = own.copy_with(layer, weight, bias, groups)
    else:
        conv = nn.Conv2d(
            weight.shape[1] * groups, weight.shape[0], layer.kernel_size, layer.stride, layer.padding,
            layer.dilation, groups, bias is not None, layer.padding_mode,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        conv.weight.requires_grad_(layer.weight.requires_grad)
    if layer.weight.dim() == 4 and not layer.weight.is_contiguous() and layer.weight.is_contiguous(
            memory_format=torch.channels_last):
        # Keep the trained weights' memory format: a channels_last model stays one (cuDNN's fast
        # NHWC kernels; an NCHW weight among NHWC activations costs a layout conversion per conv).
        conv.to(memory_format=torch.channels_last)
    conv.train(layer.training)
    return conv


def _plain_norm(bn: nn.BatchNorm2d, keep: torch.Tensor | None) -> nn.BatchNorm2d:
    if keep is None:
        return bn
    new = nn.BatchNorm2d(
        keep.numel(), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
        device=keep.device if bn.weight is None else bn.weight.device,
        dtype=None if bn.weight is None else bn.weight.dtype,
    )
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            old = getattr(bn, name)
            if old is not None:
                getattr(new, name).copy_(old.index_select(0, keep))
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def _cut_per_channel(module: nn.Module, keep: torch.Tensor, channels: int) -> None:
    """Cut, in place, every parameter and buffer of a per-channel module (a norm layer of any class:
    timm's BatchNormAct2d, SyncBatchNorm, FrozenBatchNorm2d, a registered one) whose first dimension
    is the channel count; the module keeps its class and forward."""
    with torch.no_grad():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() >= 1 and param.shape[0] == channels:
                setattr(module, name, nn.Parameter(param.index_select(0, keep).clone(),
                                                   requires_grad=param.requires_grad))
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.dim() >= 1 and buf.shape[0] == channels:
                module._buffers[name] = buf.index_select(0, keep).clone()
    if getattr(module, "num_features", None) == channels:
        module.num_features = int(keep.numel())


def _plain_linear(linear: DCPLinear) -> nn.Linear:
    columns = linear.selected_features()
    weight = linear.weight.detach() if columns is None else linear.weight.detach().index_select(1, columns)
    new = nn.Linear(weight.shape[1], linear.out_features, linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    new.train(linear.training)
    return new


def _plain_token_linear(layer: DCPTokenLinear) -> nn.Linear:
    """The ``nn.Linear`` a :class:`DCPTokenLinear` stands for, with its kept output and input features."""
    conv = _plain_conv(layer, _kept(layer.input_source), _kept(layer) if layer.prunable else None)
    linear = nn.Linear(conv.in_channels, conv.out_channels, conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, conv.in_channels),
                                 requires_grad=layer.weight.requires_grad)
    linear.bias = conv.bias
    linear.train(layer.training)
    return linear


def finalize(prop: "Propagation") -> nn.Module:
    """Return a copy of the converted model with the unselected channels removed.

    The channels kept are the current selection: the one the last training steps used and the
    converted model evaluates with. While still exploring (everything selected), a selection is
    made from the current utilities first and written into the converted model. Either way
    ``model.eval()`` and the returned module compute the same function. The copy contains no
    ``dcp_kernels`` classes and no DCP hooks: every ``DCPConv2d`` becomes an ``nn.Conv2d`` (its
    BatchNorm goes back to its original place, sliced), every ``DCPLinear`` and ``DCPTokenLinear`` an
    ``nn.Linear``, and
    the BatchNorms and depthwise convs inside a pruned group are cut to its kept channels.
    """
    model = prop.model
    if model is None or prop.plan is None:
        raise RuntimeError("finalize() needs a Propagation made by convert(model)")
    if prop.exploring or all(bool(layer.selected.all()) for layer in prop.layers):
        prop.select(force=True)
    with prop.without_hook():
        plain = copy.deepcopy(model)
    plain.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)  # names of DCP buffers the copy no longer has
    plan = prop.plan
    modules = dict(plain.named_modules())
    layers = {n: m for n, m in modules.items() if isinstance(m, DCPConv2d)}
    for name, module in modules.items():
        channel_keep = None
        if name in plan.channelwise:  # the same segment arithmetic the readers of a concat use
            segments = [(None if p is None else layers[p], width) for p, width in plan.channelwise[name]]
            channel_keep = ConcatSource(segments).selected_indices()
        if isinstance(module, DCPTokenLinear):
            set_submodule(plain, name, _plain_token_linear(module))
        elif isinstance(module, DCPConv2d):
            out_keep = _kept(module) if module.prunable else channel_keep
            in_keep = channel_keep if module.depthwise else _kept(module.input_source)
            set_submodule(plain, name, _plain_conv(module, in_keep, out_keep))
            if module.norm is not None:
                home = plan.norm_homes.get(name)
                if home is None:
                    raise RuntimeError(f"{module._label()} owns a BatchNorm but convert() recorded no place for it")
                set_submodule(plain, home, _plain_norm(module.norm, out_keep))
        elif isinstance(module, DCPLinear):
            set_submodule(plain, name, _plain_linear(module))
        elif isinstance(module, (DCPGroupNorm, DCPGlobalResponseNorm)):  # only inside a pruned group
            set_submodule(plain, name, module.plain(channel_keep))
        elif channel_keep is not None:
            if type(module) is nn.BatchNorm2d:
                set_submodule(plain, name, _plain_norm(module, channel_keep))
            elif is_norm_like(module) or registered_kind(module) == "per_channel":
                channels = sum(width for _, width in plan.channelwise[name])
                _cut_per_channel(module, channel_keep, channels)
            else:  # depthwise convs inside a group are DCPConv2d (above)
                raise RuntimeError(f"finalize: {name!r} ({type(module).__name__}) holds pruned channels "
                                   "but DCP does not know how to cut it")
    return plain
