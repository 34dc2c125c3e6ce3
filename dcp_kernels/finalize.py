"""Cut the unselected channels out for good: an ordinary, physically smaller ``nn.Module``."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from .convert import _set_submodule
from .modules import DCPConv2d

if TYPE_CHECKING:  # pragma: no cover
    from .propagation import Propagation


def _kept(layer: DCPConv2d | None) -> torch.Tensor | None:
    return None if layer is None or not layer.prunable else layer.selected.nonzero().squeeze(1)


def _plain_conv(layer: DCPConv2d, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> nn.Conv2d:
    if layer.groups != 1 and (in_keep is not None or out_keep is not None):
        raise NotImplementedError(f"{layer._label()}: cutting channels of a depthwise conv is not supported yet")
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    if out_keep is not None:
        weight = weight.index_select(0, out_keep)
        bias = None if bias is None else bias.index_select(0, out_keep)
    if in_keep is not None:
        weight = weight.index_select(1, in_keep)
    conv = nn.Conv2d(
        weight.shape[1] * layer.groups, weight.shape[0], layer.kernel_size, layer.stride, layer.padding,
        layer.dilation, layer.groups, bias is not None, layer.padding_mode,
        device=weight.device, dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    conv.weight.requires_grad_(layer.weight.requires_grad)
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


def _plain_linear(linear: nn.Linear, keep: torch.Tensor, block: int) -> nn.Linear:
    columns = (keep.unsqueeze(1) * block + torch.arange(block, device=keep.device)).flatten()
    new = nn.Linear(columns.numel(), linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight.index_select(1, columns))
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    new.train(linear.training)
    return new


def finalize(prop: "Propagation") -> nn.Module:
    """Return a copy of the converted model with the unselected channels removed.

    The channels kept are the current selection: the one the last training steps used and the
    converted model evaluates with. While still exploring (everything selected), a selection is
    made from the current utilities first and written into the converted model. Either way
    ``model.eval()`` and the returned module compute the same function. The copy contains no
    ``dcp_kernels`` classes and no DCP hooks: every DCPConv2d becomes an ``nn.Conv2d`` and its
    BatchNorm goes back to its original place, sliced.
    """
    model = prop.model
    if model is None or prop.plan is None:
        raise RuntimeError("finalize() needs a Propagation made by convert(model)")
    if prop.exploring or all(bool(layer.selected.all()) for layer in prop.layers):
        prop.select(force=True)
    with prop.without_hook():
        plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if not isinstance(module, DCPConv2d):
            continue
        out_keep = _kept(module)
        in_keep = _kept(module.input_source)
        _set_submodule(plain, name, _plain_conv(module, in_keep, out_keep))
        if module.norm is not None:
            norm = _plain_norm(module.norm, out_keep)
            home = prop.plan.norm_homes.get(name)
            if home is None:
                raise RuntimeError(f"{module._label()} owns a BatchNorm but convert() recorded no place for it")
            _set_submodule(plain, home, norm)
        for reader, kind, block in prop.plan.consumers.get(name, []):
            if kind == "linear" and out_keep is not None:
                _set_submodule(plain, reader, _plain_linear(plain.get_submodule(reader), out_keep, block))
    return plain
