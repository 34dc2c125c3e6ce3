"""The compiled C++/CUDA extension (``dcp_kernels._C``, built from ``csrc/``), if it was built.

Importing ``_C`` registers the ``dcp::gathered_conv2d``, ``dcp::gathered_conv2d_backward`` and
``dcp::channel_utility`` ops (schemas in ``csrc/dcp_ops.cpp``, CPU kernels in ``csrc/cpu/``, CUDA
kernels in ``csrc/cuda/``: on CUDA the fused gather implicit-GEMM kernels), and
``dcp::implicit_gemm_conv2d[_backward]``, those kernels with tile family and split-K forced (on CPU
tensors the same kernels under a CPU emulation of CUDA, for the tests); this module adds their fake kernels and autograd formula
and is the ``extension`` backend's entry point. Without a built extension the package works on its PyTorch and
Triton backends, and says so once in a warning.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch
from torch import Tensor

from .registration import (
    fake_channel_utility,
    fake_conv2d,
    fake_conv2d_backward,
    register_conv_autograd,
)

LOAD_ERROR: str | None = None
if os.environ.get("DCP_KERNELS_NO_EXTENSION", "0") == "1":
    # Behave as where it was not built (checked by hand: the whole suite passes this way, 2026-12-03).
    _C = None
    LOAD_ERROR = "disabled by DCP_KERNELS_NO_EXTENSION=1"
elif importlib.util.find_spec("dcp_kernels._C") is None:
    # Not compiled. (Importing it anyway reports "cannot import name '_C' from partially initialized
    # module", which reads like a circular import: say what it is.)
    _C = None
    LOAD_ERROR = "dcp_kernels._C is not built: no compiled library next to the package"
else:
    try:
        from .. import _C  # loading the library registers the ops
    except ImportError as error:  # built against another torch, or a missing shared library
        _C = None
        LOAD_ERROR = f"dcp_kernels._C is built but does not load: {error}"

AVAILABLE = LOAD_ERROR is None
# A CPU-only build registers CUDA kernels that only raise a clear error; this says which build it is.
CUDA_BUILT = AVAILABLE and bool(_C.WITH_CUDA)
if AVAILABLE:

    # The C++ kernels return NCHW-contiguous tensors whatever the input layout; so do the fakes.
    torch.library.register_fake("dcp::gathered_conv2d")(
        functools.partial(fake_conv2d, memory_format=torch.contiguous_format))
    torch.library.register_fake("dcp::gathered_conv2d_backward")(
        functools.partial(fake_conv2d_backward, x_memory_format=torch.contiguous_format))
    torch.library.register_fake("dcp::channel_utility")(fake_channel_utility)
    # The fused kernels with their configuration explicit (tests, benchmarks): same outputs.
    torch.library.register_fake("dcp::implicit_gemm_conv2d")(
        lambda *args: fake_conv2d(*args[:11], memory_format=torch.contiguous_format))
    torch.library.register_fake("dcp::implicit_gemm_conv2d_backward")(
        lambda *args: fake_conv2d_backward(*args[:12], x_memory_format=torch.contiguous_format))
    register_conv_autograd("dcp::gathered_conv2d", torch.ops.dcp.gathered_conv2d_backward)


class _Notice:
    given = False  # the "not built" notice goes out once per process


def notice_if_not_built() -> None:
    """Warn once (a ``UserWarning``, when the first layer picks its backend, not at import: an
    import-time message would precede a command line's own error) that the extension is missing."""
    if AVAILABLE or _Notice.given:
        return
    _Notice.given = True
    warnings.warn(
        f"dcp_kernels: the C++/CUDA extension is not built ({LOAD_ERROR}): backend 'extension' is unavailable; "
        "'auto' and the other backends use the PyTorch and Triton paths. Reinstall with a C++ compiler "
        "(and nvcc for CUDA) to build it: docs/building.md.", stacklevel=3)


def status() -> str:
    """One line saying whether the extension was built and with which kernels (``dcp-train`` prints
    it: ``pip install`` shows nothing of the build but "still running..." for minutes). Asking counts
    as the notice of :func:`notice_if_not_built`."""
    _Notice.given = True
    if not AVAILABLE:
        return f"not built ({LOAD_ERROR}; docs/building.md)"
    return "built, CPU and CUDA kernels" if CUDA_BUILT else "built, CPU kernels only (no nvcc at build time)"


def gathered_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, in_idx: Tensor, out_idx: Tensor,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
    *, x_compact: bool = False, y_compact: bool = False,
) -> Tensor:
    """The op contract on the extension's kernels. The CUDA kernels read ``x`` through its strides
    (channels-last as is); the CPU kernels take NCHW, so other layouts are made contiguous there."""
    return torch.ops.dcp.gathered_conv2d(
        x if x.is_cuda else x.contiguous(), weight.contiguous(), bias, in_idx, out_idx, list(stride),
        list(padding), list(dilation), groups > 1, x_compact, y_compact,
    )


def channel_utility(a: Tensor, g: Tensor) -> Tensor:
    """``sum_b |sum_hw g*a| / (B*H*W)`` per channel, float32, deterministic for any thread count.

    The kernels take one dtype; mixed inputs (autocast: a bf16 activation after an fp32 BN affine, or a
    bf16 gradient of an fp32 activation) are promoted first, as PyTorch's own ``g * a`` would be."""
    if a.dtype != g.dtype:
        common = torch.promote_types(a.dtype, g.dtype)
        a, g = a.to(common), g.to(common)
    return torch.ops.dcp.channel_utility(a, g)
