"""Static-shape training steps (``convert(..., backend="triton", static_shapes=True)``).

The step a CUDA graph can capture: the selection is read on the device only (masks and kept-first
permutations with device counts), every activation is full width, and the Triton kernels skip the
unselected channels by reading the kept counts from device memory. Checked here, in Triton's CPU
interpreter: the step trains exactly like the reference (selections, weights, BN statistics,
utilities); it reads nothing back to the host; and it runs the same aten ops with the same shapes
whatever is selected (what a captured graph replays). The capture itself needs a GPU
(``test_cuda_graph_replays_the_eager_steps``, run by benchmarks/gpu_check.sh).
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_close_to_scale
from test_convert import _train, small_vgg
from test_syncs import SyncCounter, _step
from test_zoo import BranchConcat
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dcp_kernels
import dcp_kernels.rule
from dcp_kernels import ops
from dcp_kernels.rule import kept_first

pytestmark = pytest.mark.skipif(not ops.backends()["triton"],
                                reason="Triton unavailable: not installed, or older than ops.MIN_TRITON")
# Tests that run the Triton kernels on CPU tensors: only in the interpreter (a GPU machine runs the
# CUDA cases instead).
needs_cpu_triton = pytest.mark.skipif(not ops.backends("cpu")["triton"],
                                      reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1")


class DepthwiseNet(nn.Module):
    """A MobileNet-style block: a depthwise conv follows the pruned channels of the conv before it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.pw(self.dw(self.stem(x))), 1).flatten(1))


MODELS = {
    "vgg": small_vgg,  # prunable convs with BN, a flatten classifier (DCPLinear)
    "concat": BranchConcat,  # concat reader, a conv without BN, a residual group, view-flatten head
    "depthwise": DepthwiseNet,
}
CONVERT = {"vgg": {}, "concat": {"prune_residual": True}, "depthwise": {}}


def _batches(steps, size, device, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g).to(device),
             torch.randint(0, 5, (batch,), generator=g).to(device)) for _ in range(steps)]


# On the CPU (the interpreter is slow) the two models that cover every layer kind; VGG on a GPU too.
TRAIN_CASES = [pytest.param(device, name, id=f"{name}-{device}") for device in DEVICES for name in MODELS
               if device != "cpu" or (name != "vgg" and ops.backends("cpu")["triton"])]


@pytest.mark.parametrize("device, name", TRAIN_CASES)
def test_static_step_trains_like_the_reference(device, name):
    """Selections equal at every step; weights, BN statistics and utilities equal to the reference's
    up to float rounding (measured: at most 7e-7 absolute on values of O(1), VGG and ResNet)."""
    torch.manual_seed(0)
    ref_model = MODELS[name]().to(device)
    fast_model = copy.deepcopy(ref_model)
    ref = dcp_kernels.convert(ref_model, 0.5, explore_epochs=1, backend="reference", **CONVERT[name])
    fast = dcp_kernels.convert(fast_model, 0.5, explore_epochs=1, backend="triton", static_shapes=True,
                               **CONVERT[name])
    shape = dict(size=8, batch=4) if device == "cpu" else dict(size=16)
    _, ref_hist = _train(ref_model, ref, 5, device=device, **shape)
    _, fast_hist = _train(fast_model, fast, 5, device=device, **shape)
    for step, (a, b) in enumerate(zip(ref_hist, fast_hist)):
        assert torch.equal(a, b), f"selection differs at step {step}"
    assert not ref_hist[-1].all(), "selection should prune after exploration"
    assert fast.kept() == ref.kept()
    for (key, want), got in zip(ref_model.state_dict().items(), fast_model.state_dict().values()):
        if want.is_floating_point():
            try:
                assert_close_to_scale(got, want, 1e-5)
            except AssertionError as error:
                raise AssertionError(f"{key}: {error}") from None
        else:
            assert torch.equal(got, want), key
    for layer in fast.layers:  # the device-side selection agrees with the mask it came from
        order, count = kept_first(layer.selected)
        assert torch.equal(layer.kept_order, order) and torch.equal(layer.kept_count, count)


