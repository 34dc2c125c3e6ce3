"""The test-only C++ extension: the CPU emulation of CUDA (csrc/emulation/) with the fused CUDA kernels
compiled for it, registering ``dcp::implicit_gemm_conv2d[_backward]`` on CPU tensors and
``dcp::_emulation_selftest``. Not part of the ``_C`` users install (setup.py leaves csrc/emulation/ out);
built here on first use with ``torch.utils.cpp_extension.load`` (cached under
``~/.cache/torch_extensions``: 25 s the first time on 2 cores, then a load).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _has_cpu_kernels() -> bool:
    """Whether the emulated ops are registered already (csrc/sanitize.sh compiles them into its _C)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("dcp::implicit_gemm_conv2d", "CPU")


@functools.cache
def load() -> None:
    """Register the emulated kernels (build the extension if needed). Needs ``dcp_kernels._C`` loaded
    first: it defines the ``dcp`` op schemas these kernels implement."""
    import dcp_kernels.ops.extension as extension

    if not extension.AVAILABLE:
        raise RuntimeError(f"the emulated kernels need the C++ extension: {extension.LOAD_ERROR}")
    if _has_cpu_kernels():
        return
    from torch.utils import cpp_extension

    cpp_extension.load(
        name="dcp_kernels_emulation",
        sources=[str(p) for p in sorted((CSRC / "emulation").glob("*.cpp"))],
        extra_cflags=["-O3", "-Wall", "-Wextra"],
        is_python_module=False,  # it only registers ops
        verbose=False,
    )
    assert _has_cpu_kernels(), "the emulation extension loaded but registered no CPU kernel"
