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
    """GradScaler's own overflows: under fp16 autocast with an initial scale far too large, the first
    steps overflow and are skipped; each leaves the utilities exactly as they were, each stepped one
    changes them."""
    batches = _batches(10)
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, example_inputs=(batches[0][0],))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 22, growth_interval=1000)
    prop.use_grad_scaler(scaler)
    skipped = stepped = 0
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), y)
        before = [layer.utility.clone() for layer in prop.layers]  # after this step's selection
        scale = scaler.get_scale()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        prop.skipped_steps.settle()  # what the next selection does first
        same = all(torch.equal(a, layer.utility) for a, layer in zip(before, prop.layers))
        if scaler.get_scale() < scale:
            skipped += 1
            assert same, "a skipped step changed the utilities"
        else:
            stepped += 1
            assert not same, "a step that happened left every utility as it was"
        assert all(torch.isfinite(layer.utility).all() for layer in prop.layers)
    assert skipped >= 2 and stepped >= 2, (skipped, stepped)


def test_skip_step_undoes_the_step_under_way_and_state_dict_settles():
    batches = _batches(3)
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, example_inputs=(batches[0][0],))
    with pytest.raises(RuntimeError, match="no step has begun"):
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
