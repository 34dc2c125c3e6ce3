import os

import pytest
import torch

# No GPU here: run the Triton kernels in Triton's CPU interpreter, so every backend is tested against
# the reference on CPU tensors. Must be set before dcp_kernels first imports its Triton kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sorted_subset(n: int, k: int, generator_seed: int = 0) -> torch.Tensor:
    """k distinct channel indices of n, sorted (a reproducible random selection)."""
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randperm(n, generator=g)[:k].sort().values
