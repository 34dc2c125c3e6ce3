"""Compact residual streams: coupled groups (residual sums, squeeze-excitation products, stochastic
depth) travel compact between their producers and readers, never widened to full width.

Checked here: every residual group of ResNet-50, MobileNetV2 and RegNetY converts compact, and in a
selecting step every prunable layer outputs exactly its kept (or capacity) width; the compact step
trains like the reference (losses, selections, utilities, weights, BN statistics) over 21 selecting
steps, with exact and with capacity widths, on ResNet-50, MobileNetV2 and random residual CNNs.

Tolerances: the nets run in float64. In float32 a ReLU whose input lies within rounding of 0 flips
between the two paths (a compact conv sums in another order than the masked dense one), which moves
that element's gradient by its full value: ResNet-50 at 64 px, batch 8 showed gradients 0.4-8% apart
after one selecting step while the loss agreed to 1e-7, and float64 agreed to 1e-12. Utilities are
float32 in every dtype.
"""
import copy
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dcp_kernels

torchvision = pytest.importorskip("torchvision")


class _Block(nn.Module):
    """A residual block: basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) main branch, optional
    squeeze-excitation on its output and stochastic depth, a 1x1 projection shortcut where the
    shape changes."""

    def __init__(self, rng: random.Random, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        mid = rng.choice([4, 6, 8])
        if rng.random() < 0.5:
            layers = [nn.Conv2d(c_in, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                      nn.Conv2d(mid, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)]
        else:
            layers = [nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                      nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                      nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.main = nn.Sequential(*layers)
        self.se = None
        if rng.random() < 0.5:
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_out, 4, 1), nn.ReLU(), nn.Conv2d(4, c_out, 1),
                                    nn.Sigmoid())
        self.drop = torchvision.ops.StochasticDepth(rng.choice([0.0, 0.2]), "row")
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.main(x)
        if self.se is not None:
            y = y * self.se(y)
        y = self.drop(y)
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class RandomResidualNet(nn.Module):
    """A random residual CNN (seeded): a stem, optionally max-pooled, 2-3 stages of 1-2 blocks each,
    then global average pooling and a Linear head."""

    def __init__(self, seed: int, classes: int = 5) -> None:
        super().__init__()
        rng = random.Random(seed)
        width = rng.choice([6, 8])
        stem = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        if rng.random() < 0.5:
            stem.append(nn.MaxPool2d(2))
        self.stem = nn.Sequential(*stem)
        blocks = []
        for stage in range(rng.randint(2, 3)):
            c_out = width * rng.choice([1, 2])
            for b in range(rng.randint(1, 2)):
                blocks.append(_Block(rng, width, c_out, 2 if stage and not b else 1))
                width = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def _mobilenet_v2():
    model = torchvision.models.mobilenet_v2(num_classes=5, width_mult=0.25)
    model.classifier[0].p = 0.0  # dropout at the compact width draws other masks than at full width
    return model


NETS = {  # name -> (factory, image size, dtype)
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=5), 16, torch.float64),
    "mobilenet_v2": (_mobilenet_v2, 32, torch.float64),
    **{f"random-{seed}": ((lambda seed=seed: RandomResidualNet(seed)), 16, torch.float64) for seed in range(3)},
}


def _residual_producers(prop) -> list[str]:
    """The producers of coupled groups whose channels pass through no depthwise conv or BatchNorm left
    in place (those run full width: MobileNetV2's first block)."""
    channelwise = {producer for segments in prop.plan.channelwise.values() for producer, _ in segments}
    return [n for members in prop.plan.groups if len(members) > 1 and members[0] not in channelwise for n in members]


@pytest.mark.parametrize("make", [lambda: torchvision.models.resnet50(num_classes=5), _mobilenet_v2,
                                  lambda: torchvision.models.regnet_y_400mf(num_classes=5)],
                         ids=["resnet50", "mobilenet_v2", "regnet_y_400mf"])
def test_residual_groups_convert_compact(make):
    model = make()
    prop = dcp_kernels.convert(model, 0.5, prune_residual=True, backend="torch")
    producers = _residual_producers(prop)
    assert producers, "the net must have coupled groups"
    layers = dict(zip(prop.layer_names, prop.layers))
    wide = [n for n in producers if not layers[n].compact_output]
    assert not wide, f"coupled-group producers left full width: {wide[:5]}"


