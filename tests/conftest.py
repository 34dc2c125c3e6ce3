import os

import pytest
import torch

# No GPU here: run the Triton kernels in Triton's CPU interpreter, so every backend is tested against
# the reference on CPU tensors. Must be set before dcp_kernels first imports its Triton kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dcp_kernels import ops  # imported only after TRITON_INTERPRET is decided

# Devices the shared correctness grids run on: the CPU always, a CUDA GPU when one is visible.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fast_backends(device: str) -> list[str]:
    """Every backend other than the reference that runs on ``device`` here (on CPU: Triton through
    its interpreter)."""
    return [b for b, usable in ops.backends(device).items() if usable and b != "reference"]


def device_backend_params() -> list:
    """(device, backend) pairs for every fast backend on every device in DEVICES."""
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in fast_backends(d)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _exact_fp32_on_cuda():
    """fp32 comparisons against the reference are exact-arithmetic ones: no TF32 on the GPU (cuDNN and
    the Triton kernels both follow these flags)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def sorted_subset(n: int, k: int, generator_seed: int = 0) -> torch.Tensor:
    """k distinct channel indices of n, sorted (a reproducible random selection)."""
    g = torch.Generator().manual_seed(generator_seed)
    # Drawn on the CPU (the generator's device), then moved to the default device (CUDA inside the
    # GPU-only fixtures of test_triton.py).
    return torch.randperm(n, generator=g, device="cpu")[:k].sort().values.to(torch.get_default_device())


@torch.no_grad()
def assert_close_to_scale(actual, expected, rel=1e-4):
    """Equal up to ``rel`` of the values' scale (at least 1): float32 sums in another order (a
    sliced conv vs the gathered one) differ in the last bits, by how much depends on the CPU."""
    assert torch.isfinite(expected).all() and expected.abs().max() < 100, (
        f"ill-conditioned comparison: |values| up to {float(expected.abs().max()):.3g}; fix the setup")
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)
