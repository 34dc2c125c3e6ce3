"""Which operations do what to channels: the tables the channel analysis reads.

Element-wise ops carry a channel space unchanged, sums and products merge spaces, spatial
reductions and flattens lead to readers; the small node helpers here answer those questions for one
traced node. Extending what convert() understands starts here.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

# Element-wise (per channel) modules, functions and tensor methods without per-channel parameters.
# They work on any channel count, so a compact tensor (only the selected channels) passes through.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish,
    nn.Tanh, nn.Hardtanh, nn.Sigmoid, nn.Hardsigmoid, nn.LogSigmoid, nn.Softplus, nn.Softsign,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    # Spatial padding (of H and W: channels are dim 1 of the 4-D tensors these modules pad).
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.hardswish, F.mish, torch.tanh, F.hardtanh, torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus,
    F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    F.interpolate,
}
# What works on every feature alone whatever the layout: features on the last dimension (tokens,
# produced by a Linear) pass only these (no pooling, no Dropout2d: they read dims 1 to 3 as N, C, H, W).
_POINTWISE_MODULES = tuple(m for m in _ELEMENTWISE_MODULES if m not in (
    nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d, nn.CircularPad2d))
_POINTWISE_FUNCTIONS = _ELEMENTWISE_FUNCTIONS - {
    F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "contiguous", "clone", "float", "to",
}
# Reductions over H and W keep one value per channel.
_SPATIAL_REDUCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax"}
_SUMS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_PRODUCTS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div}
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
_SUM_METHODS = {"add", "add_", "sub", "sub_"}
_PRODUCT_METHODS = {"mul", "mul_", "div", "div_"}


def _pads_spatially(args, kwargs) -> bool:
    """``F.pad`` of a 4-D tensor's H and W only (at most 4 pad values): channel-wise."""
    pad = args[1] if len(args) > 1 else kwargs.get("pad")
    return isinstance(pad, (tuple, list)) and len(pad) <= 4


def _stochastic_depth_functions() -> set:
    try:  # torchvision wraps it for fx, so it appears as one call in the trace
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is optional
        return set()
    return {stochastic_depth}


# ----------------------------------------------------------------------------- the user registry
CHANNEL_KINDS = ("elementwise", "per_channel", "mixing")
"""What a registered module type or function does to the channel dimension:

* ``elementwise``: works on each channel alone and has no per-channel state (an activation, a
  pooling): a compact tensor passes through it;
* ``per_channel``: works on each channel alone with per-channel parameters or buffers whose first
  dimension is the channel count (a norm layer): the group it sits in stays full width, and
  ``finalize()`` cuts those tensors to the kept channels;
* ``mixing``: mixes channels (or DCP must not look inside): channels reaching it stay dense.
"""
_REGISTRY: dict[Any, str] = {}


def register(target: Any, kind: str) -> None:
    """Tell ``convert()`` what a module type or a function does to channels (see :data:`CHANNEL_KINDS`).

    A registered module type (subclasses included) is traced as one call, not entered. Example::

        dcp_kernels.register(MyScaledAct, "elementwise")
        dcp_kernels.register(MyNorm, "per_channel")
        dcp_kernels.register(my_channel_shuffle, "mixing")
    """
    if kind not in CHANNEL_KINDS:
        raise ValueError(f"register: kind must be one of {', '.join(CHANNEL_KINDS)}, got {kind!r}")
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"register: {target.__name__} is a class but not an nn.Module subclass")
        if issubclass(target, nn.Conv2d):
            raise ValueError(f"register: {target.__name__} is a conv; convs are DCP's own business, "
                             "register the channel-wise modules around them instead")
    elif not callable(target):
        raise TypeError(f"register: expected an nn.Module subclass or a function, got {type(target).__name__}")
    elif kind == "per_channel":
        raise ValueError("register: a function cannot be 'per_channel' (finalize() could not cut the tensors it "
                         "is called with); register the module that owns them instead")
    _REGISTRY[target] = kind


def unregister(target: Any) -> None:
    """Forget a registration (no error when there is none)."""
    _REGISTRY.pop(target, None)


def registered_kind(target: Any) -> str | None:
    """The registered kind of a module (by its type, most specific first) or function."""
    if isinstance(target, nn.Module):
        for cls in type(target).__mro__:
            if cls in _REGISTRY:
                return _REGISTRY[cls]
        return None
    try:
        return _REGISTRY.get(target)
    except TypeError:  # unhashable
        return None


