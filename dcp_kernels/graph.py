"""Which conv output channels can be pruned, and who reads them: found by tracing, not hand-coded.

A conv's output channels are prunable when every path from its (BatchNorm-ed) output goes
through operations that map a zero channel to a zero channel (ReLU-like activations, pooling,
dropout, flatten) and ends in a reader that can skip the channel: a ``groups=1`` conv, or a
``Linear`` after flattening. Any other use (a residual add, a concat, a multiply, the model
output, an unknown op) leaves the conv dense, with the reason recorded. This is what makes
ResNets come out as the paper prunes them: only channels not summed into a residual.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

# Operations f with f(0) == 0 channel-wise, that keep the (N, C, H, W) channel layout.
_ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Tanh,
    nn.Dropout, nn.Dropout2d, nn.Identity,
)
_ZERO_PRESERVING_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ZERO_PRESERVING_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish,
    F.mish, torch.tanh, F.dropout, F.dropout2d,
}
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous"}


@dataclass
class ChannelAnalysis:
    """The result of :func:`analyze`.

    ``convs``: every conv that ``DCPConv2d`` supports, in registration order.
    ``producers``: prunable conv name -> name of the BatchNorm it owns (or None: gate after conv).
    ``consumers``: prunable conv name -> [(reader name, "conv" | "linear", features per channel)].
    ``skipped``: conv name -> why its outputs stay dense.
    ``coupled``: the skipped convs whose channels are combined with other tensors (residual sums,
    concats, products): dense by design in this version, as the paper keeps residual channels dense.
    """

    convs: list[str] = field(default_factory=list)
    producers: dict[str, str | None] = field(default_factory=dict)
    consumers: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    coupled: set[str] = field(default_factory=set)


def trace(model: nn.Module) -> fx.Graph:
    try:
        return fx.Tracer().trace(model)
    except Exception as exc:  # fx raises many types; name the model and the cause
        raise TypeError(
            f"convert() could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}). "
            "Models with data-dependent control flow are not supported yet."
        ) from exc


def analyze(model: nn.Module) -> ChannelAnalysis:
    """Trace ``model`` and decide, for every conv, whether its outputs are prunable."""
    graph = trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    result = ChannelAnalysis()
    for name, module in model.named_modules():
        if type(module) is not nn.Conv2d:
            continue
        if module.groups != 1 and not (module.groups == module.in_channels == module.out_channels):
            result.skipped[name] = f"grouped conv (groups={module.groups}) is not supported yet"
            continue
        result.convs.append(name)
    conv_set = set(result.convs)
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in conv_set:
            continue
        name = node.target
        conv = modules[name]
        if calls[name] > 1:
            result.skipped[name] = "module is called more than once (shared weights)"
            continue
        if conv.groups != 1:
            result.skipped[name] = "depthwise conv: its input and output channels are coupled (not supported yet)"
            continue
        tail, bn_name = node, None
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            bn = modules[users[0].target]
            if type(bn) is nn.BatchNorm2d and bn.num_features == conv.out_channels and calls[users[0].target] == 1:
                tail, bn_name = users[0], users[0].target
        readers, reason, coupled = _readers(tail, conv.out_channels, modules, calls, conv_set)
        if reason is not None:
            result.skipped[name] = reason
            if coupled:
                result.coupled.add(name)
            continue
        result.producers[name] = bn_name
        result.consumers[name] = readers
    return result


def _readers(start: fx.Node, channels: int, modules, calls, conv_set) -> tuple[list[tuple[str, str, int]], str | None, bool]:
    """Follow zero-preserving ops from ``start``.

    Returns (readers, None, False), or ([], reason to stay dense, whether the reason is that the
    channels are combined with other tensors).
    """
    readers: list[tuple[str, str, int]] = []
    frontier = [(start, False)]  # (node, flattened?)
    seen: set[fx.Node] = set()
    while frontier:
        node, flat = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if _is_shape_query(user):
                continue
            if _tensor_args(user) != [node] or user.args[:1] != (node,):
                return [], f"its output is combined with other tensors in {_describe(user)}", True
            step = _classify(user, flat, channels, modules, calls, conv_set)
            if isinstance(step, str):
                return [], step, False
            kind, payload = step
            if kind == "pass":
                frontier.append((user, payload))
            else:
                readers.append((user.target, kind, payload))
    if not readers:
        return [], "no conv or linear layer reads its output", False
    return readers, None, False


def _classify(user: fx.Node, flat: bool, channels: int, modules, calls, conv_set):
    if user.op == "call_module":
        mod = modules[user.target]
        if isinstance(mod, _ZERO_PRESERVING_MODULES):
            return ("pass", flat)
        if isinstance(mod, _ZERO_PRESERVING_POOLS) and not flat:
            return ("pass", flat)
        if isinstance(mod, nn.Flatten) and not flat and mod.start_dim == 1 and mod.end_dim == -1:
            return ("pass", True)
        if type(mod) is nn.Conv2d and not flat:
            if user.target not in conv_set or mod.groups != 1:
                return f"read by {user.target!r}, a conv that cannot skip input channels (groups={mod.groups})"
            if calls[user.target] > 1:
                return f"read by {user.target!r}, which is called more than once"
            return ("conv", 1)
        if type(mod) is nn.Linear and flat:
            if mod.in_features % channels:
                return f"read by {user.target!r} whose {mod.in_features} features are not a multiple of {channels}"
            if calls[user.target] > 1:
                return f"read by {user.target!r}, which is called more than once"
            return ("linear", mod.in_features // channels)
        return f"read by {user.target!r} ({type(mod).__name__}), which DCP does not understand yet"
    if user.op == "call_function":
        if user.target in _ZERO_PRESERVING_FUNCTIONS:
            return ("pass", flat)
        if user.target in _POOL_FUNCTIONS and not flat:
            return ("pass", flat)
        if user.target is torch.flatten and not flat and _flatten_from_dim1(user.args[1:], user.kwargs):
            return ("pass", True)
    if user.op == "call_method":
        if user.target in _ZERO_PRESERVING_METHODS:
            return ("pass", flat)
        if user.target == "flatten" and not flat and _flatten_from_dim1(user.args[1:], user.kwargs):
            return ("pass", True)
        if user.target in ("view", "reshape") and not flat and _is_batch_flatten(user.args[1:]):
            return ("pass", True)
    return f"its output goes to {_describe(user)}, which DCP does not understand yet"


def _flatten_from_dim1(args, kwargs) -> bool:
    start = args[0] if args else kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _is_batch_flatten(shape_args) -> bool:
    """``x.view(x.size(0), -1)`` or ``x.view(-1, K)``: one flat feature vector per sample."""
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args = tuple(shape_args[0])
    if len(shape_args) != 2:
        return False
    first, second = shape_args
    batch_size = isinstance(first, fx.Node) and _is_shape_query(first) and (
        (first.op == "call_method" and first.args[1:] == (0,))
        or (first.op == "call_function" and first.target is operator.getitem and first.args[1] == 0)
    )
    return (batch_size and second == -1) or (first == -1 and isinstance(second, int))


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return True
    if node.op == "call_function" and node.target is operator.getitem:
        parent = node.args[0]
        return isinstance(parent, fx.Node) and _is_shape_query(parent)
    return False


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if not _is_shape_query(n) else None)
    return found


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target!r}"
