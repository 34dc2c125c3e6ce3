"""What a controller reports: conv FLOPs with the current selection, and the per-layer table.

Read-only views of a :class:`~dcp_kernels.propagation.Propagation` and its model's layers (the
controller's ``flops_ratio()`` and ``report()`` call these).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .propagation import Propagation


def flops_ratio(prop: "Propagation") -> float:
    """Multiply-accumulates with the current selection over dense ones, over every converted layer
    (convs, token Linears, and the Linears reading pruned features), from each layer's shapes in its
    most recent forward. Layers left as they were (attention, other Linears) are not counted."""
    counted = [(layer.last_output_hw, layer.conv_flops) for layer in prop._all_dcp_layers()]
    counted += [(linear.last_rows, linear.linear_flops) for linear in prop._linear_readers()]
    if any(shape is None for shape, _ in counted):
        raise RuntimeError("flops_ratio() needs one forward pass of the model first (it reads layer shapes)")
    dense, active = (sum(column) for column in zip(*(flops() for _, flops in counted)))
    return active / dense


def report(prop: "Propagation") -> str:
    """A table of every converted layer: channels, kept, share of the model's conv FLOPs, and why a
    layer stays dense. Coupled layers (one selection) are listed together; FLOPs shares need one
    forward pass first (they read output sizes), else they print as ``-``."""
    convs = {m.dcp_name: m for m in prop._all_dcp_layers()}
    flops = {n: m.conv_flops()[0] for n, m in convs.items() if m.last_output_hw is not None}
    total = sum(flops.values()) if len(flops) == len(convs) else 0

    def share(names: Sequence[str]) -> str:
        return f"{100 * sum(flops.get(n, 0) for n in names) / total:.1f}%" if total else "-"

    width = max([len(n) for n in convs] + [len(n) for n in prop.layer_names] + [5]) + 2
    rows = [f"{'layer':<{width}} {'channels':>8} {'kept':>6} {'FLOPs':>7}  note"]
    listed: set[str] = set()
    for members, blocks in zip(prop.groups, prop.group_blocks):
        names = [prop.layer_names[i] for i in members]
        layer = prop.layers[members[0]]
        notes = [f"coupled with {', '.join(names[1:])}"] if len(names) > 1 else []
        if blocks > 1:
            notes.append(f"{blocks} blocks (grouped conv): equal kept per block")
        notes += [_fallback_note(prop, n) for n in names if n in prop.backend_fallbacks]
        note = "; ".join(notes)
        rows.append(f"{names[0]:<{width}} {layer.out_channels:>8} {int(layer.selected.sum()):>6} "
                    f"{share(names):>7}  {note}".rstrip())
        listed.update(names)
    skipped = prop.plan.skipped if prop.plan is not None else {}
    for name, conv in convs.items():
        if name in listed:
            continue
        reason = skipped.get(name, "depthwise: follows the channels of its input" if conv.depthwise else "dense")
        if name in prop.backend_fallbacks:
            reason += f"; {_fallback_note(prop, name)}"
        rows.append(f"{name:<{width}} {conv.out_channels:>8} {'-':>6} {share([name]):>7}  left dense: {reason}")
    for name, reason in skipped.items():
        if name not in convs and name not in listed:
            rows.append(f"{name:<{width}} {'':>8} {'-':>6} {'-':>7}  left dense: {reason}")
    return "\n".join(rows)


def _fallback_note(prop: "Propagation", name: str) -> str:
    return f"{name} runs on 'torch' (no grouped-conv kernel in {prop.backend_fallbacks[name]!r})"
