"""A converted model trained under ``torch.compile`` (CPU, inductor) equals eager training.

The only graph break allowed is the controller's forward pre-hook, which is
``torch.compiler.disable``-d on purpose: the selection (a sort) and the index vectors run eagerly
once per step and the compiled graph reads them. The conv ops themselves trace: the ``torch``
backend through its autograd.Function, the ``extension`` backend as a custom op with fake kernels
(checked with ``torch.library.opcheck`` in tests/test_extension.py).
Inductor compiles C++ here, so the model is tiny and trains two steps (one exploring, one selecting).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcp_kernels
from dcp_kernels import ops

BACKENDS = [b for b in ("torch", "extension") if ops.backends("cpu")[b]]


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )


def _train(model, prop, forward):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    record = []
    for step in range(2):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
        loss = F.cross_entropy(forward(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        record.append((loss.detach(), prop.utility_vector().clone(), torch.cat([l.selected for l in prop.layers])))
        if step == 0:
            prop.epoch_end()
    return record


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_matches_eager_without_graph_breaks_in_the_convs(backend):
    from torch._dynamo.utils import counters

    eager_model, compiled_model = _tiny(), _tiny()
    eager = dcp_kernels.convert(eager_model, 0.5, explore_epochs=1, backend=backend)
    compiled = dcp_kernels.convert(compiled_model, 0.5, explore_epochs=1, backend=backend)
    torch._dynamo.reset()
    counters.clear()
    want = _train(eager_model, eager, eager_model)
    got = _train(compiled_model, compiled, torch.compile(compiled_model, backend="inductor"))
    for (l_want, u_want, s_want), (l_got, u_got, s_got) in zip(want, got):
        torch.testing.assert_close(l_got, l_want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(u_got, u_want, rtol=1e-5, atol=1e-6)
        assert torch.equal(s_got, s_want)
    assert not s_want.all(), "the second step should prune"
    breaks = dict(counters["graph_break"])
    assert len(breaks) == 1 and "_SelectBeforeForward" in next(iter(breaks)), breaks
    for p_want, p_got in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_got, p_want, rtol=1e-5, atol=1e-6)
