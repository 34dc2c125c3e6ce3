"""What a PyTorch training loop does around a converted model: extra backward passes (a gradient
penalty), checkpoints of the original model, DistributedDataParallel with its default arguments."""
import copy
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from torch import nn

import dcp_kernels
from conftest import assert_close_to_scale
from test_compile import COUNTS_PROMISED


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


def _penalised_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prop=None) -> torch.Tensor:
    """Cross-entropy plus a gradient penalty on the input (WGAN-GP style), the penalty's backward in
    ``prop.no_utility_updates()`` when ``prop`` is given."""
    x = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), y)
    if prop is None:
        (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    else:
        with prop.no_utility_updates():
            (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    return loss + grad_x.square().sum(dim=(1, 2, 3)).mean()


def _batch(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("backend", ["reference"])
def test_gradient_penalty_gradients_equal_the_dense_models_while_every_channel_is_selected(backend):
    dense = _net()
    model = copy.deepcopy(dense)
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=1, backend=backend, example_inputs=(_batch(0)[0],))
    x, y = _batch(1)
    _penalised_loss(dense, x, y).backward()
    _penalised_loss(model, x, y, prop).backward()
    dense_grads = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        old = name.replace("0.norm.", "1.").replace("3.norm.", "4.").replace("6.norm.", "7.")
        # fp32, summed in another order: measured spread 3e-7 of the gradients' scale.
        assert_close_to_scale(p.grad, dense_grads[old].grad, rel=1e-4)


@pytest.mark.parametrize("backend", ["reference"])  # the one backend with double backward (next test)
def test_a_backward_inside_no_utility_updates_leaves_the_utilities_alone(backend):
    """One step with a gradient penalty: without the context the utilities are updated twice (the
    penalty's ``autograd.grad``, then the loss's backward), with it once. Checked without assuming
    the measurements: with ``n1`` the penalty pass's normalised measurement (from a run that stops
    after it) and ``n2`` the training backward's (the run with the context minus the decayed start),
    the run without it must hold ``d * (d * U0 + n1) + n2`` on the selected channels."""
    torch.manual_seed(0)
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, decay=0.6, backend=backend,
                               example_inputs=(_batch(0)[0],))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(2):  # non-zero, unequal utilities to start from
        opt.zero_grad()
        nn.functional.cross_entropy(model(_batch(10 + step)[0]), _batch(10 + step)[1]).backward()
        opt.step()
    x, y = _batch(2)
    start = (copy.deepcopy(model.state_dict()), prop.state_dict())

    def run(kind: str) -> dict[str, torch.Tensor]:
        model.load_state_dict(start[0])
        prop.load_state_dict(start[1])
        xr = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(xr), y)
        if kind == "penalty pass only":
            torch.autograd.grad(loss, xr, create_graph=True)
        else:
            with prop.no_utility_updates() if kind == "paused" else torch.enable_grad():
                (grad_x,) = torch.autograd.grad(loss, xr, create_graph=True)
            (loss + grad_x.square().sum()).backward()
        return {n: (u, layer.selected.clone()) for (n, u), layer in zip(prop.utilities().items(), prop.layers)}

    u0 = {n: t.clone() for n, t in zip(prop.layer_names, [layer.utility for layer in prop.layers])}
    paused, twice, first = run("paused"), run("unpaused"), run("penalty pass only")
    pending = prop.utility_updates._pending
    assert pending is None or not pending.requires_grad  # no create_graph pass left its graph in the buffer
    d = prop.decay
    for name, (u_paused, sel) in paused.items():
        assert torch.equal(sel, twice[name][1]) and not bool(sel.all())
        n2 = u_paused - d * u0[name]
        n1 = first[name][0] - d * u0[name]
        # one normalised measurement: its largest selected entry is 1 (float32 arithmetic: 1e-6)
        assert float(n2[sel].max()) == pytest.approx(1.0, abs=1e-5)
        assert_close_to_scale(twice[name][0][sel], (d * (d * u0[name] + n1) + n2)[sel], rel=1e-5)
        assert torch.equal(u_paused[~sel], u0[name][~sel])  # unselected channels untouched either way
        assert not torch.allclose(twice[name][0][sel], u_paused[sel])  # the two differ: the test can fail


