"""What ``convert`` decided about a model, shared by the conversion, the controller and finalize.

Kept apart so that none of them imports another to reach it (no import cycle), as is the one
helper they all use to put a module at a dotted path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class ConversionPlan:
    """What ``convert`` decided, kept so ``finalize`` cuts exactly the coupled tensors.

    ``norm_homes``: prunable conv -> where its BatchNorm sat before the BN moved into the
    DCPConv2d (an ``nn.Identity`` holds that place now).
    ``channelwise``: module with per-channel parameters inside a pruned group (a BatchNorm over a
    concat, a depthwise conv) -> the segments of its channels, ``(producer conv or None, width)``:
    ``finalize`` keeps the channels the producer selects (all of a ``None`` segment).
    ``groups``: the names of the prunable convs that share one selection.
    ``skipped``: conv -> why it stays dense; ``policy``: those left dense by choice
    (``prune_residual=False``, ``ignore``).
    """

    norm_homes: dict[str, str] = field(default_factory=dict)
    channelwise: dict[str, list[tuple[str | None, int]]] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    policy: set[str] = field(default_factory=set)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``root`` (replacing what is there)."""
    root.set_submodule(name, module)