class _OpTrace(TorchDispatchMode):
    """Every aten op a step dispatches, with the shapes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func), tuple(tuple(t.shape) for t in flat if isinstance(t, torch.Tensor))))
        return out


@needs_cpu_triton
def test_static_step_reads_nothing_on_the_host_and_runs_the_same_ops_whatever_is_selected(monkeypatch):
    """What a CUDA graph needs, checked on the CPU: in a selecting step no op reads a device value
    (no ``.item()``, ``nonzero``, boolean indexing, device-to-host copy, nor the library's batched
    count read), and two steps with different kept widths dispatch the same ops with the same shapes."""
    reads = []
    monkeypatch.setattr(dcp_kernels.rule, "host_read", lambda t: reads.append(t) or t.tolist())
    torch.manual_seed(0)
    model = BranchConcat()
    # decay 0: each step selects by its own batch's importances, so the kept widths move.
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=1, backend="triton", static_shapes=True,
                               prune_residual=True, decay=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    model.train()
    traces, kept = [], []
    for step, (x, y) in enumerate(_batches(6, 8, "cpu", batch=4)):
        counter, trace, reads_before = SyncCounter(), _OpTrace(), len(reads)
        with counter, trace:
            _step(model, opt, x, y)
        if step == 0:
            prop.epoch_end()
            continue
        assert counter.found == {}, f"step {step}: host reads {counter.found}"
        assert len(reads) == reads_before, f"step {step} read the kept counts"
        if step == 1:
            continue  # the first selecting step also builds the selection rule's device constants once
        traces.append(trace.ops)
        kept.append(prop.kept())  # read after the step, outside the trace
    assert len({tuple(k.values()) for k in kept}) > 1, f"the kept widths should change between steps: {kept}"
    for trace in traces[1:]:
        assert trace == traces[0]


def test_static_shapes_state_follows_selection_writes_and_state_dicts():
    """``kept_order``/``kept_count`` are derived state: rebuilt whenever ``selected`` is written by
    ``set_selection`` or a loaded state dict, and never saved."""
    torch.manual_seed(0)
    model = small_vgg()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, backend="triton", static_shapes=True)
    layer = prop.layers[1]
    mask = torch.zeros(layer.out_channels, dtype=torch.bool)
    mask[[1, 4, 5]] = True
    layer.set_selection(mask)
    assert layer.kept_order[:3].tolist() == [1, 4, 5] and layer.kept_count.item() == 3
    state = copy.deepcopy(model.state_dict())
    assert not any(key.endswith(("kept_order", "kept_count")) for key in state)
    layer.set_selection(torch.ones_like(mask))
    model.load_state_dict(state)
    assert layer.kept_order[:3].tolist() == [1, 4, 5] and layer.kept_count.item() == 3


def test_static_shapes_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="static_shapes=True needs backend 'torch' .capacity widths. or 'triton'"):
        dcp_kernels.convert(small_vgg(), 0.5, backend="reference", static_shapes=True)
    grouped = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with pytest.raises(ValueError, match="grouped convs have no 'triton' kernel"):
        dcp_kernels.convert(grouped, 0.5, backend="triton", static_shapes=True)
    assert not any(isinstance(m, dcp_kernels.DCPConv2d) for m in grouped.modules()), "refused: left untouched"
    model = small_vgg()
    prop = dcp_kernels.convert(model, 0.5, backend="triton", static_shapes=True)
    with pytest.raises(ValueError, match="static shapes run on backend 'torch' .capacity widths. or 'triton'"):
        prop.set_backend("reference")
    assert not prop.capacity and all(layer.backend == "triton" for layer in prop.layers), "refused: unchanged"
    prop.set_backend("torch")  # the static step follows: capacity widths
    assert prop.capacity and prop.static_shapes and not any(layer.static_shapes for layer in prop.layers)
    prop.layers[0].static_shapes = True  # a layer left on the full-width step by hand
    with pytest.raises(RuntimeError, match="static shapes need backend 'triton'"):
        model.train()(torch.randn(2, 3, 8, 8))


def _graphable_step(model, opt):
    """A training step as GraphedStep takes it: forward, loss, backward, optimizer step (the caller
    resets the gradients); returns (loss, logits)."""
    def step(x, y):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        return loss, logits
    return step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_the_eager_steps():
    """A captured and replayed step trains exactly like the eager one (selections, weights, BN
    statistics, utilities), across a re-capture when exploration ends and one when the learning rate
    changes. Runs on a GPU (benchmarks/gpu_check.sh)."""
    graphed, _ = graphed_against_eager(small_vgg, dict(backend="triton", static_shapes=True), 12,
                                           lr_change_at=7, atol=1e-6)
    assert graphed.captures == 3 and graphed.replays >= 6, (graphed.captures, graphed.replays)


def graphed_against_eager(make, convert_kwargs, steps, *, lr_change_at=None, atol=1e-6):
    """Train two copies of ``make()`` on CUDA, one eagerly, one through GraphedStep (``warmup=2``),
    exploration ending after step 3 and the learning rate changing at ``lr_change_at``: losses and
    selections equal at every step, the state dicts at the end. Returns (GraphedStep, controllers)."""
    from dcp_kernels.cuda_graphs import GraphedStep

    torch.manual_seed(0)
    base = make().cuda()
    models = [copy.deepcopy(base).train() for _ in range(2)]
    props = [dcp_kernels.convert(m, 0.5, explore_epochs=1, **convert_kwargs) for m in models]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4) for m in models]
    eager = _graphable_step(models[0], opts[0])
    graphed = GraphedStep(_graphable_step(models[1], opts[1]), models[1], props[1], opts[1], warmup=2)
    for step, (x, y) in enumerate(_batches(steps, 16, "cuda")):
        opts[0].zero_grad(set_to_none=True)
        want, _ = eager(x, y)
        got, _ = graphed(x, y)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(torch.cat([l.selected for l in props[0].layers]),
                           torch.cat([l.selected for l in props[1].layers])), f"step {step}"
        if step == 3:
            for prop in props:
                prop.epoch_end()
        if step == lr_change_at:
            for opt in opts:
                opt.param_groups[0]["lr"] = 0.02
    assert props[0].steps == props[1].steps
    for (key, want), got in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        if want.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(got, want), key
    return graphed, props


class _FakeGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on the CPU: ``replay()`` re-runs the captured step on the
    static inputs and writes its results into the static outputs, as a replay would."""

    graphed = None  # the GraphedStep under test

    def replay(self):
        g = _FakeGraph.graphed
        steps = g.prop.steps  # a replay runs no Python: the selection hook's counter does not move
        g.optimizer.zero_grad(set_to_none=True)  # a captured backward writes fresh gradients
        fresh = g._run(g._inputs)  # what the capture recorded: the step without an eager selection
        for static, value in zip(g._outputs, fresh):
            static.copy_(value)
        g.prop.steps = steps


