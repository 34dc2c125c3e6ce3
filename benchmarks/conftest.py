"""Benchmark options. ``--quick`` runs the smallest shapes only (what CI runs to keep this suite alive)."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="run a fast subset of the benchmarks")


@pytest.fixture
def quick(request) -> bool:
    return bool(request.config.getoption("--quick"))


@pytest.fixture(autouse=True)
def _fixed_threads():
    # Every variant of a group runs with the same thread count so the ratios are comparable.
    torch.manual_seed(0)
    yield