def test_training_forwards_inside_no_utility_updates_keep_the_selection():
    """A sharpness-aware optimizer's second pass: forward and backward inside the context run on the
    step's selection and change no utility."""
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, example_inputs=(_batch(0)[0],))
    x, y = _batch(3)
    nn.functional.cross_entropy(model(x), y).backward()
    steps, utilities = prop.steps, prop.utilities()
    selection = [layer.selected.clone() for layer in prop.layers]
    with prop.no_utility_updates():
        nn.functional.cross_entropy(model(x * 0.5), y).backward()
    assert prop.steps == steps
    assert all(torch.equal(a, layer.selected) for a, layer in zip(selection, prop.layers))
    assert all(torch.equal(u, prop.utilities()[n]) for n, u in utilities.items())
    model(x)  # outside again: a selecting step
    assert prop.steps == steps + 1


@pytest.mark.slow
def test_no_utility_updates_names_a_compiled_backward_that_updated_inside_it():
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, backend="torch", example_inputs=(_batch(0)[0],))
    compiled = torch.compile(model, backend="aot_eager")
    x, y = _batch(4)
    nn.functional.cross_entropy(compiled(x), y).backward()  # compiles forward and backward
    loss = nn.functional.cross_entropy(compiled(x), y)
    before = prop.utilities()
    try:
        with prop.no_utility_updates():
            loss.backward()
    except RuntimeError as error:
        assert re.search("written inside no_utility_updates.*torch.compile", str(error)), error
    else:
        # torch < 2.14 compiles this model layer by layer (tests/test_compile.py): its backward
        # checks the pause eagerly, so the utilities must be untouched.
        assert not COUNTS_PROMISED, "a compiled backward's update went unnoticed"
        assert all(torch.equal(u, prop.utilities()[n]) for n, u in before.items())


# ----------------------------------------------------------------------------- original-layout checkpoints
def test_a_converted_model_loads_the_original_models_state_dict():
    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=7)
    with torch.no_grad():  # BN statistics and affine away from their defaults: a wrong key would show
        for m in dense.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    model = torchvision.models.resnet18(num_classes=7)  # other random weights
    prop = dcp_kernels.convert(model, 0.5, example_inputs=(torch.randn(2, 3, 32, 32),))
    for layer in prop.layers:
        layer.utility.uniform_()
    utilities = prop.utilities()
    renamed = [k for k in dense.state_dict() if k not in model.state_dict()]
    assert len(renamed) > 30  # the BNs convert() moved: layer1.0.bn1.* is layer1.0.conv1.norm.* now
    assert str(model.load_state_dict(dense.state_dict(), strict=True)) == "<All keys matched successfully>"
    assert all(torch.equal(u, prop.utilities()[n]) for n, u in utilities.items())  # DCP buffers kept
    x = torch.randn(3, 3, 32, 32)
    dense.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))  # every channel selected: the same network, the same ops
    model.train(), dense.train()
    with torch.no_grad():
        assert_close_to_scale(model(x), dense(x), rel=1e-5)  # exploring: batch statistics, measured 2e-7
    # its own layout still loads, and the finalized model keeps the original names and no DCP hook
    assert str(model.load_state_dict(copy.deepcopy(model.state_dict()))) == "<All keys matched successfully>"
    final = prop.finalize()
    assert set(final.state_dict()) == set(dense.state_dict()) and not final._load_state_dict_pre_hooks


def test_a_state_dict_holding_both_layouts_is_refused_by_strict_loading():
    model = _net()
    dcp_kernels.convert(model, 0.5, example_inputs=(_batch(0)[0],))
    both = {**_net().state_dict(), **model.state_dict()}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*1\.weight"):
        model.load_state_dict(both)


# ----------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STEPS = 5