class _FakeCapture:
    """Stands in for ``torch.cuda.graph(...)``: a capture records kernels without running them, so
    everything the step body changed (parameters, buffers, optimizer state) is put back on exit."""

    def __init__(self, graph, stream=None):
        g = _FakeGraph.graphed
        self.tensors = [t for _, t in list(g.model.named_parameters()) + list(g.model.named_buffers())]

    def __enter__(self):
        g = _FakeGraph.graphed
        self.saved = [t.detach().clone() for t in self.tensors]
        self.optimizer_state = copy.deepcopy(g.optimizer.state_dict())

    def __exit__(self, *exc):
        g = _FakeGraph.graphed
        with torch.no_grad():
            for t, saved in zip(self.tensors, self.saved):
                if not torch.equal(t, saved):  # a copy bumps the version, which caches key on
                    t.copy_(saved)
        g.optimizer.load_state_dict(self.optimizer_state)


class _NoStream:
    def wait_stream(self, other):
        pass


def stand_in_cuda_graphs(monkeypatch) -> None:
    """torch.cuda as GraphedStep uses it, on the CPU: streams that do nothing, _FakeGraph and
    _FakeCapture for the graph (set ``_FakeGraph.graphed`` to the GraphedStep under test)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "Stream", _NoStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: _NoStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _FakeCapture)


@needs_cpu_triton
def test_graphed_step_bookkeeping_with_a_stand_in_graph(monkeypatch):
    """GraphedStep's own logic, on the CPU with a stand-in for the CUDA graph (what a capture and a
    replay do is emulated, see _FakeCapture/_FakeGraph; the real capture is
    test_cuda_graph_replays_the_eager_steps, GPU only): eager warm-up calls, one capture, replays; a
    new capture after one eager step when the epoch or the learning rate changes; a batch of another
    shape runs eagerly; every call trains on its batch exactly once, so training equals eager
    training, and the controller counts every step."""
    from dcp_kernels import cuda_graphs

    stand_in_cuda_graphs(monkeypatch)

    torch.manual_seed(0)
    base = DepthwiseNet()
    models = [copy.deepcopy(base).train() for _ in range(2)]
    props = [dcp_kernels.convert(m, 0.5, explore_epochs=1, backend="triton", static_shapes=True) for m in models]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]

    graphed = cuda_graphs.GraphedStep(_graphable_step(models[1], opts[1]), models[1], props[1], opts[1], warmup=2)
    _FakeGraph.graphed = graphed
    batches = _batches(10, 8, "cpu", batch=4)
    batches[6] = tuple(t[:3] for t in batches[6])  # a short batch: eager
    eager = _graphable_step(models[0], opts[0])
    for step, (x, y) in enumerate(batches):
        opts[0].zero_grad(set_to_none=True)
        want, _ = eager(x, y)
        got, _ = graphed(x, y)
        assert torch.equal(got, want), f"step {step}"
        if step == 3:
            for prop in props:
                prop.epoch_end()
        if step == 7:
            for opt in opts:
                opt.param_groups[0]["lr"] = 0.02
    # eager 0, 1; capture (and replay) 2, replay 3; epoch: eager 4, capture 5, eager 6 (short),
    # replay 7; learning rate: eager 8, capture 9.
    assert (graphed.captures, graphed.replays) == (3, 5)
    assert props[0].steps == props[1].steps == 10
    for (key, want), got in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(got, want), key
