"""The one dispatch point for DCP kernels.

Every backend implements the same op::

    gathered_conv2d(x, weight, bias, in_idx, out_idx, stride, padding, dilation, groups) -> y

``x`` is full width (N, C_in, H, W) and only channels ``in_idx`` are read; ``weight`` is full size
and only the ``out_idx x in_idx`` block is read; ``y`` is full width with exact zeros outside
``out_idx``. Its backward returns grad-input non-zero only on ``in_idx`` and a full-size
grad-weight non-zero only on the block. ``channel_utility`` is the utility reduction used by the
gate's backward.

Backends: ``reference`` (dense conv + masks, the oracle), ``torch`` (compact PyTorch: gather,
cuDNN/oneDNN conv, scatter), ``triton`` (fused gather implicit-GEMM kernels; CUDA, or CPU under
``TRITON_INTERPRET=1`` for testing) and ``extension`` (the compiled C++/CUDA library from ``csrc/``:
its CPU kernels on CPU tensors, its CUDA kernels on GPU tensors; present only when it was built).
``auto`` resolves to the fastest backend measured for the tensor's device (``_AUTO_ORDER``); choose
another explicitly to use it.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
from types import ModuleType
from typing import Literal

import torch

from . import compact, extension, reference
from .registry import AUTO, CAPACITY_BACKEND, GROUPED_FALLBACK, REGISTRY, Backend, capabilities, static_shape_backends  # noqa: F401

logger = logging.getLogger("dcp_kernels")

BACKENDS: tuple[str, ...] = tuple(REGISTRY)
"""Backends this build knows (whether each is usable here: :func:`backends`)."""

# auto's preference per device type. Triton joins the CUDA list once a GPU run shows it beating
# the compact PyTorch path (docs/benchmarks.md records what has been measured where).
_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": (AUTO,), "cpu": (AUTO,)}


MIN_TRITON = (3, 6)
"""The oldest Triton the ``triton`` backend accepts: 3.6 (torch 2.11) is the oldest that has run its
kernels (on an H200); they are tested with 3.8 (torch 2.14). 3.2 (torch 2.6) fails where the kernels
are defined; 3.3-3.5 are untested. An older Triton makes the backend unavailable, with that reason."""


def parse_triton_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as ``3.6.0`` or ``3.6.0+git1234``; None if unreadable."""
    match = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _triton_version() -> tuple[int, int] | None:
    """The installed Triton's (major, minor) from its package metadata, without importing it; None
    when there is no Triton or its version cannot be read."""
    if importlib.util.find_spec("triton") is None:
        return None
    for distribution in ("pytorch-triton", "pytorch-triton-rocm", "triton"):
        try:
            return parse_triton_version(importlib.metadata.version(distribution))
        except importlib.metadata.PackageNotFoundError:
            continue
    try:  # no metadata (a source build): ask the module; a broken one is no Triton for us
        import triton

        return parse_triton_version(triton.__version__)
    except Exception:  # noqa: BLE001 - whatever a broken install raises, dcp_kernels must import
        return None


# Looked up once: resolve_backend("auto") runs in every layer's forward, and find_spec scans sys.path
# until Triton is imported.
_TRITON_VERSION = _triton_version()
_TRITON_INSTALLED = _TRITON_VERSION is not None and _TRITON_VERSION >= MIN_TRITON


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_usable(device_type: str | None) -> bool:
    if not _triton_installed():
        return False
    if triton_interpreting():
        return True  # the interpreter runs kernels on CPU tensors (slowly): for tests
    return device_type in (None, "cuda") and torch.cuda.is_available()


def backends(device: torch.device | str | None = None) -> dict[str, bool]:
    """Which backends are usable (name -> available), for tensors on ``device`` if given.

    ``triton`` needs Triton and a CUDA device, or ``TRITON_INTERPRET=1`` (CPU, for testing);
    ``extension`` needs the compiled library, built with CUDA for CUDA tensors.
    """
    extension.notice_if_not_built()
    device_type = None if device is None else torch.device(device).type
    extension_usable = extension.AVAILABLE and (device_type != "cuda" or extension.CUDA_BUILT)
    return {"reference": True, "torch": True, "triton": _triton_usable(device_type), "extension": extension_usable}


