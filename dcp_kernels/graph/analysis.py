"""The channel dependency analysis: which conv output channels can be pruned, and who reads them.

Found by tracing the model with ``torch.fx`` and propagating tensor shapes through the trace
(``ShapeProp`` on a small example input), not hand-coded per architecture.

Every conv output (except a depthwise conv's) starts a *channel space*. Channel-wise operations
carry a space on unchanged: activations, pooling, dropout, BatchNorm, depthwise convs,
multiplication by a per-sample scalar (stochastic depth), spatial means. An element-wise sum or product of two tensors
merges their spaces (a residual sum, a squeeze-excitation scale): merged spaces are *coupled* and
form one **group**, selected or dropped channel by channel as a whole (its utility is the mean of
its producers' utilities, see ``docs/algorithm.md``). A concat along channels makes a tensor whose
channels are segments of several spaces. *Readers* skip the unselected channels of what they read:
convs and ``Linear`` layers after a flatten. A ``Linear`` applied to tokens (an input of three or
more dimensions, features last: ConvNeXt's and the transformers' MLPs) starts a space on the *last*
dimension; only point-wise ops (activations, dropout), sums and products with its kind, and
``Linear`` readers may follow it. A grouped conv (``1 < groups``, not depthwise) reads and
writes spaces made of ``groups`` equal *blocks*: its group keeps equal counts per block, so the
finalized conv is an ordinary smaller grouped conv (``docs/algorithm.md``, "Grouped convolutions").
Anything else a space reaches (the model output, an unknown op, a parameter it is multiplied with)
keeps that group dense, with the reason recorded.

Unselected channels need not hold zeros: every path from them ends in a reader that skips them,
and channel-wise operations never mix channels. So a group stays correct through BatchNorm over a
concat (DenseNet) or a sigmoid-scaled product (squeeze-excitation), and ``finalize()`` can cut
exactly the coupled tensors the analysis recorded.
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .optable import (
    _ELEMENTWISE_FUNCTIONS,
    _ELEMENTWISE_METHODS,
    _ELEMENTWISE_MODULES,
    _POINTWISE_FUNCTIONS,
    _POINTWISE_MODULES,
    _PRODUCT_METHODS,
    _PRODUCTS,
    _SPATIAL_REDUCTIONS,
    _SUM_METHODS,
    _SUMS,
    _describe,
    _fixes_feature_count,
    _flatten_from_dim1,
    _flattens_per_sample,
    _is_batch_flatten,
    _is_shape_query,
    _shape,
    _pads_spatially,
    _stochastic_depth_functions,
    conv_refusal,
    is_depthwise,
    is_grn,
    is_norm_like,
    registered_kind,
    supported_conv,
)
from ..norms import grn_refusal, group_norm_refusal
from .record import _drop_dead_ends, _propagate_shapes, _record_any, trace


_DIVISIONS = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}


@dataclass(frozen=True)
class Segment:
    """``width`` consecutive channels of a tensor: the channels of group ``group`` (an index into
    :attr:`ChannelAnalysis.groups`), or channels that stay dense (``group is None``)."""

    group: int | None
    width: int


@dataclass
class Group:
    """Coupled output channels that share one selection.

    ``producers``: the convs whose outputs are these channels (several when summed or multiplied).
    ``norms``: producer -> the BatchNorm right after it, which moves into its ``DCPConv2d``.
    ``residual``: formed by a sum (a residual connection).
    ``compact``: the channels can travel compact (only the selected ones) from every producer to
    every reader: only ops that work at any width in between (element-wise ops, sums and products
    of members, which share one index vector, spatial reductions), and readers that read the group
    alone (convs, a Linear after a flatten).
    ``blocks``: the equal blocks the channels form for the grouped convs that read or write them
    (the least common multiple of their ``groups``; 1: none): the group keeps equal counts per block.
    """

    producers: list[str]
    channels: int
    norms: dict[str, str] = field(default_factory=dict)
    residual: bool = False
    compact: bool = False
    blocks: int = 1


@dataclass
class ChannelAnalysis:
    """The result of :func:`analyze`.

    ``convs``: every conv ``DCPConv2d`` supports (groups=1 or depthwise), in registration order.
    ``groups``: the prunable groups.
    ``conv_inputs``: reader conv -> the segments of its input (only readers of a prunable group).
    ``linear_inputs``: reader Linear -> (segments of the flattened channels, features per channel).
    ``token_linears``: the Linear layers that produce a prunable group's features on the last dimension
    (they read ``conv_inputs`` like convs when they also read one).
    ``dense_linears``: Linear layers on tokens whose output features stay dense -> why.
    ``channelwise``: module with per-channel parameters inside a prunable group (a BatchNorm not
    owned by a producer, a depthwise conv, a GroupNorm or GRN) -> the segments of its channels;
    ``finalize`` slices it. ``grn_layouts``: GRN layer among them -> its channel dimension.
    ``norm_utility``: GroupNorm among them -> the conv whose output alone it normalises (whose
    utility it measures).
    ``skipped``: conv name -> why its outputs stay dense. ``policy``: the subset of ``skipped`` left
    dense by choice (``prune_residual=False``, ``ignore``), reported at info level, not warned about.
    """

    convs: list[str] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    conv_inputs: dict[str, list[Segment]] = field(default_factory=dict)
    linear_inputs: dict[str, tuple[list[Segment], int]] = field(default_factory=dict)
    token_linears: list[str] = field(default_factory=list)
    dense_linears: dict[str, str] = field(default_factory=dict)
    channelwise: dict[str, list[Segment]] = field(default_factory=dict)
    grn_layouts: dict[str, int] = field(default_factory=dict)
    norm_utility: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    policy: set[str] = field(default_factory=set)


@dataclass
class _Space:
    producer: str  # the conv that computes these channels
    channels: int
    blocked: list[str] = field(default_factory=list)
    residual: bool = False
    # Nothing between producer and readers needs the full width (a norm or depthwise conv left in
    # place, a concat, a Linear reading several segments do).
    simple: bool = True
    norm: str | None = None
    blocks: int = 1  # equal blocks required by the grouped convs reading or writing it


@dataclass(frozen=True)
class _Chan:
    """What the channel dimension of a traced tensor holds: segments ``(space id | None, width)``;
    ``block`` is the number of features per channel once flattened (None: still (N, C, ...)). Every
    flatten DCP follows works whatever the channel count (``flatten(1)``, ``view(x.size(0), -1)``), so
    the tensor may carry only the selected channels; a flatten to a count written in the code
    (``view(-1, 4096)``) blocks the channels before it instead."""

    segs: tuple[tuple[int | None, int], ...]
    block: int | None = None
    last: bool = False  # the features are the last dimension (a Linear's output on tokens)


class _Analyzer:
    def __init__(self, model: nn.Module, graph: fx.Graph, prune_residual: bool, ignore: set[str],
                 recorded: bool = False):
        self.graph = graph
        self.recorded = recorded  # a recorded run: every size in it is a number
        self.modules = dict(model.named_modules())
        self.prune_residual = prune_residual
        self.ignore = ignore
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.values: dict[fx.Node, _Chan | None] = {}
        self.calls: dict[str, int] = {}
        self.conv_readers: dict[str, _Chan] = {}
        self.linear_readers: dict[str, tuple[_Chan, int]] = {}
        self.channelwise: dict[str, _Chan] = {}
        self.grn_layouts: dict[str, int] = {}  # GRN layer -> its channel dimension (1, or -1 on tokens)
        self.norm_utility: dict[str, str] = {}  # GroupNorm -> the conv it follows alone
        self.out_space: dict[str, int] = {}  # conv name -> the space it produces
        self.token_producers: set[str] = set()  # Linear layers whose output features on tokens are a space
        self.policy_blocked: set[str] = set()  # producers left dense by the caller's choice
        self.policy_reasons: set[str] = set()  # reasons that are the caller's choice (ignore=)
        self.stochastic_depth = _stochastic_depth_functions()
        for node in graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
        # Convs whose parameters are one Parameter object (weight tying): cutting one conv's
        # channels would untie them silently, so they stay dense (name -> the convs it shares with).
        owners: dict[int, list[str]] = {}
        for name, mod in self.modules.items():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                for param in mod.parameters(recurse=False):
                    owners.setdefault(id(param), []).append(name)
        self.tied: dict[str, list[str]] = {}
        for names in owners.values():
            for name in names if len(names) > 1 else ():
                self.tied.setdefault(name, [])
                self.tied[name] += [n for n in names if n != name and n not in self.tied[name]]

    # ------------------------------------------------------------------ union-find over spaces
    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def new_space(self, producer: str, channels: int, blocked: str | None = None) -> int:
        self.spaces.append(_Space(producer, channels))
        self.parent.append(len(self.spaces) - 1)
        if blocked:
            self.spaces[-1].blocked.append(blocked)
        return len(self.spaces) - 1

    def merge(self, a: int, b: int, residual: bool) -> None:
        # A merged group can still travel compact: its members share one index vector, so their
        # compact outputs line up channel for channel and the sum or product runs on them as it is.
        ra, rb = self.find(a), self.find(b)
        for r in (ra, rb):
            self.spaces[r].residual |= residual
        if ra != rb:
            self.parent[rb] = ra

    def block(self, chan: _Chan | None, reason: str) -> None:
        if chan is None:
            return
        for s, _ in chan.segs:
            if s is not None:
                self.spaces[s].blocked.append(reason)

    def unsimple(self, chan: _Chan | None) -> None:
        if chan is not None:
            for s, _ in chan.segs:
                if s is not None:
                    self.spaces[s].simple = False

    # ------------------------------------------------------------------ the walk
    def run(self) -> None:
        for node in self.graph.nodes:
            self.values[node] = self.visit(node)

    def chans(self, node: fx.Node) -> list[tuple[Any, _Chan | None]]:
        out: list[tuple[Any, _Chan | None]] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: out.append((n, self.values.get(n))))
        return out

    def block_inputs(self, node: fx.Node, reason: str) -> None:
        for _, chan in self.chans(node):
            self.block(chan, reason)

    def visit(self, node: fx.Node) -> _Chan | None:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            self.block_inputs(node, "its channels reach the model output")
            return None
        if _is_shape_query(node):
            return None
        if node.op == "call_module":
            return self.visit_module(node)
        return self.visit_function(node)

    def first_chan(self, node: fx.Node) -> _Chan | None:
        arg = node.args[0] if node.args else None
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def visit_module(self, node: fx.Node) -> _Chan | None:
        name = node.target
        mod = self.modules[name]
        x = self.first_chan(node)
        stateful = any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False))
        if self.calls[name] > 1 and (stateful or isinstance(mod, nn.Conv2d)):  # a reused ReLU is harmless
            self.block_inputs(node, f"read by {name!r}, which is called more than once (shared module)")
            if isinstance(mod, nn.Conv2d):
                return self.produced(node, mod, blocked=f"{name!r} is called more than once (shared module)")
            return None
        if name in self.tied:
            others = ", ".join(repr(n) for n in self.tied[name])
            self.block_inputs(node, f"read by {name!r}, which shares its parameters with {others}")
            if isinstance(mod, nn.Linear) and not _token_layout(node):
                return None  # a Linear on (N, features) produces no space
            return self.produced(node, mod, blocked=f"shares its parameters with {others} (weight tying): "
                                                    "pruning it alone would untie them")
        if name in self.ignore:
            for _, chan in self.chans(node):
                for s, _ in chan.segs if chan is not None else ():
                    if s is not None:
                        self.policy_blocked.add(self.spaces[s].producer)
            self.policy_reasons.add(f"read by {name!r}, which is in ignore=")
            self.block_inputs(node, f"read by {name!r}, which is in ignore=")
            if isinstance(mod, nn.Conv2d) and supported_conv(mod):
                self.policy_reasons.add("in ignore=")
                return self.produced(node, mod, blocked="in ignore=", policy=True)
            return None
        if isinstance(mod, nn.Linear) and _token_layout(node):
            if type(mod) is not nn.Linear:
                self.block(x, f"read by {name!r} ({type(mod).__name__}), a Linear subclass DCP does not know")
                return None
            if x is not None:
                self.read(node, name, x, "linear", mod.in_features)
            return self.produced(node, mod)
        if is_grn(mod) and registered_kind(mod) is None:
            return self.global_response_norm(name, mod, x)
        if x is not None and x.last and not (isinstance(mod, _POINTWISE_MODULES) or registered_kind(mod) == "elementwise"):
            self.block(x, f"its features (last dimension) go to {name!r} ({type(mod).__name__}), which DCP does not "
                          "follow on that dimension")
            return None
        if isinstance(mod, nn.Conv2d):
            refusal = conv_refusal(mod)
            if refusal is not None:
                self.block(x, f"read by {name!r}: {refusal}")
                return self.produced(node, mod, blocked=refusal)
            if not is_depthwise(mod):
                self.read(node, name, x, "conv", groups=mod.groups)
                return self.produced(node, mod)
            if x is not None and x.block is None:
                self.channelwise[name] = x  # depthwise: channel c reads only channel c
                self.unsimple(x)
                return x
            return self.produced(node, mod, blocked="a depthwise conv produces it from a dense input")
        kind = registered_kind(mod)
        if kind == "mixing":
            self.block_inputs(node, f"read by {name!r} ({type(mod).__name__}), registered as channel-mixing")
            return None
        if kind == "elementwise":
            return x
        if isinstance(mod, nn.GroupNorm) and kind is None:
            return self.group_norm(node, name, mod, x)
        if kind == "per_channel" or is_norm_like(mod):
            # An exact nn.BatchNorm2d right after its conv moves into the DCPConv2d; any other norm
            # (a subclass with its own forward, SyncBatchNorm, FrozenBatchNorm2d, a registered
            # per-channel module) stays where it is, full width, and finalize() cuts its tensors.
            producer = node.args[0] if node.args else None
            owner = self.owned_norm(producer, mod, name)  # None unless an exact nn.BatchNorm2d
            if owner is not None:
                self.spaces[self.out_space[owner]].norm = name
            elif x is not None:
                self.channelwise[name] = x
                self.unsimple(x)
            return x
        if isinstance(mod, _ELEMENTWISE_MODULES) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1):
            return x
        if isinstance(mod, nn.Flatten):
            if x is not None and mod.start_dim == 1 and mod.end_dim == -1:
                return self.flattened(node, x)
            self.block(x, f"flattened by {name!r} in a way DCP does not follow")
            return None
        if isinstance(mod, nn.Linear):
            self.read(node, name, x, "linear", mod.in_features)
            return None
        self.block_inputs(node, f"read by {name!r} ({type(mod).__name__}), which DCP does not understand")
        return None

    def group_norm(self, node: fx.Node, name: str, norm: nn.GroupNorm, x: _Chan | None) -> _Chan | None:
        """A GroupNorm normalises each group over its kept channels (``dcp_kernels.norms``): its input
        space keeps equal counts in each group (as a grouped conv's does), full width in between.
        Right after a conv that nothing else reads, it takes over the conv's utility measurement."""
        if x is None:
            return None
        refusal = group_norm_refusal(norm)
        if refusal is not None:
            self.block(x, f"read by {name!r}: {refusal}")
            return None
        if x.block is not None or x.last:
            self.block(x, f"normalised by {name!r} (GroupNorm) after a reshape DCP does not follow")
            return None
        spaces = [s for s, _ in x.segs if s is not None]
        if norm.num_groups < norm.num_channels and spaces:  # (one channel per group: per-channel, no constraint)
            if len(x.segs) > 1:
                self.block(x, f"normalised by {name!r}, a GroupNorm over a concat of several channel spaces")
                return None
            space = self.spaces[spaces[0]]
            space.blocks = math.lcm(space.blocks, norm.num_groups)
        producer = self.read_alone(node.args[0] if node.args else None)
        if producer is not None:
            self.norm_utility[name] = producer
        self.channelwise[name] = x
        self.unsimple(x)
        return x

    def global_response_norm(self, name: str, grn: nn.Module, x: _Chan | None) -> _Chan | None:
        """A GRN's channel mean counts the unselected channels as zeros (``dcp_kernels.norms``): full
        width in between, features on the last dimension (tokens) or on dimension 1."""
        if x is None:
            return None
        if x.block is not None:
            self.block(x, f"normalised by {name!r} (GRN) after a flatten")
            return None
        refusal = grn_refusal(grn, -1 if x.last else 1)
        if refusal is not None:
            self.block(x, f"read by {name!r}: {refusal}")
            return None
        self.channelwise[name] = x
        self.grn_layouts[name] = -1 if x.last else 1
        self.unsimple(x)
        return x

    def read_alone(self, producer: Any) -> str | None:
        """The name of ``producer`` when it is a space's producer (a conv or a token Linear) whose
        output only one node reads; else None."""
        if not (isinstance(producer, fx.Node) and producer.op == "call_module" and len(producer.users) == 1):
            return None
        return producer.target if producer.target in self.out_space else None

    def owned_norm(self, producer: Any, bn: nn.Module, bn_name: str) -> str | None:
        """The conv whose output this BatchNorm directly normalises, when it can move into it."""
        owner = self.read_alone(producer)
        conv = self.modules.get(owner) if owner is not None else None
        if conv is None or not (supported_conv(conv) and not is_depthwise(conv)):
            return None
        if type(bn) is not nn.BatchNorm2d or bn.num_features != conv.out_channels:
            return None
        return owner

    def produced(self, node: fx.Node, mod: nn.Conv2d | nn.Linear, blocked: str | None = None,
                 policy: bool = False) -> _Chan:
        """A new space: the output channels of conv ``node`` (never pruned when ``blocked``), or the
        output features of a Linear on tokens (on the last dimension)."""
        if isinstance(mod, nn.Linear):
            space = self.new_space(node.target, mod.out_features, blocked)
            self.token_producers.add(node.target)
            self.out_space[node.target] = space
            return _Chan(((space, mod.out_features),), last=True)
        space = self.new_space(node.target, mod.out_channels, blocked)
        self.spaces[space].blocks = mod.groups  # 1 for a groups=1 conv (a depthwise one is never a producer)
        if policy:
            self.policy_blocked.add(node.target)
        self.out_space[node.target] = space
        return _Chan(((space, mod.out_channels),))

    def read(self, node: fx.Node, name: str, x: _Chan | None, kind: str, in_features: int = 0,
             groups: int = 1) -> None:
        if x is None:
            return
        if kind == "conv":
            if x.block is not None or x.last:
                self.block(x, f"read by {name!r} after a flatten")
                return
            if groups > 1 and any(s is not None for s, _ in x.segs):
                if len(x.segs) > 1:
                    self.block(x, f"read by {name!r}, a grouped conv (groups={groups}) reading a concat of "
                                  "several channel spaces")
                    return
                space = self.spaces[x.segs[0][0]]
                space.blocks = math.lcm(space.blocks, groups)
            self.conv_readers[name] = x
            return
        width = sum(w for _, w in x.segs)
        block = 1 if x.last else x.block
        if block is None:
            shape = _shape(node.args[0])
            block = 1 if shape is not None and len(shape) == 2 else None
        if block is None or width * block != in_features:
            self.block(x, f"read by {name!r} (Linear) in a layout DCP does not follow")
            return
        if len(x.segs) > 1:
            self.unsimple(x)  # the Linear reads full-width features
        self.linear_readers[name] = (x, block)

    def flattened(self, node: fx.Node, x: _Chan) -> _Chan | None:
        """(N, C, ...) flattened to (N, C * block)."""
        shape = _shape(node.args[0])
        if x.block is not None or shape is None or len(shape) < 2:
            self.block(x, "flattened in a way DCP does not follow")
            return None
        return _Chan(x.segs, math.prod(shape[2:]))

    def visit_function(self, node: fx.Node) -> _Chan | None:
        target = node.target
        x = self.first_chan(node)
        if x is not None and x.last and not (
                target in _POINTWISE_FUNCTIONS or target in _ELEMENTWISE_METHODS or target in _SUMS
                or target in _PRODUCTS or target in _SUM_METHODS or target in _PRODUCT_METHODS
                or (node.op == "call_function" and registered_kind(target) == "elementwise")):
            self.block_inputs(node, f"its features (last dimension) go to {_describe(node)}, which DCP does not "
                                    "follow on that dimension")
            return None
        if node.op == "call_function":
            kind = registered_kind(target)
            if target in _ELEMENTWISE_FUNCTIONS or kind == "elementwise":
                return x
            if kind == "mixing":
                self.block_inputs(node, f"its channels go to {_describe(node)}, registered as channel-mixing")
                return None
            if target is F.batch_norm:
                self.block_inputs(node, f"its channels go to {_describe(node)}, called with tensors DCP cannot cut; "
                                        "use a BatchNorm module (or register the module that calls it as "
                                        "'per_channel')")
                return None
            if target in self.stochastic_depth:  # times a per-sample scalar: any width
                return x
            if target is F.pad and _pads_spatially(node.args, node.kwargs) and _shape(node) is not None \
                    and len(_shape(node)) == 4:
                return x
            if target is torch.flatten:
                if x is not None and _flatten_from_dim1(node.args[1:], node.kwargs):
                    return self.flattened(node, x)
            elif target in _SUMS or target in _PRODUCTS:
                return self.combine(node, residual=target in _SUMS)
            elif target is torch.cat:
                return self.concat(node)
            elif target in _SPATIAL_REDUCTIONS:
                return self.spatial_reduction(node, x)
        elif node.op == "call_method":
            if target in _ELEMENTWISE_METHODS:
                return x
            if target == "flatten" and x is not None and _flatten_from_dim1(node.args[1:], node.kwargs):
                return self.flattened(node, x)
            if target in ("view", "reshape") and x is not None and (
                    _is_batch_flatten(node.args[1:]) or _flattens_per_sample(node)):
                if _fixes_feature_count(node.args[1:]):
                    # Training would run (at full width), but the finalized network would not.
                    what = ("to a feature count written in the code, which fewer channels would break" if not self.recorded
                            else "to sizes a recorded run (torch.fx could not trace the model) cannot tell from a "
                                 "feature count written in the code")
                    self.block(x, f"flattened by {_describe(node)} {what}; flatten with torch.flatten(x, 1) or "
                                  "x.view(x.size(0), -1) to prune it")
                    return None
                return self.flattened(node, x)
            if target in _SUM_METHODS or target in _PRODUCT_METHODS:
                return self.combine(node, residual=target in _SUM_METHODS)
            if target in _SPATIAL_REDUCTIONS.values():
                return self.spatial_reduction(node, x)
        self.block_inputs(node, f"its channels go to {_describe(node)}, which DCP does not understand")
        return None

    def spatial_reduction(self, node: fx.Node, x: _Chan | None) -> _Chan | None:
        """mean/sum/amax over H and W: one value per channel (kept 4-D with keepdim, else (N, C))."""
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
        shape = _shape(node.args[0])
        spatial = shape is not None and len(shape) == 4 and len(dims) == 2 and all(isinstance(d, int) for d in dims) \
            and {d % 4 for d in dims} == {2, 3}
        if x is not None and x.block is None and spatial:
            return x if keepdim else _Chan(x.segs, 1)  # one value per channel: any width
        self.block(x, f"its channels go to {_describe(node)}, a reduction DCP does not follow")
        return None

    def combine(self, node: fx.Node, residual: bool) -> _Chan | None:
        """Element-wise sum or product: merges the spaces of two channel tensors."""
        operands = [a for a in list(node.args) + list(node.kwargs.values())]
        with_chan = [(a, self.values.get(a)) for a in operands if isinstance(a, fx.Node) and self.values.get(a) is not None]
        others = [a for a in operands if not (isinstance(a, fx.Node) and self.values.get(a) is not None)]
        if not with_chan:
            return None
        out_shape = _shape(node)
        for other in others:
            if not isinstance(other, fx.Node):
                continue  # a Python number
            shape = _shape(other)
            if shape is None or out_shape is None or len(out_shape) < 2:
                self.block_inputs(node, f"combined with a tensor of unknown shape in {_describe(node)}")
                return None
            aligned = (1,) * (len(out_shape) - len(shape)) + shape
            if aligned[-1 if with_chan[0][1].last else 1] != 1:
                self.block_inputs(node, f"combined per channel with a tensor DCP does not prune, in {_describe(node)}")
                return None
        first = with_chan[0][1]
        for _, chan in with_chan[1:]:
            if (chan.block != first.block or chan.last != first.last
                    or [w for _, w in chan.segs] != [w for _, w in first.segs]):
                self.block_inputs(node, f"combined with differently laid out channels in {_describe(node)}")
                return None
            for (sa, _), (sb, _) in zip(first.segs, chan.segs):
                if sa is None or sb is None:
                    if sa is not None or sb is not None:
                        reason = f"combined with channels that stay dense in {_describe(node)}"
                        self.spaces[sa if sa is not None else sb].blocked.append(reason)
                    continue
                self.merge(sa, sb, residual)
        # Other operands broadcast over the channels (checked above: a per-sample scalar, stochastic
        # depth's), so any width works. Except a division by channels: under capacity widths their
        # padding slots hold zeros, and 0/0 would reach the readers as NaN.
        divisor = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if node.target in _DIVISIONS and isinstance(divisor, fx.Node) and self.values.get(divisor) is not None:
            for _, chan in with_chan:
                self.unsimple(chan)
        return first

    def concat(self, node: fx.Node) -> _Chan | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out_shape = _shape(node)
        if not isinstance(tensors, (list, tuple)) or out_shape is None or len(out_shape) != 4 or dim % 4 != 1:
            self.block_inputs(node, f"concatenated along a dimension other than channels in {_describe(node)}")
            return None
        segs: list[tuple[int | None, int]] = []
        for t in tensors:
            chan = self.values.get(t) if isinstance(t, fx.Node) else None
            if chan is not None and chan.last:
                self.block_inputs(node, f"features (last dimension) concatenated in {_describe(node)}")
                return None
            if chan is not None and chan.block is not None:
                self.block_inputs(node, f"flattened channels concatenated in {_describe(node)}")
                return None
            if chan is not None:
                segs.extend(chan.segs)
                self.unsimple(chan)
            else:
                shape = _shape(t)
                if shape is None or len(shape) != 4:
                    self.block_inputs(node, f"concatenated with a tensor of unknown shape in {_describe(node)}")
                    return None
                segs.append((None, shape[1]))
        return _Chan(tuple(segs))

    # ------------------------------------------------------------------ the result
    def result(self) -> ChannelAnalysis:
        roots: dict[int, list[int]] = {}
        for s in range(len(self.spaces)):
            roots.setdefault(self.find(s), []).append(s)
        analysis = ChannelAnalysis()
        group_of_root: dict[int, int] = {}
        for root, members in roots.items():
            spaces = [self.spaces[s] for s in members]
            producers = [sp.producer for sp in spaces]
            reasons = [r for sp in spaces for r in sp.blocked]
            residual = any(sp.residual for sp in spaces)
            if residual and not self.prune_residual and not reasons:
                reasons = ["its channels are summed into a residual path (prune_residual=False)"]
                self.policy_blocked.update(p for p in producers if p is not None)
            if reasons and all(r in self.policy_reasons for r in reasons):
                self.policy_blocked.update(producers)
            if reasons:
                for sp in spaces:  # each producer's own reason first, else the group's
                    if sp.producer in self.token_producers:
                        analysis.dense_linears.setdefault(sp.producer, (sp.blocked or reasons)[0])
                    elif sp.producer is not None:
                        analysis.skipped.setdefault(sp.producer, (sp.blocked or reasons)[0])
                continue
            # Every block count divides the (common) width, so their least common multiple does too.
            blocks = math.lcm(*(sp.blocks for sp in spaces))
            norms = {sp.producer: sp.norm for sp in spaces if sp.norm is not None}
            compact = all(sp.simple for sp in spaces)
            group_of_root[root] = len(analysis.groups)
            analysis.groups.append(Group(producers, spaces[0].channels, norms, residual, compact, blocks))
        analysis.policy = {n for n in analysis.skipped if n in self.policy_blocked}

        def segments(chan: _Chan) -> list[Segment]:
            segs = [Segment(group_of_root.get(self.find(s)) if s is not None else None, w) for s, w in chan.segs]
            merged: list[Segment] = []
            for seg in segs:  # adjacent dense segments read the same way: one segment
                if merged and seg.group is None and merged[-1].group is None:
                    merged[-1] = Segment(None, merged[-1].width + seg.width)
                else:
                    merged.append(seg)
            return merged

        def prunable(chan: _Chan) -> bool:
            return any(s is not None and self.find(s) in group_of_root for s, _ in chan.segs)

        for name, chan in self.conv_readers.items():
            if prunable(chan):
                analysis.conv_inputs[name] = segments(chan)
        analysis.token_linears = [p for g in analysis.groups for p in g.producers if p in self.token_producers]
        for name, (chan, block) in self.linear_readers.items():
            if prunable(chan) and name in analysis.token_linears:
                analysis.conv_inputs[name] = segments(chan)  # it becomes a DCPTokenLinear: reads like a conv
            elif prunable(chan):
                analysis.linear_inputs[name] = (segments(chan), block)
        for name, chan in self.channelwise.items():
            if prunable(chan):
                analysis.channelwise[name] = segments(chan)
                if name in self.grn_layouts:
                    analysis.grn_layouts[name] = self.grn_layouts[name]
                if name in self.norm_utility:
                    analysis.norm_utility[name] = self.norm_utility[name]
        # Compact only when every reader is a conv, or a Linear after reshapes that work at any width,
        # reading the group alone.
        for group in analysis.groups:
            if group.compact:
                index = analysis.groups.index(group)
                readers = [segs for segs in analysis.conv_inputs.values() if any(s.group == index for s in segs)]
                readers += [segs for segs, _ in analysis.linear_inputs.values() if any(s.group == index for s in segs)]
                group.compact = all(len(segs) == 1 for segs in readers)
        return analysis


def _token_layout(node: fx.Node) -> bool:
    """Whether a Linear call reads tokens: an input of three or more dimensions, features last."""
    shape = _shape(node.args[0]) if node.args else None
    return shape is not None and len(shape) >= 3


def analyze(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    prune_residual: bool = False,
    ignore: Iterable[str] = (),
) -> ChannelAnalysis:
    """Trace ``model``, propagate shapes, and find the prunable groups and their readers.

    When torch.fx cannot trace the model, a recorded run of the example input stands in for the
    trace (:func:`record`), with a warning: data-dependent control flow is then followed as that
    input takes it.
    """
    recorded = False
    try:
        gm = trace(model)
    except TypeError as exc:
        graph, recorded = _record_any(model, example_inputs, exc), True
        warnings.warn(
            f"{exc.__cause__ or exc}: torch.fx could not trace {type(model).__name__}; convert() analysed a recorded "
            "run of the example input instead (control flow that depends on the data is followed as that input "
            "took it)", stacklevel=3)
    else:
        _propagate_shapes(gm, model, example_inputs)
        graph = gm.graph
    _drop_dead_ends(graph)
    analyzer = _Analyzer(model, graph, prune_residual, set(ignore), recorded=recorded)
    analyzer.run()
    analysis = analyzer.result()
    modules = dict(model.named_modules())
    analysis.convs = [n for n, m in model.named_modules() if supported_conv(m)]
    for name in analysis.convs:
        if name not in analyzer.calls and name not in analysis.skipped:
            analysis.skipped[name] = "never called in the traced (or recorded) forward pass"
    # Depthwise convs are channel-wise ops, never producers: they are not "skipped".
    for name in list(analysis.skipped):
        m = modules.get(name)
        if m is not None and is_depthwise(m) and name in analyzer.channelwise:
            del analysis.skipped[name]
    return analysis


