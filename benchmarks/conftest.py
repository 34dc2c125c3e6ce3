"""Benchmark options.

``--quick`` runs only the benchmarks marked ``quick`` (small shapes: what CI runs to keep this
suite from rotting); without it those are deselected and the full-size benchmarks run.
"""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="run only the small, fast benchmark subset")


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: a small benchmark case run by --quick")


def pytest_collection_modifyitems(config, items):
    quick = config.getoption("--quick")
    keep = [item for item in items if (item.get_closest_marker("quick") is not None) == quick]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture
def quick(request) -> bool:
    return bool(request.config.getoption("--quick"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
