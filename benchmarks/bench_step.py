"""Step level: one whole training step (forward, backward, SGD step, utility update, selection).

Variants per network and prune ratio (one group each):
  dense      the network as built (nn.Conv2d), trained normally
  reference  converted with the paper's masked implementation
  torch      converted with our compact backend (compact activations between layers)
  ideal      the same network built dense with exactly the per-layer widths the selection kept
             (the finalized model): what perfect skipping costs. Global selection keeps layers
             unevenly, so this is not simply (1 - prune_ratio)**2 of dense.

The selection comes from two exploration steps on random data, then one selecting step.
``test_selection`` times ``prop.select()`` alone, to read its share of a step.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import dcp_kernels
from dcp_kernels.models import resnet_cifar, vgg

NETWORKS = {
    "vgg16-cifar": (lambda: vgg("vgg16"), 64, 32),  # (factory, batch, image size)
    "resnet56-cifar": (lambda: resnet_cifar(56), 64, 32),
}
QUICK_NETWORKS = {"tiny-vgg": (lambda: vgg([16, "M", 32, 32, "M", 64]), 8, 16)}
RATIOS = [0.0, 0.3, 0.5, 0.7]
QUICK_RATIOS = [0.5]
VARIANTS = ["dense", "reference", "torch", "ideal"]

_CACHE: dict = {}


def _batch(n, size, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def _sgd_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _prepared(name, factory, batch, size, ratio, backend, device):
    """A converted copy of the network after exploration, with its first selection made."""
    key = (name, ratio, backend, str(device))
    if key not in _CACHE:
        torch.manual_seed(0)
        model = factory().to(device)
        prop = dcp_kernels.convert(model, ratio, explore_epochs=1, backend=backend)
        for seed in (1, 2):  # two exploration steps
            _sgd_step(model, *_batch(batch, size, device, seed))()
        prop.epoch_end()
        _sgd_step(model, *_batch(batch, size, device, 3))()  # first selecting step
        _CACHE.clear()  # keep at most one prepared network alive (memory)
        _CACHE[key] = (model, prop)
    return _CACHE[key]


def _networks(table, ratios, marks=()):
    return [pytest.param(name, ratio, id=f"{name}-prune{ratio}", marks=marks)
            for name in table for ratio in ratios]


CASES = _networks(NETWORKS, RATIOS) + _networks(QUICK_NETWORKS, QUICK_RATIOS, marks=pytest.mark.quick)
ALL_NETWORKS = {**NETWORKS, **QUICK_NETWORKS}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name, ratio", CASES)
def test_training_step(benchmark, quick, device, timed, name, ratio, variant):
    factory, batch, size = ALL_NETWORKS[name]
    x, y = _batch(batch, size, device, 4)
    if variant == "dense":
        torch.manual_seed(0)
        model = factory().to(device)
    elif variant == "ideal":
        model, prop = _prepared(name, factory, batch, size, ratio, "torch", device)
        model = copy.deepcopy(prop.finalize())
    else:
        model, prop = _prepared(name, factory, batch, size, ratio, variant, device)
    model.train()
    benchmark.group = f"step {name} batch={batch} {size}x{size} prune={ratio}"
    benchmark.extra_info.update(level="step", model=name, prune_ratio=ratio, variant=variant,
                                device=str(device), threads=torch.get_num_threads())
    if variant != "dense":
        benchmark.extra_info["kept"] = dict(prop.kept())
        benchmark.extra_info["flops_ratio"] = prop.flops_ratio()
    benchmark.pedantic(timed(_sgd_step(model, x, y)), rounds=3 if quick else 6,
                       warmup_rounds=1 if quick else 2, iterations=1)


@pytest.mark.parametrize("name, ratio", [c for c in CASES if c.values[1] > 0])
def test_selection(benchmark, quick, device, timed, name, ratio):
    """``prop.select()`` alone (one stable sort over all utilities + writing the masks)."""
    factory, batch, size = ALL_NETWORKS[name]
    _, prop = _prepared(name, factory, batch, size, ratio, "torch", device)
    benchmark.group = f"selection {name} prune={ratio}"
    benchmark.extra_info.update(level="selection", model=name, prune_ratio=ratio, variant="selection",
                                device=str(device), channels=prop.total_channels)
    benchmark.pedantic(timed(prop.select), rounds=20, warmup_rounds=2, iterations=5)
