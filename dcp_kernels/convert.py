"""``convert(model)``: plan the whole conversion first, then swap modules in place."""
from __future__ import annotations

import logging
import warnings
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from . import ops
from .graph import ChannelAnalysis, Segment, analyze
from .graph.optable import is_depthwise
from .modules import ConcatSource, DCPConv2d, DCPLinear, DCPTokenLinear
from .norms import DCPGlobalResponseNorm, DCPGroupNorm
from .plan import ConversionPlan, set_submodule
from .propagation import DecaySchedule, Propagation
from .rule import check_prune_ratio, check_round_to

logger = logging.getLogger("dcp_kernels")


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, (DCPConv2d, DCPLinear)) for m in model.modules()):
        raise ValueError("this model already contains DCP layers: it was converted before (convert it once; "
                         "to start over, convert a fresh copy of the original model)")
    if isinstance(model, nn.Conv2d):
        raise TypeError("convert() needs a network; wrap a single conv with DCPConv2d.from_modules(conv, bn)")
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d: there are no channels for DCP to prune")
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(
            f"{type(model).__name__} has tensors on the meta device ({', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''}): "
            "convert() runs the model once to learn its shapes and DCP trains real weights. Materialise it first "
            "(model.to_empty(device=...) and initialise, or load a checkpoint)."
        )


def _ignored_names(model: nn.Module, ignore: Iterable[str | nn.Module]) -> set[str]:
    names = {id(m): n for n, m in model.named_modules()}
    known = set(names.values())
    out: set[str] = set()
    for item in ignore:
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise ValueError(f"ignore= holds a {type(item).__name__} that is not part of the model")
            out.add(names[id(item)])
        elif isinstance(item, str):
            if item not in known:
                raise ValueError(f"ignore= names {item!r}, which is not a submodule of the model")
            out.add(item)
        else:
            raise TypeError(f"ignore= takes module names or modules, got {type(item).__name__}")
    return out


def _producer(seg: Segment, analysis: ChannelAnalysis) -> str | None:
    """The conv whose selection a segment follows (its group's first producer; None: dense)."""
    return None if seg.group is None else analysis.groups[seg.group].producers[0]


def _source(segments: Sequence[Segment], analysis: ChannelAnalysis, layers: Mapping[str, DCPConv2d], name: str):
    """What a reader reads: one group's layer, or a ConcatSource over several segments."""
    def layer(seg: Segment) -> DCPConv2d | None:
        producer = _producer(seg, analysis)
        return None if producer is None else layers[producer]

    if len(segments) == 1:
        return layer(segments[0])
    return ConcatSource([(layer(s), s.width) for s in segments], name=f"concat read by {name}")


class OriginalLayoutKeys:
    """``load_state_dict`` pre-hook of a converted model: it also loads a state dict of the original
    model's layout (a pretrained file, an EMA copy). The BatchNorm that ``convert`` moved under its
    conv (``layer1.0.bn1.*`` -> ``layer1.0.conv1.norm.*``) is read from its old keys; the DCP buffers
    that such a state dict lacks keep their values (``DCPConv2d._load_from_state_dict``). A state dict
    of the converted layout loads unchanged. A class, not a closure: ``torch.save(model)`` pickles it."""

    def __init__(self, norm_homes: Mapping[str, str]) -> None:
        self.norm_homes = dict(norm_homes)  # prunable conv -> the BatchNorm's original path

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        for producer, bn_name in self.norm_homes.items():
            layer = module.get_submodule(producer)
            if not isinstance(layer, DCPConv2d) or layer.norm is None:
                continue
            old, new = f"{prefix}{bn_name}.", f"{prefix}{producer}.norm."
            for key in [k for k in state_dict if k.startswith(old)]:
                if new + key[len(old):] not in state_dict:  # both layouts at once: strict loading names the extra keys
                    state_dict[new + key[len(old):]] = state_dict.pop(key)


def _exclude_utilities_from_ddp(model: nn.Module, prunable: Sequence[str]) -> None:
    """Keep DDP from broadcasting rank 0's utilities at every forward (its default): the controller
    averages them over the ranks before each selection, so every rank's data counts. DDP reads this
    list from the module it wraps: a wrapper around the converted model (``torch.compile``'s
    ``_orig_mod.``, a parent module) needs the same names under its own prefix."""
    # utility: averaged, not broadcast; selected / kept_*: rewritten by every selection, identical on
    # every rank (a broadcast would only invalidate the caches derived from them).
    names = [f"{name}.{buffer}" for name in prunable for buffer in ("utility", "selected", "kept_order", "kept_count")]
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = existing + [n for n in names if n not in existing]


