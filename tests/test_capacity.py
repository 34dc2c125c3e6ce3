"""Capacity widths (``convert(..., backend="torch", static_shapes=True)``, docs/algorithm.md "Static
capacity widths"): compact tensors of a fixed number of slots per layer, padded with unselected
channels whose outputs are masked to zero.

Checked here: the step trains like the reference (losses, utilities, selections, weights, BN
statistics) over 21 selecting steps, capacities growing on the way; once the capacities settle every
convolution runs at the same shapes step after step while the selection changes on every step (the
exact path's shapes change with it); under ``torch.compile`` no graph is compiled in the steady state;
a resumed run keeps its capacities; bad arguments get one-line errors.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale
from test_convert import _GroupedNet, small_resnet, small_vgg
from test_static_shapes import DepthwiseNet
from test_zoo import BranchConcat, _small_convnext
from torch import nn
from zoo_layers import NormZooNet, ZooConvNet
from torch.utils._python_dispatch import TorchDispatchMode

import dcp_kernels
from dcp_kernels.models import vgg
from dcp_kernels.rule import capacity_for


class _GroupedHead(nn.Module):
    """_GroupedNet (a grouped conv after a prunable conv, a grouped conv reading a concat) with BN
    after its last conv and a 5-way head, so the reference and capacity runs train alike."""

    def __init__(self):
        super().__init__()
        self.net = _GroupedNet()
        self.net.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.net(x)


MODELS = {
    "vgg": (small_vgg, {}),  # a flatten head (DCPLinear), compact activations between convs
    "resnet": (small_resnet, {"prune_residual": True}),  # residual groups pruned, compact sums
    "concat": (BranchConcat, {"prune_residual": True}),  # a concat reader, a conv without BN
    "depthwise": (DepthwiseNet, {}),  # a depthwise conv reading capacity slots
    "grouped": (_GroupedHead, {}),  # groups in blocks: full-width capacity
    "convnext": (_small_convnext, {}),  # token Linears (DCPTokenLinear) read by a DCPLinear
    "zoo-convs": (ZooConvNet, {"prune_residual": True}),  # weight-standardized and SAME-padded convs
    "zoo-norms": (NormZooNet, {"prune_residual": True}),  # GroupNorms (blocks: full width) and a GRN
}


def _train(model, prop, steps, size=12, batch=6, explore_steps=1, epoch_every=None, seed=0, device="cpu"):
    """(loss, utilities, selection, capacities) after every step; ``epoch_every``: call epoch_end
    every that many selecting steps too (capacities shrink there)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    record = []
    model.train()
    for step in range(steps):
        x = torch.randn(batch, 3, size, size, generator=g).to(device)
        y = torch.randint(0, 5, (batch,), generator=g).to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        record.append((loss.detach(), prop.utility_vector().clone(), torch.cat([l.selected for l in prop.layers]),
                       dict(prop.capacities())))
        if step + 1 == explore_steps or (epoch_every and step >= explore_steps and (step - explore_steps) %
                                         epoch_every == epoch_every - 1):
            prop.epoch_end()
    return record


@pytest.mark.parametrize("name, device", [pytest.param(n, "cpu", id=n) for n in MODELS] + [
    pytest.param(n, "cuda", id=f"{n}-cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA"))
    for n in ("vgg", "resnet")])
