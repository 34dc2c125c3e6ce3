"""What each backend can do, in one table: the rest of the package asks here instead of comparing names.

A :class:`Backend` states its capabilities; :func:`capabilities` answers for a name as the user wrote
it (``auto`` included, resolved as :func:`dcp_kernels.ops.resolve_backend` resolves it on the CPU and
on CUDA alike). Whether a backend can run *here* (Triton installed, the extension built) is
:func:`dcp_kernels.ops.backends`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Backend:
    name: str
    grouped_convs: bool  # 1 < groups, not depthwise (else such layers run on GROUPED_FALLBACK)
    # Static-shape steps: "capacity" (fixed slot counts, ATen convolutions, one host read per step),
    # "full width" (selection read on the device only, no host read), or None (not offered).
    static_shapes: Literal["capacity", "full width"] | None
    dense_ops: bool  # plain ATen ops on full tensors: autocast casts for it (the others cast explicitly)


REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("reference", grouped_convs=True, static_shapes=None, dense_ops=True),
    Backend("torch", grouped_convs=True, static_shapes="capacity", dense_ops=False),
    Backend("triton", grouped_convs=False, static_shapes="full width", dense_ops=False),
    Backend("extension", grouped_convs=False, static_shapes=None, dense_ops=False),
)}

AUTO = "torch"
"""What ``auto`` resolves to on every device measured so far (``_AUTO_ORDER`` in ops/__init__.py)."""
GROUPED_FALLBACK = "torch"
"""Where grouped convs run when the chosen backend has no grouped-conv kernel."""
CAPACITY_BACKEND = "torch"
"""The backend that runs capacity widths (static shapes on ATen convolutions)."""


def capabilities(name: str) -> Backend:
    """The :class:`Backend` behind ``name`` (``auto``: :data:`AUTO`); ValueError for an unknown name."""
    backend = REGISTRY.get(AUTO if name == "auto" else name)
    if backend is None:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + tuple(REGISTRY)}")
    return backend


def static_shape_backends() -> str:
    """The backends offering static shapes, for error messages ("'torch' (capacity widths) or ...")."""
    words = {"capacity": "capacity widths", "full width": "full width"}
    return " or ".join(f"'{b.name}' ({words[b.static_shapes]})" for b in REGISTRY.values() if b.static_shapes)