def is_norm_like(module: nn.Module) -> bool:
    """Batch norm however it is written: ``nn.BatchNorm2d`` and its subclasses with their own forward
    (timm's ``BatchNormAct2d``: norm + activation), ``SyncBatchNorm``, any ``_BatchNorm``, and
    ``FrozenBatchNorm2d`` (torchvision, detection backbones: per-channel buffers, no module base)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return type(module).__name__ == "FrozenBatchNorm2d" and all(
        isinstance(getattr(module, n, None), torch.Tensor) for n in ("weight", "bias", "running_mean", "running_var"))


# ConvNeXt V2's Global Response Norm, recognised by class: timm's and transformers' (dcp_kernels.norms).
GRN_CLASS_NAMES = ("GlobalResponseNorm", "ConvNextV2GRN")


def is_grn(module: nn.Module) -> bool:
    """A Global Response Norm layer (ConvNeXt V2) of a known class."""
    return type(module).__name__ in GRN_CLASS_NAMES


def traced_as_one_call(module: nn.Module) -> bool:
    """Modules the trace calls as a whole (fx leaves) beyond torch.nn's own: convs, batch and group
    norm layers however written, GRN layers, and every registered type."""
    return (isinstance(module, (nn.Conv2d, nn.GroupNorm)) or is_norm_like(module) or is_grn(module)
            or registered_kind(module) is not None)


def conv_refusal(module: nn.Conv2d) -> str | None:
    """Why ``DCPConv2d`` cannot stand in for this conv (None: it can): :func:`dcp_kernels.conv_forward.conv_refusal`."""
    from ..conv_forward import conv_refusal as refusal  # runtime code; the graph package stays below it

    return refusal(module)


def supported_conv(module: nn.Module) -> bool:
    """Convs ``DCPConv2d`` can stand in for (:func:`conv_refusal`)."""
    return isinstance(module, nn.Conv2d) and conv_refusal(module) is None


def is_depthwise(conv: nn.Conv2d) -> bool:
    """Depthwise (``groups == in_channels == out_channels > 1``): channel ``c`` reads only channel
    ``c``, so the conv follows its input's channels instead of starting a channel space."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _flatten_from_dim1(args, kwargs) -> bool:
    start = args[0] if args else kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _shape_pair(shape_args) -> tuple | None:
    """The two sizes of ``view(a, b)`` / ``view((a, b))``, or None for another arity."""
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args = tuple(shape_args[0])
    return tuple(shape_args) if len(shape_args) == 2 else None


def _is_batch_flatten(shape_args) -> bool:
    """``x.view(x.size(0), -1)`` or ``x.view(-1, K)``: one flat feature vector per sample."""
    pair = _shape_pair(shape_args)
    if pair is None:
        return False
    first, second = pair
    batch_size = isinstance(first, fx.Node) and _is_shape_query(first) and (
        (first.op == "call_method" and first.args[1:] == (0,))
        or (first.op == "call_function" and first.target is operator.getitem and first.args[1] == 0)
    )
    return (batch_size and second == -1) or (first == -1 and isinstance(second, int))


def _fixes_feature_count(shape_args) -> bool:
    """A per-sample flatten to a feature count given as a number (``view(-1, 4096)``,
    ``view(x.size(0), 4096)``): the model then runs only at that width, so the channels before it
    cannot be cut. In a recorded graph (record.py) every size is a number, a computed one too; only
    ``-1`` shows that the count was left to the tensor, so there a number is taken as fixed."""
    pair = _shape_pair(shape_args)
    return pair is not None and isinstance(pair[1], int) and pair[1] != -1


def _flattens_per_sample(node: fx.Node) -> bool:
    """A view/reshape from (N, C, H, W) to (N, C*H*W), read off the recorded shapes."""
    before, after = _shape(node.args[0]), _shape(node)
    return (before is not None and after is not None and len(before) == 4 and len(after) == 2
            and after[0] == before[0] and after[1] == math.prod(before[1:]))


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:] in (("shape",), ("ndim",)):
        return True
    if node.op == "call_function" and node.target is operator.getitem:
        parent = node.args[0]
        return isinstance(parent, fx.Node) and _is_shape_query(parent)
    return False


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target!r}"