def test_capacity_step_trains_like_the_reference(name, device):
    """21 selecting steps (an epoch end every 7: capacities shrink there and grow again after).
    Tolerance: fp32 values of O(1), sums in another order; measured at most 2e-6 of the scale."""
    make, kwargs = MODELS[name]
    torch.manual_seed(0)
    ref_model = make().to(device)
    cap_model = copy.deepcopy(ref_model)
    ref = dcp_kernels.convert(ref_model, 0.5, explore_epochs=1, backend="reference", **kwargs)
    cap = dcp_kernels.convert(cap_model, 0.5, explore_epochs=1, backend="torch", static_shapes=True,
                              capacity_multiple=4, **kwargs)
    assert cap.capacity
    size = 16 if name == "convnext" else 12  # its stem strides by 4: 4x4 tokens, capacities that move
    want = _train(ref_model, ref, 22, size=size, epoch_every=7, device=device)
    got = _train(cap_model, cap, 22, size=size, epoch_every=7, device=device)
    for step, ((l_w, u_w, s_w, _), (l_g, u_g, s_g, caps)) in enumerate(zip(want, got)):
        assert torch.equal(s_g, s_w), f"selection differs at step {step}"
        assert_close_to_scale(l_g, l_w, 1e-5)
        assert_close_to_scale(u_g, u_w, 1e-5)
    assert not want[-1][2].all(), "the selection must prune after exploration"
    for (key, w), g in zip(ref_model.state_dict().items(), cap_model.state_dict().values()):
        if w.is_floating_point():
            try:
                assert_close_to_scale(g, w, 1e-5)
            except AssertionError as error:
                raise AssertionError(f"{key}: {error}") from None
        else:
            assert torch.equal(g, w), key
    history = [caps for *_, caps in got[1:]]
    kept = cap.kept()
    for layer_name, c in history[-1].items():
        assert kept[layer_name] <= c <= cap.layers[cap.layer_names.index(layer_name)].out_channels
    # Padding slots were really run (else this test would not test them); measured waste at the
    # end: VGG 1.13, ResNet 1.19, concat 1.07, depthwise 1.6, grouped 2.0 (blocks: full width),
    # ConvNeXt 1.19.
    assert cap.capacity_waste() > 1.0
    if name in ("vgg", "resnet", "concat", "convnext"):  # measured 2, 3, 1 and 4 changes (the others' never move)
        assert cap.capacity_changes >= 1, "a capacity must change during the run"


def test_padding_slots_hold_unselected_channels_and_output_zeros():
    torch.manual_seed(0)
    model = small_vgg()
    prop = dcp_kernels.convert(model, 0.6, explore_epochs=1, backend="torch", static_shapes=True,
                               capacity_multiple=8)
    _train(model, prop, 4)
    padded = 0
    for layer in prop.layers:
        idx, slots = layer.selected_indices(), layer.slot_state()
        assert idx.numel() == prop.capacities()[layer.dcp_name]
        assert torch.equal(idx, idx.unique()), "sorted, distinct slots"
        assert torch.equal(slots.selected, layer.selected[idx])
        assert int(slots.selected.sum()) == int(layer.selected.sum()), "every selected channel has a slot"
        assert torch.equal(slots.scale, slots.selected.float())
        padded += int((~slots.selected).sum())
    assert padded > 0
    # Outputs of unselected channels (padding or not) are exact zeros, as the reference's gate makes them.
    outputs = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, name=layer.dcp_name: outputs.__setitem__(name, o))
             for layer in prop.layers]
    model(torch.randn(2, 3, 12, 12))
    for hook in hooks:
        hook.remove()
    for layer in prop.layers:
        out = outputs[layer.dcp_name]
        if out.shape[1] == layer.out_channels:
            assert out[:, ~layer.selected].abs().max() == 0
        else:
            assert out[:, ~layer.slot_state().selected].abs().max() == 0


