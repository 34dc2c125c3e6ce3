"""Faults survived by the library: a step the GradScaler skips (or a loop skips) leaves DCP's state alone.

The dcp-train side (divergence, damaged checkpoints, elastic restarts) is in test_train_faults.py.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcp_kernels


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
    )


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(n)]


def _train(order, batches, *, overflow_at=None, init_scale=2.0 ** 16, follow=True, decay=0.6):
    """SGD steps with the standard GradScaler recipe on batches ``order``; the loss of batch
    ``overflow_at`` is made infinite (its gradients inf/NaN: GradScaler skips that step)."""
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, decay=decay, example_inputs=(batches[0][0],))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    if follow:
        prop.use_grad_scaler(scaler)
    selections = []
    for i in order:
        x, y = batches[i]
        loss = F.cross_entropy(model(x), y)
        selections.append(torch.cat([layer.selected for layer in prop.layers]).clone())
        if i == overflow_at:
            loss = loss * float("inf")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    model(batches[0][0])  # the next step's selection (it settles the last step)
    selections.append(torch.cat([layer.selected for layer in prop.layers]).clone())
    return model, prop, selections, scaler


def test_a_step_the_grad_scaler_skips_is_as_if_its_batch_never_came():
    """fp32 under a GradScaler: scaling by a power of two is exact, so the run that met an overflowing
    batch equals, bit for bit, the run that never saw it (at the scale the first run fell back to):
    weights, utilities, selections and schedule; only BatchNorm's running statistics saw the batch."""
    batches = _batches(4)
    skipped, prop_s, sel_s, scaler = _train([0, 1, 2, 3], batches, overflow_at=1)
    assert scaler.get_scale() == 2.0 ** 15  # it did skip (and backed off once)
    never, prop_n, sel_n, _ = _train([0, 2, 3], batches, init_scale=2.0 ** 15)
    assert torch.equal(sel_s[1], sel_s[2])  # the step after the skipped one selects as the skipped one did
    assert all(torch.equal(a, b) for a, b in zip(sel_s[:1] + sel_s[2:], sel_n))
    state_s, state_n = skipped.state_dict(), never.state_dict()
    running = ("running_mean", "running_var", "num_batches_tracked")
    differ = [k for k in state_n if not torch.equal(state_s[k], state_n[k])]
    assert differ and all(k.endswith(running) for k in differ), differ
    assert all(torch.equal(a.utility, b.utility) for a, b in zip(prop_s.layers, prop_n.layers))
    assert (prop_s.epoch, prop_s.decay) == (prop_n.epoch, prop_n.decay)
    # Not following the scaler, the skipped step's update is applied: the utilities differ (the bug
    # this guards against: every selected channel decayed by d with nothing added).
    unguarded, prop_u, _, _ = _train([0, 1, 2, 3], batches, overflow_at=1, follow=False)
    assert not all(torch.equal(a.utility, b.utility) for a, b in zip(prop_u.layers, prop_n.layers))


def test_fp16_autocast_steps_the_scaler_skips_leave_the_utilities():
    """GradScaler's own overflows under fp16 autocast: at 2**40 and 2**32 any gradient above 2e-5
    overflows fp16, so at least the first two steps are skipped (the weights stay, the independent
    sign of a skip); the scale falls by 2**8 per skip, so by 2**8 or lower every later step happens.
    Each skipped step leaves the utilities exactly as they were, each step that happened changes them."""
    batches = _batches(8)
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, example_inputs=(batches[0][0],))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -8, growth_interval=1000)
    prop.use_grad_scaler(scaler)
    skipped = stepped = 0
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), y)
        before = [layer.utility.clone() for layer in prop.layers]  # after this step's selection
        weights = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        prop.skipped_steps.restore_if_skipped()  # what the next selection does first
        same = all(torch.equal(a, layer.utility) for a, layer in zip(before, prop.layers))
        if all(torch.equal(w, p) for w, p in zip(weights, model.parameters())):  # the optimizer skipped
            skipped += 1
            assert same, "a skipped step changed the utilities"
        else:
            stepped += 1
            assert not same, "a step that happened left every utility as it was"
        assert all(torch.isfinite(layer.utility).all() for layer in prop.layers)
    assert skipped >= 2 and stepped >= 3, (skipped, stepped)