def convert(
    model: nn.Module,
    prune_ratio: float = 0.5,
    *,
    min_channels: int | Mapping[str, int] = 1,
    layer_prune_ratios: Mapping[str, float] | None = None,
    prune_residual: bool = False,
    ignore: Iterable[str | nn.Module] = (),
    example_inputs: Sequence[torch.Tensor] | None = None,
    explore_epochs: int = 10,
    decay: float | DecaySchedule = 0.6,
    backend: str = "auto",
    compact_activations: bool = True,
    round_to: int = 1,
    static_shapes: bool = False,
    capacity_multiple: int = 8,
) -> Propagation:
    """Make ``model`` a DCP model in place and return its controller.

    The model is traced (``torch.fx``) and run once on an example input in eval mode (shapes only;
    no statistics move) to build its channel dependency graph (:mod:`dcp_kernels.graph`). Every
    ``nn.Conv2d`` becomes a :class:`DCPConv2d`. Convs whose output channels
    reach only readers that can skip channels (convs, Linear layers after a flatten), through
    channel-wise operations, become prunable and own the BatchNorm right after them (its old place
    holds an ``nn.Identity``). Channels that are summed or multiplied together (residual sums,
    squeeze-excitation scales) form one coupled group with one selection; concats are read segment
    by segment; depthwise convs and BatchNorms inside a group follow its channels; the channels a
    grouped conv reads or writes keep equal counts in each of its groups. Anything not
    understood stays dense with its reason in ``prop.report()`` (and a warning).

    Args:
        model: the network (any ``nn.Module`` torch.fx can trace).
        prune_ratio: the fraction of all prunable channels switched off each step, in [0, 1).
        min_channels: channels every layer keeps at least (an int, or per layer name; coupled
            layers take the largest of their values).
        layer_prune_ratios: layer name -> its own prune ratio; that layer's group keeps exactly
            its share, chosen by utility within the layer, outside the global selection.
        prune_residual: ``False`` (the paper's choice): channels on a residual sum stay dense.
            ``True``: they are pruned jointly (one selection for every conv summed into them).
        ignore: modules or module names to leave alone: a conv in it is never pruned and a layer
            in it reads all its input channels (e.g. the first conv, the classifier).
        example_inputs: a batch the model accepts, used once for shapes (default: the first image
            batch of 32, 224, 64, 28, 16 or 8 pixels, with the first conv's input channels, that the
            model accepts).
        explore_epochs: epochs during which every channel is selected.
        decay: the utility decay factor, or a :class:`DecaySchedule`.
        backend: ``auto`` | ``reference`` | ``torch`` | ``triton`` | ``extension``.
        compact_activations: when every reader of a prunable conv is a converted conv reading it
            alone, pass only its selected channels between them (the ReLU/pooling in between
            then also run at the compact size). Model inputs and outputs are unchanged; forward
            hooks on those intermediate modules see ``k`` channels instead of ``C``. ``False``
            keeps every activation full width. The reference backend always runs full width.
        round_to: keep every layer's (group's) width a multiple of this (Torch-Pruning's name):
            the exact rule's count per group is rounded to the nearest multiple and the group keeps
            that many of its best channels (docs/algorithm.md). 1 (default) is the paper's exact
            rule; 8 suits GPU tensor cores and bounds the set of shapes kernels see.
        static_shapes: run every training step at shapes that do not change from step to step.
            Backend ``torch`` (or ``auto``): capacity widths, compact tensors of a fixed number of
            slots per layer, padded with masked unselected channels, convolved by ATen (cuDNN,
            oneDNN); one host read per selecting step. Backend ``triton``: full-width tensors, the
            selection read on the device only (no host read; no grouped convs). See
            :meth:`Propagation.set_static_shapes`.
        capacity_multiple: capacity widths are multiples of this (8 suits tensor cores).

    Nothing is changed when an argument or the model is refused. On ``triton`` and ``extension``,
    which have no grouped-conv kernel, grouped convs run on ``torch`` (a ``UserWarning`` names them;
    ``prop.report()`` marks them; see :meth:`Propagation.set_backend`).
    """
    check_prune_ratio(prune_ratio)
    check_round_to(round_to)
    ops.resolve_backend(backend)
    if static_shapes and ops.capabilities(backend).static_shapes is None:
        raise ValueError(f"static_shapes=True needs backend {ops.static_shape_backends()}, got {backend!r}")
    _check_model(model)
    if static_shapes and not ops.capabilities(backend).grouped_convs:
        grouped = [n for n, m in model.named_modules()
                   if isinstance(m, nn.Conv2d) and m.groups > 1 and not is_depthwise(m)]
        if grouped:
            raise ValueError(f"static_shapes=True: grouped convs have no {backend!r} kernel ({', '.join(grouped[:3])}); "
                             "leave static_shapes off for this model")
    ignored = _ignored_names(model, ignore)
    analysis = analyze(model, example_inputs, prune_residual=prune_residual, ignore=ignored)
    if not analysis.groups:
        reasons = "; ".join(f"{n}: {r}" for n, r in list(analysis.skipped.items())[:5])
        more = f"; and {len(analysis.skipped) - 5} more" if len(analysis.skipped) > 5 else ""
        hint = (" Every conv is summed into a residual path: prune_residual=True prunes such groups jointly."
                if analysis.skipped and all("prune_residual=False" in r for r in analysis.skipped.values()) else "")
        raise ValueError(f"no prunable conv layer found in {type(model).__name__} ({reasons}{more}).{hint}")

    # Plan: build every new layer without touching the model, validate, then swap.
    group_of = {p: g for g in analysis.groups for p in g.producers}
    new_layers: dict[str, DCPConv2d] = {}
    for name in analysis.convs:
        if name in ignored:
            continue  # left exactly as it is
        group = group_of.get(name)
        bn_name = group.norms.get(name) if group is not None else None
        new_layers[name] = DCPConv2d.from_modules(
            model.get_submodule(name),
            model.get_submodule(bn_name) if bn_name else None,
            prunable=group is not None,
            backend=backend,
            name=name,
        )
    for name in analysis.token_linears:
        new_layers[name] = DCPTokenLinear.from_linear(model.get_submodule(name), backend=backend, name=name)
    for reader, segments in analysis.conv_inputs.items():
        new_layers[reader].set_input_source(_source(segments, analysis, new_layers, reader))
    new_linears: dict[str, DCPLinear] = {}
    for reader, (segments, block) in analysis.linear_inputs.items():
        linear = DCPLinear.from_linear(model.get_submodule(reader), block=block, name=reader)
        linear.set_input_source(_source(segments, analysis, new_layers, reader))
        new_linears[reader] = linear
    # Norms whose statistics mix channels: a GroupNorm over each group's kept channels, a GRN's
    # channel mean with the unselected channels as zeros (dcp_kernels.norms).
    new_norms: dict[str, DCPGroupNorm | DCPGlobalResponseNorm] = {}
    for name, segments in analysis.channelwise.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.GroupNorm):
            new_norms[name] = DCPGroupNorm.from_norm(module, name=name)
        elif name in analysis.grn_layouts:
            new_norms[name] = DCPGlobalResponseNorm(module, analysis.grn_layouts[name], name=name)
        else:
            continue
        new_norms[name].set_source(_source(segments, analysis, new_layers, name))
        if name in analysis.norm_utility:
            new_norms[name].set_utility_of(new_layers[analysis.norm_utility[name]])
    if compact_activations:
        for group in analysis.groups:
            for producer in group.producers:
                new_layers[producer].compact_output = group.compact
    plan = ConversionPlan(
        norm_homes={p: bn for g in analysis.groups for p, bn in g.norms.items()},
        channelwise={
            name: [(_producer(s, analysis), s.width) for s in segments]
            for name, segments in analysis.channelwise.items()
        },
        groups=[list(g.producers) for g in analysis.groups],
        skipped={**analysis.skipped, **analysis.dense_linears},
        policy=set(analysis.policy),
    )
    order = [n for n, _ in model.named_modules() if n in group_of]
    prop = Propagation(
        {n: new_layers[n] for n in order}, prune_ratio, min_channels=min_channels, explore_epochs=explore_epochs,
        decay=decay, plan=plan, groups=plan.groups, layer_prune_ratios=layer_prune_ratios, round_to=round_to,
        blocks={g.producers[0]: g.blocks for g in analysis.groups if g.blocks > 1},
        capacity_multiple=capacity_multiple,
    )

    for name, layer in {**new_layers, **new_linears, **new_norms}.items():
        set_submodule(model, name, layer)
    for bn_name in plan.norm_homes.values():
        set_submodule(model, bn_name, nn.Identity())
    prop.attach(model)
    prop._layout_hook = model.register_load_state_dict_pre_hook(OriginalLayoutKeys(plan.norm_homes))
    _exclude_utilities_from_ddp(model, order)
    prop.set_backend(backend)  # grouped convs to 'torch' where the backend has no grouped kernel (warned)
    if static_shapes:
        prop.set_static_shapes(True)
    unexpected = {n: r for n, r in analysis.skipped.items() if n not in analysis.policy}
    if unexpected:
        listed = "; ".join(f"{n}: {r}" for n, r in list(unexpected.items())[:5])
        more = f"; and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        warnings.warn(
            f"convert({type(model).__name__}): {len(unexpected)} conv(s) left dense because DCP does not handle "
            f"them: {listed}{more} (prop.report() lists them all)",
            stacklevel=2,
        )
    if analysis.policy:
        logger.info("convert: %d conv(s) left dense by policy (prune_residual=False, ignore=): %s",
                    len(analysis.policy), ", ".join(sorted(analysis.policy)))
    return prop