@pytest.mark.parametrize("static_shapes", [False, True], ids=["exact", "capacity"])
def test_selecting_step_never_widens_the_residual_stream(static_shapes):
    """Every prunable layer's output holds its index vector's channels only (kept count, or the
    capacity under capacity widths), in the forward of a selecting step."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=5)
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, prune_residual=True, backend="torch",
                               static_shapes=static_shapes, capacity_multiple=8)
    model.train()  # utilities are all 0 (every channel selected) until this first step measures them
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    widths: dict[str, int] = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, name=name: widths.__setitem__(name, o.shape[1]))
             for name, layer in zip(prop.layer_names, prop.layers)]
    model(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    kept = prop.kept()
    expected = prop.capacities() if static_shapes else kept
    assert any(kept[n] < layer.out_channels for n, layer in zip(prop.layer_names, prop.layers)), "must prune"
    assert widths == expected


def _assert_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """Equal up to ``rel`` of ``want``'s largest magnitude, or of 1 where that is smaller: gradients
    of convs before a BatchNorm of a few values reach 1e3 at these tiny batches, and gradients that
    are 0 in exact arithmetic (a BN bias whose shift the next BN removes) hold rounding noise."""
    assert torch.isfinite(want).all(), f"{what}: non-finite values; fix the setup"
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}")


def _step(model, x, y, seed):
    """Loss, parameter gradients and the DCP/BN state after one forward and backward of ``model``."""
    torch.manual_seed(seed)  # the same stochastic-depth draws in both models
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("static_shapes", [False, True], ids=["exact", "capacity"])
@pytest.mark.parametrize("net", list(NETS))
def test_compact_residual_step_trains_like_the_reference(net, static_shapes):
    """One exploring step, then 21 selecting steps, compact residual groups against the reference's
    masked full-width ones. Each step starts both models from the reference's state (weights, BN
    statistics, utilities): free-running, deep nets drift apart at rounding level until a near-tie
    in the selection flips, which says nothing about correctness (tests/test_zoo.py). The capacity
    run keeps its own capacities across steps (they grow and shrink as its selection moves).
    Tolerance 1e-5 of the scale (utilities are float32: they agree to about 5e-7)."""
    make, size, dtype = NETS[net]
    torch.manual_seed(0)
    ref_model = make().to(dtype)
    fast_model = copy.deepcopy(ref_model)
    ref = dcp_kernels.convert(ref_model, 0.5, explore_epochs=1, backend="reference", prune_residual=True)
    fast = dcp_kernels.convert(fast_model, 0.5, explore_epochs=1, backend="torch", prune_residual=True,
                               static_shapes=static_shapes, capacity_multiple=4)
    layers = dict(zip(fast.layer_names, fast.layers))
    assert all(layers[n].compact_output for n in _residual_producers(fast))
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    ref_model.train()
    fast_model.train()
    for step in range(22):
        fast_model.load_state_dict(ref_model.state_dict())
        x = torch.randn(4, 3, size, size, generator=g).to(dtype)
        y = torch.randint(0, 5, (4,), generator=g)
        l_w, grads_w, state_w = _step(ref_model, x, y, step)
        l_g, grads_g, state_g = _step(fast_model, x, y, step)
        assert torch.equal(torch.cat([l.selected for l in fast.layers]), torch.cat([l.selected for l in ref.layers])), (
            f"selection differs at step {step}")
        assert_close_to_scale(l_g, l_w, 1e-5)
        assert grads_g.keys() == grads_w.keys()
        for key, w in grads_w.items():
            _assert_close(grads_g[key], w, 1e-5, f"step {step}: gradient of {key}")
        for key, w in state_w.items():  # weights, BN statistics, utilities, selections
            if w.is_floating_point():
                _assert_close(state_g[key], w, 1e-5, f"step {step}: {key}")
            else:
                assert torch.equal(state_g[key], w), f"step {step}: {key}"
        opt.step()
        if step == 0:
            ref.epoch_end()
            fast.epoch_end()
    assert not torch.cat([l.selected for l in ref.layers]).all(), "the selection must prune after exploration"
    if static_shapes:
        assert fast.capacity_waste() > 1.0, "padding slots must really run"


class _ConvOperandFormats(TorchDispatchMode):
    """Records, for every convolution forward and backward, whether each 4-D operand is channels_last."""

    def __init__(self):
        super().__init__()
        self.not_channels_last: list[str] = []
        self.convs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            self.convs += 1
            for i, t in enumerate(args[:3]):
                if isinstance(t, torch.Tensor) and t.dim() == 4 and not t.is_contiguous(
                        memory_format=torch.channels_last):
                    self.not_channels_last.append(f"{func.__name__} operand {i} {tuple(t.shape)}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("static_shapes", [False, True], ids=["exact", "capacity"])
def test_channels_last_step_keeps_every_conv_operand_channels_last(static_shapes):
    """A channels_last ResNet-50 (residual groups compact) in a selecting step: every operand of every
    convolution, forward and backward (inputs, gathered weight blocks, output gradients), is
    channels_last, so cuDNN transposes nothing; gradients and utilities equal the NCHW step's (in
    float64, as above: float32 ReLU flips would blur the comparison)."""
    torch.manual_seed(0)
    models = [torchvision.models.resnet50(num_classes=5).double()]
    models.append(copy.deepcopy(models[0]).to(memory_format=torch.channels_last))
    props = [dcp_kernels.convert(m, 0.5, explore_epochs=1, prune_residual=True, backend="torch",
                                 static_shapes=static_shapes, capacity_multiple=8) for m in models]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 64, 64, generator=g).double(), torch.tensor([0, 1])
    grads = []
    for model, prop, fmt in zip(models, props, (torch.contiguous_format, torch.channels_last)):
        model.train()
        F.cross_entropy(model(x.contiguous(memory_format=fmt)), y).backward()  # exploring: measures utilities
        prop.epoch_end()
        model.zero_grad()
        formats = _ConvOperandFormats()
        with formats:
            F.cross_entropy(model(x.contiguous(memory_format=fmt)), y).backward()
        grads.append(([p.grad for p in model.parameters()], prop.utility_vector()))
    assert not torch.cat([l.selected for l in props[1].layers]).all(), "the step must prune"
    assert formats.convs >= 2 * 53
    assert not formats.not_channels_last, formats.not_channels_last[:5]
    for got, want in zip([*grads[1][0], grads[1][1]], [*grads[0][0], grads[0][1]]):
        _assert_close(got, want, 1e-5, "channels_last against NCHW")


class _Ratio(nn.Module):
    """conv -> BN -> ReLU, then the activation divided (or multiplied) by an expression of itself."""

    def __init__(self, divide: bool):
        super().__init__()
        self.divide = divide
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = y / (y + 1.0) if self.divide else y * (y + 1.0)
        return self.head(y).mean((2, 3))


@pytest.mark.parametrize("divide", [False, True], ids=["product", "division"])
def test_division_by_channels_keeps_the_group_full_width(divide):
    """Under capacity widths padding slots hold zeros, and a division by them would send NaN to the
    readers: a group divided by its own channels runs full width; a product stays compact."""
    model = _Ratio(divide)
    prop = dcp_kernels.convert(model, 0.5, backend="torch")
    assert prop.layers[0].compact_output is not divide


def test_set_selection_on_one_member_selects_for_its_whole_coupled_group():
    """Coupled layers share one selection (their outputs are summed, compact tensors slot by slot):
    a mask set on one member is set on all of them, and the compact step equals the reference's."""
    torch.manual_seed(0)
    model = RandomResidualNet(0).double()
    prop = dcp_kernels.convert(model, 0.5, prune_residual=True, backend="torch")
    reference = copy.deepcopy(model)
    group = next(members for members in prop.plan.groups if len(members) > 1)
    layers = dict(model.named_modules())
    width = layers[group[0]].out_channels
    mask = torch.zeros(width, dtype=torch.bool)
    mask[torch.randperm(width)[: width // 2]] = True
    for net in (model, reference):
        dict(net.named_modules())[group[-1]].set_selection(mask)
    for name in group:
        assert torch.equal(layers[name].selected, mask), name
    for module in reference.modules():
        if isinstance(module, dcp_kernels.DCPConv2d):
            module.backend = "reference"
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():  # eval: the selection set above is used as it is (no selecting step)
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=1e-9, atol=1e-9)
