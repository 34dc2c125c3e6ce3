"""``convert(model)``: plan the whole conversion first, then swap modules in place."""
from __future__ import annotations

import logging
import warnings
from typing import Mapping

from torch import nn

from . import ops
from .graph import analyze
from .modules import DCPConv2d
from .propagation import ConversionPlan, DecaySchedule, Propagation, check_prune_ratio

logger = logging.getLogger("dcp_kernels")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def convert(
    model: nn.Module,
    prune_ratio: float = 0.5,
    *,
    min_channels: int | Mapping[str, int] = 1,
    explore_epochs: int = 10,
    decay: float | DecaySchedule = 0.6,
    backend: str = "auto",
    compact_activations: bool = True,
) -> Propagation:
    """Make ``model`` a DCP model in place and return its controller.

    Every ``Conv2d`` (groups=1 or depthwise) becomes a :class:`DCPConv2d`. Convs whose output
    channels only flow, through ReLU/pooling/flatten, into convs or Linear layers become prunable
    and own the BatchNorm that follows them (its old place holds an ``nn.Identity``); the convs
    and Linears that read them skip the unselected channels. Convs whose outputs reach a residual
    sum, a concat or anything not understood stay dense (see ``prop.report()``).

    Args:
        model: the network; traced with ``torch.fx``.
        prune_ratio: the fraction of all prunable channels switched off each step, in [0, 1).
        min_channels: channels every layer keeps at least (an int, or per layer name).
        explore_epochs: epochs during which every channel is selected.
        decay: the utility decay factor, or a :class:`DecaySchedule`.
        backend: ``auto`` | ``reference`` | ``torch``.
        compact_activations: when every reader of a prunable conv is a converted conv, pass only
            its selected channels between them (the ReLU/pooling in between then also run at the
            compact size). Model inputs and outputs are unchanged; forward hooks on those
            intermediate modules see ``k`` channels instead of ``C``. ``False`` keeps every
            activation full width with zeros. The reference backend always runs full width.

    Nothing is changed when an argument or the model is refused.
    """
    check_prune_ratio(prune_ratio)
    ops.resolve_backend(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, DCPConv2d) for m in model.modules()):
        raise ValueError("this model already contains DCPConv2d layers: it was converted before")
    if isinstance(model, nn.Conv2d):
        raise TypeError("convert() needs a network; wrap a single conv with DCPConv2d.from_modules(conv, bn)")
    analysis = analyze(model)
    if not analysis.producers:
        reasons = "; ".join(f"{n}: {r}" for n, r in analysis.skipped.items()) or "the model has no Conv2d"
        raise ValueError(f"no prunable conv layer found in {type(model).__name__} ({reasons})")

    # Plan: build every new layer without touching the model, validate, then swap.
    readers = {reader: producer for producer, rs in analysis.consumers.items() for reader, kind, _ in rs if kind == "conv"}
    new_layers: dict[str, DCPConv2d] = {}
    for name in analysis.convs:
        bn_name = analysis.producers.get(name)
        new_layers[name] = DCPConv2d.from_modules(
            model.get_submodule(name),
            model.get_submodule(bn_name) if bn_name else None,
            prunable=name in analysis.producers,
            backend=backend,
            name=name,
        )
    for reader, producer in readers.items():
        new_layers[reader].set_input_source(new_layers[producer])
    if compact_activations:
        for producer, rs in analysis.consumers.items():
            new_layers[producer].compact_output = all(kind == "conv" for _, kind, _ in rs)
    plan = ConversionPlan(
        norm_homes={n: bn for n, bn in analysis.producers.items() if bn is not None},
        consumers=analysis.consumers,
        skipped=analysis.skipped,
    )
    prunable = {n: new_layers[n] for n in analysis.convs if n in analysis.producers}
    prop = Propagation(
        prunable, prune_ratio, min_channels=min_channels, explore_epochs=explore_epochs, decay=decay, plan=plan,
    )

    for name, layer in new_layers.items():
        _set_submodule(model, name, layer)
    for bn_name in plan.norm_homes.values():
        _set_submodule(model, bn_name, nn.Identity())
    prop.attach(model)
    unexpected = {n: r for n, r in analysis.skipped.items() if n not in analysis.coupled}
    if unexpected:
        warnings.warn(
            f"convert({type(model).__name__}): {len(unexpected)} conv(s) left dense because DCP does not handle "
            "them yet: " + "; ".join(f"{n}: {r}" for n, r in unexpected.items()),
            stacklevel=2,
        )
    if analysis.coupled:
        logger.info("convert: %d conv(s) left dense because their channels are combined with other tensors "
                    "(residual sums, concats): %s", len(analysis.coupled), ", ".join(sorted(analysis.coupled)))
    return prop