def test_skip_step_undoes_the_step_under_way_and_state_dict_restores():
    batches = _batches(3)
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, example_inputs=(batches[0][0],))
    with pytest.raises(RuntimeError, match="no step is under way"):
        prop.skip_step()
    for x, y in batches[:2]:
        F.cross_entropy(model(x), y).backward()
    out = model(batches[2][0])  # the third step begins (its selection): these are its starting utilities
    start = [layer.utility.clone() for layer in prop.layers]
    F.cross_entropy(out, batches[2][1]).backward()
    assert not all(torch.equal(a, layer.utility) for a, layer in zip(start, prop.layers))
    prop.skip_step()
    assert all(torch.equal(a, layer.utility) for a, layer in zip(start, prop.layers))

    # A GradScaler's skip is in model.state_dict() taken after scaler.update(), before any selection.
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, example_inputs=(batches[0][0],))
    scaler = torch.amp.GradScaler("cpu")
    prop.use_grad_scaler(scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, (x, y) in enumerate(batches):
        loss = F.cross_entropy(model(x), y)
        start = [layer.utility.clone() for layer in prop.layers]
        scaler.scale(loss * (float("inf") if i == 2 else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
    saved = model.state_dict()
    assert all(torch.equal(a, saved[f"{name}.utility"]) for a, name in zip(start, prop.layer_names))


def _skip_once(model, prop, batches, overflow_at: int) -> list[torch.Tensor]:
    """GradScaler steps with an overflow at step ``overflow_at``; returns that step's starting utilities."""
    scaler = torch.amp.GradScaler("cpu")
    prop.use_grad_scaler(scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, (x, y) in enumerate(batches):
        loss = F.cross_entropy(model(x), y)
        if i == overflow_at:
            start = [layer.utility.clone() for layer in prop.layers]
            loss = loss * float("inf")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return start


def test_loaded_utilities_are_never_put_back_to_a_skipped_steps_snapshot():
    batches = _batches(3)
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, example_inputs=(batches[0][0],))
    _skip_once(model, prop, batches, overflow_at=2)
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in prop.layers:
        loaded_name = [n for n, l in zip(prop.layer_names, prop.layers) if l is layer][0]
        loaded[f"{loaded_name}.utility"] = torch.rand_like(layer.utility) + 0.5
    model.load_state_dict(loaded)  # a rollback to other state: the skipped step is over
    model(batches[0][0])  # the next selection: nothing restored over what was loaded
    assert all(torch.equal(layer.utility, loaded[f"{n}.utility"]) for n, layer in zip(prop.layer_names, prop.layers))
    with pytest.raises(RuntimeError, match="no step is under way"):
        prop.load_state_dict(prop.state_dict())
        prop.skip_step()


def test_skip_step_after_an_aborted_backward_and_saving_inside_no_utility_updates():
    batches = _batches(2)
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, example_inputs=(batches[0][0],))
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    out = model(batches[1][0])
    start = [layer.utility.clone() for layer in prop.layers]
    loss = F.cross_entropy(out, batches[1][1])

    def fail(grad):
        raise MemoryError("out of memory half-way through backward")

    handle = model[0].weight.register_hook(fail)  # the last layers' backward runs, then the first one fails
    with pytest.raises(MemoryError):
        loss.backward()
    handle.remove()
    assert prop.utility_updates._contributed  # the later layers' measurements wait, unapplied
    prop.skip_step()  # the measurements the aborted pass left pending are undone too
    model(batches[1][0])  # the next selection applies nothing of them
    assert all(torch.equal(a, layer.utility) for a, layer in zip(start, prop.layers))
    # A followed scaler's restore does not count as a write inside no_utility_updates().
    _skip_once(model, prop, batches, overflow_at=1)
    with prop.no_utility_updates():
        model.state_dict()