class _ConvShapes(TorchDispatchMode):
    """Records the (input, weight) shapes of every convolution, forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            self.shapes.append((str(func), tuple(a.shape for a in args[:3] if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def _shape_sets(model, prop, steps, size=12):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    sets, selections = [], []
    for step in range(steps):
        x, y = torch.randn(6, 3, size, size, generator=g), torch.randint(0, 5, (6,), generator=g)
        with _ConvShapes() as rec:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
        opt.step()
        sets.append(tuple(rec.shapes))
        selections.append(torch.cat([l.selected for l in prop.layers]).clone())
        if step == 0:
            prop.epoch_end()
    return sets, selections


def _wider_vgg():
    return vgg([16, "M", 32, 32, "M", 48], num_classes=5)


@pytest.mark.parametrize("make, kwargs", [(_wider_vgg, {}), (small_resnet, {"prune_residual": True})],
                         ids=["vgg", "resnet"])
def test_capacity_shapes_settle_while_the_selection_changes_every_step(make, kwargs):
    """18 steps. The exact path (the default) runs a new set of conv shapes on nearly every step
    (measured: 17 sets in 17 selecting steps for the VGG, 14 for the ResNet); with capacity widths,
    after the first selecting steps (capacities grow to fit the counts' swings; measured: the VGG's
    settle at step 3, the ResNet's at once) every step runs the same shapes while the selection
    changes on (nearly) every step."""
    torch.manual_seed(0)
    exact_model = make()
    cap_model = copy.deepcopy(exact_model)
    # decay 0.3: the utilities follow the latest batches, so the selection moves on every step.
    exact = dcp_kernels.convert(exact_model, 0.5, explore_epochs=1, decay=0.3, backend="torch", **kwargs)
    cap = dcp_kernels.convert(cap_model, 0.5, explore_epochs=1, decay=0.3, backend="torch", static_shapes=True,
                              **kwargs)
    exact_sets, exact_sel = _shape_sets(exact_model, exact, 18)
    cap_sets, cap_sel = _shape_sets(cap_model, cap, 18)
    assert all(torch.equal(a, b) for a, b in zip(exact_sel, cap_sel))
    changed = sum(not torch.equal(a, b) for a, b in zip(cap_sel[1:], cap_sel[2:]))
    assert changed >= 14, f"the selection must change on nearly every selecting step ({changed} of 16 did)"
    assert len(set(exact_sets[1:])) >= 10, "the exact path's shapes follow the kept widths"
    settled = cap_sets[6:]
    assert len(set(settled)) == 1, (f"{len(set(settled))} shape sets in the last {len(settled)} steps; "
                                    f"capacities changed {cap.capacity_changes} times")
    assert settled[0] != cap_sets[0], "settled below the full width"


@pytest.mark.slow
def test_capacity_widths_do_not_recompile_in_the_steady_state():
    """Under ``torch.compile`` (inductor) the capacity step compiles while capacities grow and then no
    more: static shapes, so every new selection reuses the graph. Equal to eager training. Measured:
    4 frames in 14 steps (the hook's caller, exploring, the first capacities, the one growth at step
    5), none in the 9 steps after."""
    from torch._dynamo.utils import counters
    from test_compile import _tiny

    eager_model, compiled_model = _tiny(), _tiny()
    eager = dcp_kernels.convert(eager_model, 0.5, explore_epochs=1, backend="torch", static_shapes=True,
                                capacity_multiple=4)
    compiled = dcp_kernels.convert(compiled_model, 0.5, explore_epochs=1, backend="torch", static_shapes=True,
                                   capacity_multiple=4)
    torch._dynamo.reset()
    counters.clear()
    forward = torch.compile(compiled_model, backend="inductor")
    want = _train(eager_model, eager, 14, size=8, batch=4)
    frames_at = []
    with torch._inductor.config.patch(fx_graph_cache=False):
        opt = torch.optim.SGD(compiled_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        g = torch.Generator().manual_seed(0)
        for step in range(14):
            x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
            loss = F.cross_entropy(forward(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert_close_to_scale(loss.detach(), want[step][0], 1e-5)
            assert torch.equal(torch.cat([l.selected for l in compiled.layers]), want[step][2])
            assert_close_to_scale(compiled.utility_vector(), want[step][1], 1e-5)
            frames_at.append((counters["frames"]["ok"], compiled.capacity_changes))
            if step == 0:
                compiled.epoch_end()
    print("frames compiled, capacity changes after each step:", frames_at)
    # After the last capacity change, not one more frame compiled.
    first_settled = min(i for i, (_, changes) in enumerate(frames_at) if changes == frames_at[-1][1])
    assert first_settled <= 8, f"capacities still changing at step {first_settled}: {frames_at}"
    assert frames_at[-1][0] == frames_at[first_settled][0], f"recompiled in the steady state: {frames_at}"
    selections = {tuple(w[2].tolist()) for w in want[first_settled + 1:]}
    assert len(selections) >= 2, "the selection must change in the steady state, or this shows nothing"


def test_capacities_grow_at_once_shrink_at_epoch_end_and_survive_state_dict():
    torch.manual_seed(0)
    model = small_vgg()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=1, backend="torch", static_shapes=True,
                               capacity_multiple=4)
    assert prop.capacities() == {} and prop.capacity_waste() is None  # nothing selected yet
    _train(model, prop, 5)
    caps, kept = prop.capacities(), prop.kept()
    sizes = {n: l.out_channels for n, l in zip(prop.layer_names, prop.layers)}
    for n in caps:
        assert kept[n] <= caps[n] <= sizes[n] and (caps[n] % 4 == 0 or caps[n] == sizes[n])
    assert prop.capacity_waste() == sum(caps.values()) / sum(kept.values())
    # Shrink: an epoch end fits every capacity to the largest count of the epoch.
    peaks = list(prop._peaks)
    prop.epoch_end()
    assert list(prop.capacities().values()) == [capacity_for(p, s, 4) for p, s in zip(peaks, sizes.values())]
    state = prop.state_dict()
    torch.manual_seed(0)
    other = small_vgg()
    resumed = dcp_kernels.convert(other, 0.5, explore_epochs=1, backend="torch", static_shapes=True,
                                  capacity_multiple=4)
    resumed.load_state_dict(state)
    assert resumed.capacities() == prop.capacities()
    assert capacity_for(9, 64, 8) == 16 and capacity_for(16, 64, 8) == 24 and capacity_for(60, 64, 8) == 64
    assert capacity_for(0, 64, 8) == 0 or capacity_for(1, 64, 8) == 8


def test_static_shapes_refuses_backends_without_capacity_widths():
    with pytest.raises(ValueError, match="static_shapes=True needs backend 'torch'"):
        dcp_kernels.convert(small_vgg(), 0.5, backend="reference", static_shapes=True)
    with pytest.raises(ValueError, match="capacity_multiple must be an int >= 1"):
        dcp_kernels.convert(small_vgg(), 0.5, backend="torch", static_shapes=True, capacity_multiple=0)


def _eager_and_graphed(make, *, explore_epochs, capacity_multiple, warmup):
    """Two copies of ``make()`` converted with capacity widths (residual groups pruned): one trained
    eagerly, one through GraphedStep (under the stand-in graph the caller installed). Returns
    (models, controllers, optimizers, eager step, GraphedStep)."""
    from test_static_shapes import _FakeGraph, _graphable_step

    from dcp_kernels import cuda_graphs

    torch.manual_seed(0)
    base = make()
    models = [copy.deepcopy(base).train() for _ in range(2)]
    props = [dcp_kernels.convert(m, 0.5, explore_epochs=explore_epochs, backend="torch", static_shapes=True,
                                 prune_residual=True, capacity_multiple=capacity_multiple) for m in models]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    graphed = cuda_graphs.GraphedStep(_graphable_step(models[1], opts[1]), models[1], props[1], opts[1],
                                      warmup=warmup)
    _FakeGraph.graphed = graphed
    return models, props, opts, _graphable_step(models[0], opts[0]), graphed


def test_graphed_capacity_step_with_a_stand_in_graph(monkeypatch):
    """GraphedStep on the capacity path, on the CPU with the stand-in CUDA graph of
    test_static_shapes.py (a replay re-runs what the capture recorded: the step without a selection;
    the real capture runs on a GPU, benchmarks/gpu_check.sh). The selection runs eagerly before every
    call; a capacity change or the end of exploration is a new capture after one eager step; every
    call trains on its batch once: training equals the eager capacity step's, bit for bit."""
    from test_static_shapes import _batches, stand_in_cuda_graphs

    stand_in_cuda_graphs(monkeypatch)
    # A concat reader and a flatten head: derived index vectors.
    models, props, opts, eager, graphed = _eager_and_graphed(BranchConcat, explore_epochs=1, capacity_multiple=2,
                                                             warmup=2)
    capacities = []
    for step, (x, y) in enumerate(_batches(14, 8, "cpu", batch=4)):
        opts[0].zero_grad(set_to_none=True)
        want, _ = eager(x, y)
        got, _ = graphed(x, y)
        assert torch.equal(got, want), f"step {step}"
        assert torch.equal(torch.cat([l.selected for l in props[0].layers]),
                           torch.cat([l.selected for l in props[1].layers])), f"step {step}"
        capacities.append(tuple(props[1].capacities().values()))
        if step == 3:
            for prop in props:
                prop.epoch_end()
    # eager 0, 1; capture (and replay) 2; replay 3; exploration ended: eager 4 (first capacities);
    # they grew at 5, a setting no eager step has run in (cuDNN never planned its shapes): eager 5,
    # capture 6, replay 7; grew at 8: eager 8, capture 9; replay 10-13.
    changed_at = [i for i in range(5, 14) if capacities[i] != capacities[i - 1]]
    assert changed_at == [5, 8], capacities
    assert (graphed.captures, graphed.replays) == (3, 9)
    assert props[0].steps == props[1].steps == 14
    for (key, want), got in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(got, want), key


def test_graphed_step_recaptures_when_a_constant_of_the_graph_changes(monkeypatch):
    """Momentum, weight decay and BatchNorm momentum are kernel arguments a graph holds: changing one
    is one eager step in the new setting, then a new capture; training equals the eager step's, bit
    for bit (the stand-in graph of test_static_shapes.py)."""
    from test_static_shapes import _batches, stand_in_cuda_graphs

    stand_in_cuda_graphs(monkeypatch)
    models, props, opts, eager, graphed = _eager_and_graphed(small_resnet, explore_epochs=0, capacity_multiple=16,
                                                             warmup=1)
    changes = {3: lambda opt, model: opt.param_groups[0].update(momentum=0.5),
               6: lambda opt, model: opt.param_groups[0].update(weight_decay=1e-3),
               9: lambda opt, model: setattr(model.layer1[0].conv1.norm, "momentum", 0.3)}
    modes = []
    for step, (x, y) in enumerate(_batches(12, 8, "cpu", batch=4)):
        if step in changes:
            for opt, model in zip(opts, models):
                changes[step](opt, model)
        captures, replays = graphed.captures, graphed.replays
        opts[0].zero_grad(set_to_none=True)
        want, _ = eager(x, y)
        got, _ = graphed(x, y)
        assert torch.equal(got, want), f"step {step}"
        modes.append("capture" if graphed.captures > captures else "replay" if graphed.replays > replays else "eager")
    # warm-up 0; capture 1 (the first step selected every channel: the capacities are the full widths
    # and hold); then each change: eager, capture, replay.
    assert modes == ["eager", "capture", "replay"] + ["eager", "capture", "replay"] * 3, modes
    for (key, want), got in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(got, want), key


def test_graphed_step_keys_cpu_tensor_learning_rates_by_value_and_warns_when_it_never_captures(monkeypatch):
    """SGD reads a CPU tensor learning rate into a kernel argument: a scheduler's in-place write is a
    new setting (eager, then a new capture), not a replay of the old rate. A setting that changes on
    every call never captures, and says so once."""
    from test_static_shapes import _batches, stand_in_cuda_graphs

    stand_in_cuda_graphs(monkeypatch)
    models, props, opts, eager, graphed = _eager_and_graphed(small_resnet, explore_epochs=0, capacity_multiple=16,
                                                             warmup=1)
    for opt in opts:
        opt.param_groups[0]["lr"] = torch.tensor(0.05)
    batches = list(_batches(9, 8, "cpu", batch=4))
    for step, (x, y) in enumerate(batches):
        if step in (3, 5, 6, 7, 8):  # 3: one change; 5-8: a change on every call
            for opt in opts:
                opt.param_groups[0]["lr"].fill_(0.05 / (step + 1))
        opts[0].zero_grad(set_to_none=True)
        if step == 7:
            with pytest.warns(UserWarning, match="changed on 3 calls in a row"):
                got, _ = graphed(x, y)
        else:
            got, _ = graphed(x, y)
        want, _ = eager(x, y)
        assert torch.equal(got, want), f"step {step}"
    # eager 0, capture 1, replay 2; lr changed: eager 3, capture 4; eager 5-8.
    assert (graphed.captures, graphed.replays) == (2, 3)
    for (key, want), got in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(got, want), key


def test_selection_writes_slot_vectors_in_place_while_capacities_hold():
    """What a captured capacity step needs (``slots_in_place``, set by GraphedStep): every selection
    with unchanged capacities writes the same slot tensors (same storage), and the derived ones (a
    concat's) are built afresh while a graph is being captured."""
    torch.manual_seed(0)
    model = BranchConcat()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=1, backend="torch", static_shapes=True,
                               prune_residual=True, capacity_multiple=16)
    prop.slots_in_place = True  # as GraphedStep sets it
    record = _train(model, prop, 6, size=8, batch=4)
    pointers = [(l.selected_indices().data_ptr(), l.slot_state().scale.data_ptr()) for l in prop.layers]
    caps = prop.capacities()
    g = torch.Generator().manual_seed(5)
    for layer in prop.layers:
        layer.utility.copy_(torch.rand(layer.out_channels, generator=g))
    prop.step()
    assert prop.capacities() == caps
    assert not torch.equal(torch.cat([l.selected for l in prop.layers]), record[-1][2]), "a new selection"
    assert pointers == [(l.selected_indices().data_ptr(), l.slot_state().scale.data_ptr()) for l in prop.layers]
    concat = next(m.input_source for m in model.modules()
                  if type(getattr(m, "input_source", None)).__name__ == "ConcatSource")
    cached = concat.selected_indices()
    assert concat.selected_indices() is cached
    import dcp_kernels.modules as modules
    original = modules._capturing
    modules._capturing = lambda: True
    try:
        rebuilt = concat.selected_indices()
    finally:
        modules._capturing = original
    assert rebuilt is not cached and torch.equal(rebuilt, cached)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", ["vgg", "resnet", "concat", "convnext"])