def resolve_backend(name: str, device: torch.device | None = None) -> str:
    """Map a user-facing backend name (``auto`` included) to a concrete backend.

    An explicitly named backend that cannot run on ``device`` raises instead of falling back, so a
    result never silently comes from another path than the one asked for.
    """
    if name == "auto":
        available = backends(device)
        for candidate in _AUTO_ORDER.get("cpu" if device is None else torch.device(device).type, ("torch",)):
            if available.get(candidate):
                return candidate
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    if name == "triton" and device is not None and not backends(device)["triton"]:
        if _TRITON_VERSION is None:
            why = "Triton is not installed (or its version cannot be read)"
        elif not _triton_installed():
            why = (f"Triton {'.'.join(map(str, _TRITON_VERSION))} is older than the "
                   f"{'.'.join(map(str, MIN_TRITON))} its kernels need (upgrade torch and its Triton)")
        elif torch.device(device).type == "cuda":
            why = "CUDA is not available to Triton here"
        else:
            why = (f"its kernels need CUDA tensors (got {torch.device(device)}); set TRITON_INTERPRET=1 "
                   "before importing dcp_kernels to run them in Triton's CPU interpreter (slow, for testing)")
        raise RuntimeError(f"backend 'triton' is unavailable: {why}")
    if name == "extension" and not backends(device)["extension"]:
        why = (f"the C++/CUDA extension is not built ({extension.LOAD_ERROR})" if not extension.AVAILABLE
               else "it was built without CUDA (no nvcc at build time), so it takes CPU tensors only")
        raise RuntimeError(f"backend 'extension' is unavailable: {why}; see docs/building.md")
    return name


_TRITON_MODULE: ModuleType | None = None


def _triton_backend() -> ModuleType:
    """Import the Triton kernels on first use (Triton reads TRITON_INTERPRET when they are defined)."""
    global _TRITON_MODULE
    if _TRITON_MODULE is None:
        from . import triton as triton_backend

        if not torch.compiler.is_compiling():  # a log call inside a fullgraph trace is an error there
            mode = "interpreter (CPU)" if triton_interpreting() else "compiled"
            logger.info("dcp_kernels: Triton backend loaded, %s mode", mode)
        _TRITON_MODULE = triton_backend
    return _TRITON_MODULE