def _ddp_worker(rank: int, port: int, out: str, ddp_kwargs: dict) -> None:
    """One rank: the user's code, nothing DCP-specific beyond convert()."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, example_inputs=(_batch(0)[0],))
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    selections, utilities = [], []
    for step in range(STEPS):
        x, y = _batch(100 * step + rank)  # each rank its own data
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        selections.append(torch.cat([layer.selected for layer in prop.layers]))
        utilities.append(torch.cat([layer.utility for layer in prop.layers]))  # this rank's own update
    torch.save({"selections": selections, "utilities": utilities}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _one_process_oracle() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The same training in one process: before each selection the utilities are the mean of what the
    two ranks' batches give from the same state; the gradients likewise (DDP's mean)."""
    torch.manual_seed(0)
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, example_inputs=(_batch(0)[0],))
    prop.auto_select = False
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    selections, means = [], []
    for step in range(STEPS):
        prop.step()
        start = [layer.utility.clone() for layer in prop.layers]
        measured = []
        opt.zero_grad()
        for rank in (0, 1):
            for layer, u in zip(prop.layers, start):
                layer.utility.copy_(u)
            x, y = _batch(100 * step + rank)
            (nn.functional.cross_entropy(model(x), y) / 2).backward()
            measured.append([layer.utility.clone() for layer in prop.layers])
        opt.step()
        for layer, a, b in zip(prop.layers, *measured):
            layer.utility.copy_((a + b) / 2)
        selections.append(torch.cat([layer.selected for layer in prop.layers]))
        means.append(torch.cat([layer.utility for layer in prop.layers]))
    return selections, means


@pytest.mark.parametrize("ddp_kwargs", [{}, {"broadcast_buffers": False}], ids=["default", "no-broadcast"])
def test_ddp_with_its_default_arguments_selects_the_same_channels_on_every_rank(tmp_path, ddp_kwargs):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # broadcast_buffers' deprecation notice, if this torch has one
        mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path), ddp_kwargs), nprocs=2, join=True)
    r0, r1 = (torch.load(Path(tmp_path) / f"rank{r}.pt") for r in (0, 1))
    oracle_selections, oracle_utilities = _one_process_oracle()
    for step in range(STEPS):
        assert torch.equal(r0["selections"][step], r1["selections"][step]), f"step {step}: ranks differ"
        assert step == 0 or not bool(r0["selections"][step].all())  # step 0: no utility measured yet
        assert torch.equal(r0["selections"][step], oracle_selections[step]), f"step {step}: not the oracle's"
        # averaged before the next selection: the mean of the two ranks' updates (float32 sums in
        # another order than DDP's bucketed gradient mean: measured spread 2e-7)
        assert_close_to_scale((r0["utilities"][step] + r1["utilities"][step]) / 2, oracle_utilities[step], rel=1e-4)
    assert not torch.equal(r0["utilities"][-1], r1["utilities"][-1])  # each rank measured its own data


def test_a_converted_convnext_loads_the_original_linear_weights():
    """ConvNeXt's MLP expansions become DCPTokenLinear (1x1-conv-shaped weights): the original 2-D
    Linear weights load into them, strictly."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    dense = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], layer_scale=0.5, num_classes=5)
    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], layer_scale=0.5, num_classes=5)
    with pytest.warns(UserWarning, match="left dense"):
        prop = dcp_kernels.convert(model, 0.5, example_inputs=(torch.randn(2, 3, 32, 32),))
    assert all(type(layer).__name__ == "DCPTokenLinear" for layer in prop.layers) and len(prop.layers) == 2
    assert str(model.load_state_dict(dense.state_dict())) == "<All keys matched successfully>"
    x = torch.randn(2, 3, 32, 32)
    model.eval(), dense.eval()
    with torch.no_grad():
        # a 1x1 conv against a Linear: the same products summed in another order (measured 6e-8)
        assert_close_to_scale(model(x), dense(x), rel=1e-5)


def test_the_compact_backend_refuses_double_backward_instead_of_dropping_terms():
    """Its autograd Functions save gathered weight blocks and batch statistics computed inside them, so
    a second derivative through them would miss terms (measured: gradients 1e-4 apart from the
    reference's in float64 with channels pruned): PyTorch's once_differentiable makes it an error."""
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, backend="torch", example_inputs=(_batch(0)[0],))
    for layer in prop.layers:
        layer.utility.uniform_()
    x, y = _batch(5)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        _penalised_loss(model, x, y, prop).backward()