def test_cuda_graph_replays_the_eager_capacity_steps(name):
    """A captured and replayed capacity step trains like the eager one (selections, weights, BN
    statistics, utilities), across the end of exploration and capacity changes. GPU only
    (benchmarks/gpu_check.sh); fp32 without TF32 (conftest)."""
    from test_static_shapes import graphed_against_eager

    make, kwargs = MODELS[name]
    graphed, _ = graphed_against_eager(
        make, dict(backend="torch", static_shapes=True, capacity_multiple=4, **kwargs), 14, atol=1e-5)
    assert graphed.captures >= 2 and graphed.replays >= 6, (graphed.captures, graphed.replays)


def test_two_forwards_before_one_backward():
    """Without ``slots_in_place`` (the default) each selection makes fresh slot vectors, so tensors a
    forward saved stay valid when a second training forward selects again before the backward (two
    augmented views, one loss); the gradients equal the exact path's."""
    torch.manual_seed(0)
    exact_model = small_vgg()
    cap_model = copy.deepcopy(exact_model)
    props = [dcp_kernels.convert(m, 0.5, explore_epochs=1, backend="torch", static_shapes=static)
             for m, static in ((exact_model, False), (cap_model, True))]
    _train(exact_model, props[0], 4)
    _train(cap_model, props[1], 4)
    g = torch.Generator().manual_seed(7)
    views = [torch.randn(4, 3, 12, 12, generator=g) for _ in range(2)]
    y = torch.randint(0, 5, (4,), generator=g)
    for model in (exact_model, cap_model):
        model.zero_grad()
        sum(F.cross_entropy(model(v), y) for v in views).backward()
    for (name, p), q in zip(exact_model.named_parameters(), cap_model.parameters()):
        assert_close_to_scale(q.grad, p.grad, 1e-5), name