def _pair(value: int | tuple[int, int], arg: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{arg} must be an int or a pair of ints, got {value!r}")


def _check_index(idx: torch.Tensor, arg: str, size: int, device: torch.device) -> None:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor of int64 channel indices, got {type(idx).__name__}")
    if idx.dtype != torch.int64 or idx.dim() != 1:
        raise TypeError(f"{arg} must be a 1-D int64 tensor, got dtype {idx.dtype} with shape {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{arg} is on {idx.device} but the input is on {device}")
    if idx.numel() == 0:
        raise ValueError(f"{arg} is empty: at least one channel must be selected")
    if int(idx.min()) < 0 or int(idx.max()) >= size:
        raise IndexError(f"{arg} holds indices outside [0, {size}): min {int(idx.min())}, max {int(idx.max())}")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{arg} must be sorted in increasing order without repeats")


def check_conv_arguments(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_idx: torch.Tensor,
    out_idx: torch.Tensor,
    groups: int,
    x_compact: bool = False,
) -> None:
    """Validate the op's arguments once, with errors that name the argument at fault.

    With ``x_compact`` the input holds only the channels ``in_idx``. A grouped conv (1 < groups, not
    depthwise) needs the same number of indices in every group, for inputs and outputs.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got {shape}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (C_out, C_in/groups, kh, kw), got shape {tuple(weight.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device or bias.shape != (weight.shape[0],)):
        raise ValueError(
            f"bias must be a ({weight.shape[0]},) tensor of {x.dtype} on {x.device}, "
            f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}"
        )
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    c_in, c_out = weight.shape[1] * groups, weight.shape[0]
    if x_compact:
        if compact.is_depthwise_weight(weight, groups):
            raise NotImplementedError("input_layout='compact' is not supported for depthwise convs")
        if x.shape[1] != in_idx.numel():
            raise ValueError(f"input_layout='compact' needs x with len(in_idx)={in_idx.numel()} channels, got {x.shape[1]}")
    elif x.shape[1] != c_in:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {c_in} (groups={groups})")
    if c_out % groups:
        raise ValueError(f"weight has {c_out} output channels, not divisible by groups={groups}")
    _check_index(in_idx, "in_idx", c_in, x.device)
    _check_index(out_idx, "out_idx", c_out, x.device)
    if groups > 1 and not compact.is_depthwise_weight(weight, groups):
        for arg, idx, width in (("in_idx", in_idx, c_in), ("out_idx", out_idx, c_out)):
            per_group = torch.bincount(torch.div(idx, width // groups, rounding_mode="floor"), minlength=groups)
            if bool((per_group != per_group[0]).any()):
                raise ValueError(f"{arg} must keep the same number of channels in each of the {groups} groups, "
                                 f"got {per_group.tolist()}")


GROUPED_CONV_BACKENDS: tuple[str, ...] = tuple(b.name for b in REGISTRY.values() if b.grouped_convs)
"""Backends with grouped-conv kernels (1 < groups, not depthwise); the Triton and extension kernels
handle groups=1 and depthwise only."""


def check_groups_supported(backend: str, groups: int, weight: torch.Tensor, label: str = "gathered_conv2d") -> None:
    """Refuse a grouped conv (1 < groups, not depthwise) on a backend without grouped kernels (no
    silent fallback; ``Propagation.set_backend`` moves grouped layers to ``torch`` and says so)."""
    grouped = groups > 1 and not compact.is_depthwise_weight(weight, groups)
    if grouped and backend not in GROUPED_CONV_BACKENDS:
        raise NotImplementedError(f"{label}: backend {backend!r} has no grouped-conv kernel (groups={groups}); "
                                  "use backend='torch' (or 'auto') for models with grouped convs")


def gathered_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_idx: torch.Tensor,
    out_idx: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
    layout: Literal["full", "compact"] = "full",
    input_layout: Literal["full", "compact"] = "full",
    validate: bool = True,
) -> torch.Tensor:
    """Convolution that reads only input channels ``in_idx`` and computes only outputs ``out_idx``.

    Args:
        x: input (N, C_in, H, W); channels outside ``in_idx`` are treated as zero and never read
            by the compact backends.
        weight, bias: the full-size parameters of the convolution.
        in_idx, out_idx: sorted, unique int64 channel indices on ``x``'s device.
        stride, padding, dilation, groups: as in ``torch.nn.functional.conv2d`` (integer padding).
            A grouped conv (1 < groups, not depthwise) needs equal kept counts in every group and
            runs on ``reference`` and ``torch`` only.
        backend: ``auto``, ``reference``, ``torch``, ``triton`` or ``extension``.
        layout: ``full`` returns (N, C_out, H', W') with exact zeros outside ``out_idx``;
            ``compact`` returns only the selected channels, (N, len(out_idx), H', W').
        input_layout: ``full`` (``x`` has C_in channels) or ``compact`` (``x`` holds exactly the
            channels ``in_idx``, in order; not for depthwise convs). Its gradient has ``x``'s layout.
        validate: check the arguments (turn off only for indices built by this library).
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    for arg, value in (("layout", layout), ("input_layout", input_layout)):
        if value not in ("full", "compact"):
            raise ValueError(f"{arg} must be 'full' or 'compact', got {value!r}")
    x_compact = input_layout == "compact"
    if validate:
        check_conv_arguments(x, weight, bias, in_idx, out_idx, groups, x_compact=x_compact)
    name = resolve_backend(backend, x.device)
    check_groups_supported(name, groups, weight)
    if name == "reference":
        if x_compact:
            x = compact.scatter_channels(x, in_idx, weight.shape[1] * groups)
        y = reference.gathered_conv2d(x, weight, bias, in_idx, out_idx, stride, padding, dilation, groups)
        return y if layout == "full" else y.index_select(1, out_idx)
    if name in ("triton", "extension"):
        module = _triton_backend() if name == "triton" else extension
        return module.gathered_conv2d(
            x, weight, bias, in_idx, out_idx, stride, padding, dilation, groups,
            x_compact=x_compact, y_compact=layout == "compact",
        )
    y_c = compact.compact_conv2d(x, weight, bias, in_idx, out_idx, stride, padding, dilation, groups, x_compact)
    return y_c if layout == "compact" else compact.scatter_channels(y_c, out_idx, weight.shape[0])


def scatter_channels(y_c: torch.Tensor, out_idx: torch.Tensor, channels: int) -> torch.Tensor:
    """Place compact channels at ``out_idx`` of a zero (N, channels, H, W) tensor (differentiable)."""
    return compact.scatter_channels(y_c, out_idx, channels)


def channel_utility(a: torch.Tensor, g: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Per-channel ``sum_b |sum_hw g*a| / (B*H*W)`` in float32 (the DCP first-order importance).

    ``triton`` and ``extension`` run deterministic one-pass kernels; the others use PyTorch reductions.
    """
    if a.shape != g.shape or a.dim() != 4:
        raise ValueError(f"a and g must be 4-D tensors of one shape, got {tuple(a.shape)} and {tuple(g.shape)}")
    name = resolve_backend(backend, a.device)
    if name == "triton":
        return _triton_backend().channel_utility(a, g)
    if name == "extension":
        return extension.channel_utility(a, g)
    return reference.channel_utility(a, g)


__all__ = [
    "BACKENDS",
    "backends",
    "channel_utility",
    "check_conv_arguments",
    "check_groups_supported",
    "GROUPED_CONV_BACKENDS",
    "gathered_conv2d",
    "resolve_backend",
    "scatter_channels",
]
