import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sorted_subset(n: int, k: int, generator_seed: int = 0) -> torch.Tensor:
    """k distinct channel indices of n, sorted (a reproducible random selection)."""
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randperm(n, generator=g)[:k].sort().values
