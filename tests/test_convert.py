"""convert() + training + finalize() on VGG and ResNet, reference backend as the oracle."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_close_to_scale, fast_backends
from torch import nn

import dcp_kernels
from dcp_kernels import DCPConv2d
from dcp_kernels.models import resnet_cifar, vgg
from dcp_kernels.modules import DCPLinear

# Every backend that runs on CPU tensors here (Triton through its interpreter).
FAST_BACKENDS = fast_backends("cpu")
SMALL_VGG = [8, "M", 16, 16, "M", 24]


def small_vgg():
    return vgg(SMALL_VGG, num_classes=5)


def small_resnet():
    return resnet_cifar(8, num_classes=5, width=6)


def _train(model, prop, steps, seed=0, size=16, explore_steps=1, device="cpu", batch=8):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for step in range(steps):
        x = torch.randn(batch, 3, size, size, generator=g).to(device)
        y = torch.randint(0, 5, (batch,), generator=g).to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(torch.cat([l.selected for l in prop.layers]).clone())
        if step + 1 == explore_steps:
            prop.epoch_end()
    return opt, history


def _model_cases():
    """(device, make, backend, compact) cases. Triton's CPU interpreter is slow: on CPU it trains VGG
    with compact activations and ResNet with full ones (the op tests cover both layouts of every
    kernel)."""
    for device in DEVICES:
        for backend in fast_backends(device):
            for make, name in ((small_vgg, "vgg"), (small_resnet, "resnet")):
                for compact in (True, False):
                    if backend == "triton" and device == "cpu" and compact != (name == "vgg"):
                        continue
                    layout = "compact-activations" if compact else "full-activations"
                    yield pytest.param(device, make, backend, compact, id=f"{device}-{layout}-{backend}-{name}")


@pytest.mark.parametrize("device, make, backend, compact", list(_model_cases()))
def test_backends_train_to_the_same_weights(device, make, backend, compact):
    """The reference backend on the same device is the oracle."""
    # Triton's CPU interpreter is ~100x slower than the kernels it emulates: smaller images there
    # (every layer and both activation layouts are still exercised).
    size = 8 if (backend == "triton" and device == "cpu") else 16
    torch.manual_seed(0)
    ref_model = make().to(device)
    fast_model = copy.deepcopy(ref_model)
    ref = dcp_kernels.convert(ref_model, 0.5, explore_epochs=1, backend="reference")
    fast = dcp_kernels.convert(fast_model, 0.5, explore_epochs=1, backend=backend, compact_activations=compact)
    _, ref_hist = _train(ref_model, ref, 6, size=size, device=device)
    _, fast_hist = _train(fast_model, fast, 6, size=size, device=device)
    for a, b in zip(ref_hist, fast_hist):
        assert torch.equal(a, b)
    assert not ref_hist[-1].all(), "selection should prune after exploration"
    for (name, p), q in zip(ref_model.state_dict().items(), fast_model.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("make", [small_vgg, small_resnet], ids=["vgg", "resnet"])
def test_finalize_gives_a_smaller_plain_model_with_equal_outputs(make):
    model = make()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=1)
    _train(model, prop, 4)
    plain = prop.finalize()
    assert not any(type(m).__module__ == "dcp_kernels.modules" for m in plain.modules())
    assert not any(isinstance(m, DCPConv2d) for m in plain.modules())
    assert not plain._forward_pre_hooks
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    assert n_params(plain) < n_params(model)
    model.eval(), plain.eval()
    x = torch.randn(4, 3, 16, 16)
    assert_close_to_scale(plain(x), model(x), rel=1e-5)
    # The finalized widths are the kept channel counts.
    for name, kept in prop.kept().items():
        assert plain.get_submodule(name).out_channels == kept
    # Finalizing keeps the last training selection and is idempotent.
    again = prop.finalize()
    torch.testing.assert_close(again.eval()(x), plain(x))


def test_resnet_prunes_only_channels_off_the_residual_path():
    model = small_resnet()
    prop = dcp_kernels.convert(model, 0.3)
    assert prop.layer_names == [f"layer{i}.0.conv1" for i in (1, 2, 3)]
    for name in ("conv1", "layer1.0.conv2", "layer2.0.shortcut.0"):
        assert "residual" in prop.plan.skipped[name] and name in prop.plan.policy
    # conv2 reads only the live outputs of conv1.
    assert model.layer1[0].conv2.input_source is model.layer1[0].conv1
    assert isinstance(model.layer1[0].bn1, nn.Identity)


def test_vgg_classifier_reads_kept_channels():
    model = small_vgg()
    prop = dcp_kernels.convert(model, 0.5)
    assert prop.layer_names == ["features.conv1", "features.conv2", "features.conv3", "features.conv4"]
    assert isinstance(model[3], DCPLinear) and model[3].block == 1 and model[3].input_source is model[0][11]


def test_torchvision_models_convert_train_finalize():
    torchvision = pytest.importorskip("torchvision")
    for make, size in ((lambda: torchvision.models.vgg11_bn(num_classes=5), 32),
                       (lambda: torchvision.models.resnet18(num_classes=5), 32),
                       (lambda: torchvision.models.resnet50(num_classes=5), 32)):
        model = make()
        prop = dcp_kernels.convert(model, 0.5, explore_epochs=1)
        _train(model, prop, 2, size=size)
        plain = prop.finalize()
        model.eval(), plain.eval()
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-4)
        assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in model.parameters())
        assert 0 < prop.flops_ratio() < 1


@pytest.mark.parametrize("net", ["vgg", "convnext"])
def test_flops_ratio_is_the_finalized_networks_share_of_multiply_accumulates(net):
    """``prop.flops_ratio()`` counts every converted layer, the Linear readers included: it equals
    the finalized network's conv + linear FLOPs over the dense model's, counted by PyTorch's own
    ``FlopCounterMode`` (a VGG with a flatten head read compact; a ConvNeXt whose MLP hidden
    features are pruned, whose second Linear reads them). Integer counts: equal to rounding."""
    from torch.utils.flop_counter import FlopCounterMode

    if net == "vgg":
        model, size = small_vgg(), 16
    else:
        from test_zoo import _small_convnext

        model, size = _small_convnext(), 16
    dense = copy.deepcopy(model)
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=1)
    _train(model, prop, 3, size=size)
    x = torch.randn(2, 3, size, size)
    plain = prop.finalize()

    def flops(module) -> int:
        module.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
        return counter.get_total_flops()

    model.eval()
    with torch.no_grad():
        model(x)  # flops_ratio reads the shapes of the most recent forward
    plain_flops, dense_flops = flops(plain), flops(dense)
    assert plain_flops < 0.9 * dense_flops, "the selection must prune"
    if net == "convnext":  # its classifier reads a LayerNorm's output, so it is not converted:
        head = plain.classifier[-1]  # both counts hold its FLOPs; take them out of both
        head_flops = 2 * head.in_features * head.out_features * x.shape[0]
        plain_flops, dense_flops = plain_flops - head_flops, dense_flops - head_flops
    want = plain_flops / dense_flops
    assert abs(prop.flops_ratio() - want) < 1e-9, (prop.flops_ratio(), want)


def test_vgg11_bn_classifier_slices_flattened_features():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.vgg11_bn(num_classes=5)
    dcp_kernels.convert(model, 0.5)
    linear = model.classifier[0]
    assert isinstance(linear, DCPLinear) and linear.block == 49 and linear.input_source is model.features[25]


def test_resume_gives_identical_selection_and_utilities():
    torch.manual_seed(0)
    model = small_vgg()
    start = copy.deepcopy(model)
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=1)
    opt, _ = _train(model, prop, 3)
    saved = {"model": copy.deepcopy(model.state_dict()), "prop": prop.state_dict(),
             "opt": copy.deepcopy(opt.state_dict())}

    def continue_training(model, prop, opt):
        g = torch.Generator().manual_seed(42)
        out = []
        for _ in range(3):
            x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append((torch.cat([l.selected for l in prop.layers]).clone(), prop.utility_vector().clone()))
        return out

    expected = continue_training(model, prop, opt)
    fresh = copy.deepcopy(start)
    fresh_prop = dcp_kernels.convert(fresh, 0.5, explore_epochs=1)
    fresh.load_state_dict(saved["model"])
    fresh_prop.load_state_dict(saved["prop"])
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    fresh_opt.load_state_dict(saved["opt"])
    got = continue_training(fresh, fresh_prop, fresh_opt)
    for (sel_a, u_a), (sel_b, u_b) in zip(expected, got):
        assert torch.equal(sel_a, sel_b)
        assert torch.equal(u_a, u_b)


def _structure(model):
    return [(n, type(m)) for n, m in model.named_modules()]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prune_ratio=1.0), ValueError, "prune_ratio"),
        (dict(prune_ratio=-0.1), ValueError, "prune_ratio"),
        (dict(prune_ratio=0.99, min_channels=2), ValueError, "minimums"),
        (dict(min_channels={"nope": 1}), ValueError, "unknown layers"),
        (dict(backend="nope"), ValueError, "unknown backend"),
    ],
)
def test_bad_arguments_leave_the_model_untouched(kwargs, error, match):
    model = small_vgg()
    before = _structure(model)
    with pytest.raises(error, match=match):
        dcp_kernels.convert(model, **kwargs)
    assert _structure(model) == before


class _NoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


class _Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x


class _OnlyResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x


def test_bad_models():
    with pytest.raises(ValueError, match="has no nn.Conv2d"):
        dcp_kernels.convert(_NoConv())
    with pytest.raises(ValueError, match="no prunable conv.*combined"):
        dcp_kernels.convert(_OnlyResidual())
    # fx cannot trace it; the recorded run of the example input finds no prunable conv either.
    with pytest.warns(UserWarning, match="could not trace"), pytest.raises(ValueError, match="model output|never called"):
        dcp_kernels.convert(_Dynamic())
    model = small_vgg()
    dcp_kernels.convert(model)
    with pytest.raises(ValueError, match="already"):
        dcp_kernels.convert(model)
    with pytest.raises(TypeError, match="from_modules"):
        dcp_kernels.convert(nn.Conv2d(3, 4, 3))


def test_conv_without_batchnorm_is_gated_after_the_conv():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(1), nn.LazyLinear(5))
    model(torch.randn(1, 3, 8, 8))  # materialise the lazy layer
    prop = dcp_kernels.convert(model, 0.4, explore_epochs=0, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert prop.layer_names == ["0", "2"] and model[0].norm is None
    _train(model, prop, 2, size=8)
    plain = prop.finalize()
    x = torch.randn(2, 3, 8, 8)
    assert_close_to_scale(plain.eval()(x), model.eval()(x), rel=1e-5)


def test_forward_errors_name_the_layer():
    model = small_vgg()
    dcp_kernels.convert(model)
    with pytest.raises(ValueError, match="'features.conv1'.*expected 3 input channels"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="'features.conv1'.*4-D"):
        model(torch.randn(3, 16, 16))


def test_report_and_accounting():
    model = small_resnet()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0)
    with pytest.raises(RuntimeError, match="forward"):
        prop.flops_ratio()
    _train(model, prop, 2)
    assert 0 < prop.flops_ratio() < 1
    assert sum(prop.kept().values()) == prop.keep
    report = prop.report()
    assert "layer1.0.conv1" in report and "left dense" in report
    assert set(prop.utilities()) == set(prop.layer_names)


def test_whole_model_pickles():
    import io

    model = small_vgg()
    dcp_kernels.convert(model, 0.5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


@pytest.mark.parametrize("compact", [True, False])
def test_activations_between_converted_layers(compact):
    model = small_vgg()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, backend="torch", compact_activations=compact)
    for layer in prop.layers:
        layer.utility.uniform_()
    prop.layers[0].utility[:6] = -1.0  # the first layer keeps at most 2 of its 8 channels
    seen = {}
    model[0][2].register_forward_hook(lambda m, i, o: seen.update(relu=o.shape[1]))
    model(torch.randn(2, 3, 16, 16))
    kept = prop.kept()["features.conv1"]
    assert kept < 8
    assert seen["relu"] == (kept if compact else 8)
    # The last conv feeds the Linear classifier through pooling and nn.Flatten, which work at any
    # width: its output travels compact too, and the Linear reads only the matching weight columns.
    assert model[0][11].compact_output == compact


class _HeadAfterReshape(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> a reshape -> Linear."""

    def __init__(self, reshape):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(48, 5)
        self.reshape = reshape

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        if self.reshape == "flatten":
            x = torch.flatten(x, 1)
        elif self.reshape == "view-batch":
            x = x.view(x.size(0), -1)
        else:  # a size written in the code: would break on a compact tensor
            x = x.view(-1, 48)
        return self.fc(x)


@pytest.mark.parametrize("reshape", ["flatten", "view-batch", "view-fixed"])
def test_linear_head_reads_compact_features_and_a_fixed_flatten_keeps_its_conv_dense(reshape):
    """A Linear head gets the last conv's selected channels only (no scatter to full width and gather
    back) after a flatten that works whatever the width. ``view(-1, 48)`` (a count written in the code)
    would break with fewer channels, in the finalized network too: that conv is left dense, and says
    so. Either way training equals the reference's and the finalized network runs and matches."""
    torch.manual_seed(0)
    ref_model = _HeadAfterReshape(reshape)
    fast_model = copy.deepcopy(ref_model)
    fixed = reshape == "view-fixed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = dcp_kernels.convert(ref_model, 0.5, explore_epochs=1, backend="reference")
        fast = dcp_kernels.convert(fast_model, 0.5, explore_epochs=1, backend="torch")
    left_dense = [str(w.message) for w in caught if "left dense" in str(w.message)]
    assert bool(left_dense) is fixed and all("conv2: flattened by call_method 'view'" in m for m in left_dense)
    assert fast_model.conv2.compact_output is not fixed and isinstance(fast_model.fc, DCPLinear) is not fixed
    seen = []
    fast_model.fc.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    _, ref_hist = _train(ref_model, ref, 4)
    _, fast_hist = _train(fast_model, fast, 4)
    for a, b in zip(ref_hist, fast_hist):
        assert torch.equal(a, b)
    kept = 12 if fixed else int(fast_model.conv2.selected.sum())
    assert ("conv2" in fast.kept()) is not fixed and seen[-1] == 4 * kept and (fixed or kept < 12)
    for (name, p), q in zip(ref_model.state_dict().items(), fast_model.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    plain = fast.finalize().eval()  # runs the same forward code, view(-1, 48) included
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain(x), fast_model.eval()(x), rtol=1e-4, atol=1e-5)


def test_a_linear_reads_the_current_selection_when_it_was_made_under_a_dispatch_mode():
    """``_foreach_copy_`` leaves version counters as they were while a ``TorchDispatchMode`` is active
    (an op counter, a FLOP counter): the controller bumps them itself, so caches keyed on a mask's
    version (a Linear's columns) see every new selection."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    model = _HeadAfterReshape("flatten")
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, backend="torch")
    x = torch.randn(2, 3, 16, 16)
    model.train()
    for seed in range(4):
        for layer in prop.layers:
            layer.utility.copy_(torch.rand(layer.utility.shape, generator=torch.Generator().manual_seed(seed)))
        with Passthrough():
            model(x)  # selects, then the Linear reads its columns
        channels = model.conv2.selected.nonzero().flatten()  # each owns 4 features (2x2 pooled)
        assert model.fc.selected_features().equal((channels.unsqueeze(1) * 4 + torch.arange(4)).flatten())


def test_finalize_keeps_the_trained_selection_or_selects_when_exploring():
    model = small_vgg()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=1)
    _train(model, prop, 3)
    trained = torch.cat([l.selected for l in prop.layers]).clone()
    for layer in prop.layers:  # utilities moved after the last selection; finalize must not reselect
        layer.utility.uniform_()
    prop.finalize()
    assert torch.equal(torch.cat([l.selected for l in prop.layers]), trained)

    exploring = small_vgg()
    prop = dcp_kernels.convert(exploring, 0.5, explore_epochs=5)
    _train(exploring, prop, 2, explore_steps=0)
    assert all(l.selected.all() for l in prop.layers)
    plain = prop.finalize()
    assert sum(prop.kept().values()) == prop.keep
    x = torch.randn(2, 3, 16, 16)
    assert_close_to_scale(plain.eval()(x), exploring.eval()(x), rel=1e-5)


# The autocast casting lives in DCPConv2d, the same for every fast backend; it is checked on the
# compact PyTorch backend, whose bf16 conv is the reference's own (oneDNN), so the comparison sees
# only the casting, and on the extension, whose utility kernel gets autocast's mixed dtypes (a bf16
# activation through the fp32 BN affine, a bf16 gradient: it once refused them, found on an H200).
# The Triton kernels' bf16 arithmetic has its own test (test_triton.py): their different summation
# order moves individual utilities by up to ~15% after a few bf16 steps.
@pytest.mark.parametrize("backend", [b for b in ("torch", "extension") if b in fast_backends("cpu")]
                         + ["torch-capacity"])
def test_bf16_autocast_matches_the_reference(backend):
    """CPU bf16 autocast: the fast path computes in bf16 like autocast's conv, utilities stay fp32.

    The compact conv runs oneDNN at other shapes than the reference's masked dense conv, so bf16
    rounding differs and grows backwards through the layers. Measured on an AMD EPYC (2026-11-28,
    torch and extension alike) with model seeds 0, 1 and 3, as a fraction of each tensor's largest
    value: logits <= 5.6e-3, utilities <= 6.5e-3, gradients <= 8.2e-2 (the first layers), selections
    identical. Tolerances: 0.02, 0.05, 0.2. With model seed 2 a near-tie resolves differently in
    bf16 (both backends the same way) and the tensors then differ by whole channels (28% of the
    logits): a seed-dependent tie, not a tolerance to widen, hence the fixed seed 0.

    ``torch-capacity``: capacity widths (``static_shapes=True``) with channels_last tensors, how a GPU
    run trains them (benchmarks/gpu_check.sh); the same tolerances hold."""
    torch.manual_seed(0)
    capacity = backend == "torch-capacity"
    ref_model = small_vgg()
    fast_model = copy.deepcopy(ref_model)
    if capacity:
        ref_model, fast_model = (m.to(memory_format=torch.channels_last) for m in (ref_model, fast_model))
    ref = dcp_kernels.convert(ref_model, 0.5, explore_epochs=1, backend="reference")
    fast = dcp_kernels.convert(fast_model, 0.5, explore_epochs=1, backend="torch" if capacity else backend,
                               static_shapes=capacity, capacity_multiple=4)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
        if capacity:
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for model in (ref_model, fast_model):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
                loss = F.cross_entropy(out.float(), y)
            loss.backward()
            outs.append(out.float())
        _within(outs[1], outs[0], 0.02, "logits")
        if step == 0:
            ref.epoch_end(), fast.epoch_end()
    for a, b in zip(ref.layers, fast.layers):
        assert b.utility.dtype == torch.float32 and torch.isfinite(b.utility).all()
        _within(b.utility, a.utility, 0.05, "utility")
    seen = []
    fast.layers[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_model(torch.randn(2, 3, 16, 16))
    assert seen == [torch.bfloat16]
    agree = torch.cat([a.selected == b.selected for a, b in zip(ref.layers, fast.layers)]).float().mean()
    assert agree >= 0.9  # bf16 rounding may flip near-ties (measured: none flipped)
    if capacity:
        assert fast.capacity_waste() > 1.0, "padding slots must have run"
    for (name, p), q in zip(ref_model.named_parameters(), fast_model.parameters()):
        assert q.grad.dtype == torch.float32
        _within(q.grad, p.grad, 0.2, name)


def _within(got: torch.Tensor, want: torch.Tensor, fraction: float, what: str) -> None:
    """max |got - want| <= fraction * max |want|: bf16 rounding errors scale with the tensor."""
    diff, scale = float((got - want).abs().max()), float(want.abs().max())
    assert diff <= fraction * scale, f"{what}: max difference {diff:.3g} > {fraction} x {scale:.3g}"


class _WithUnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.cumsum(self.bn2(self.conv2(x)), dim=1)  # mixes channels: conv2 cannot be pruned
        return self.conv3(x).mean((2, 3))


def test_convs_not_understood_are_left_dense_with_a_warning(recwarn):
    model = _WithUnknownOp()
    prop = dcp_kernels.convert(model, 0.3)
    assert prop.layer_names == ["conv1"]
    messages = [str(w.message) for w in recwarn.list]
    assert any("conv2" in m and "cumsum" in m for m in messages)
    # Residual channels are dense by design, not a surprise: no warning for them.
    recwarn.clear()
    dcp_kernels.convert(small_resnet(), 0.3)
    assert not [w for w in recwarn.list if "left dense" in str(w.message)]


def test_without_exploration_the_first_step_measures_every_channel():
    """explore_epochs=0: nothing is selected from all-zero utilities (that froze a degenerate
    selection: the first channels in layer order, the rest never measured)."""
    model = small_vgg()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0)
    _, history = _train(model, prop, 3, explore_steps=0)
    assert history[0].all(), "the first step must keep every channel (no utility was measured yet)"
    assert int(history[1].sum()) == prop.keep and int(history[2].sum()) == prop.keep
    # From measured utilities the selection is the rule's, not the lowest indices of each layer.
    first_in_layer_order = torch.cat([torch.arange(l.out_channels) < int(l.selected.sum()) for l in prop.layers])
    assert not torch.equal(history[1], first_in_layer_order)
    # Utilities loaded from elsewhere select at once.
    other = small_vgg()
    other_prop = dcp_kernels.convert(other, 0.5, explore_epochs=0)
    other.load_state_dict(model.state_dict())
    assert int(_train(other, other_prop, 1, explore_steps=0)[1][0].sum()) == other_prop.keep


class _TiedConvs(nn.Module):
    """conv_b reuses conv_a's weight Parameter (weight tying)."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_a, self.bn_a = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv_b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv_b.weight = self.conv_a.weight
        self.head = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(self.bn_a(self.conv_a(x)))
        x = F.relu(self.bn_b(self.conv_b(x)))
        return self.fc(F.relu(self.head(x)).mean((2, 3)))


def test_convs_sharing_a_parameter_stay_dense_and_stay_tied():
    model = _TiedConvs()
    with pytest.warns(UserWarning, match="shares its parameters with 'conv_b'"):
        prop = dcp_kernels.convert(model, 0.5, explore_epochs=1)
    assert "conv_a" not in prop.layer_names and "conv_b" not in prop.layer_names
    report = prop.report()
    assert "shares its parameters with 'conv_b'" in report and "shares its parameters with 'conv_a'" in report
    _train(model, prop, 3)
    plain = prop.finalize()
    assert plain.conv_a.weight is plain.conv_b.weight  # still one Parameter
    assert plain.conv_a.weight.shape == (8, 8, 3, 3)
    model.eval(), plain.eval()
    x = torch.randn(2, 3, 16, 16)
    assert_close_to_scale(plain(x), model(x), rel=1e-5)


class _GroupedNet(nn.Module):
    """A 1x1 conv feeding a grouped 3x3 conv (4 groups), and a grouped conv reading a concat."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.bn_b = nn.BatchNorm2d(12)
        self.c = nn.Conv2d(3, 4, 1)
        self.d = nn.Conv2d(16, 8, 3, padding=1, groups=2)  # reads cat(b, c)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        b = F.relu(self.bn_b(self.b(F.relu(self.bn_a(self.a(x))))))
        d = self.d(torch.cat([b, self.c(x)], dim=1))
        return self.head(d.mean((2, 3)))


def test_grouped_convs_keep_equal_counts_and_concat_readers_stay_dense():
    model = _GroupedNet()
    with pytest.warns(UserWarning, match="left dense"):
        prop = dcp_kernels.convert(model, 0.5, explore_epochs=0)
    assert prop.layer_names == ["a", "d"] and prop.group_blocks == [4, 2]
    assert "grouped conv (groups=2) reading a concat" in prop.plan.skipped["b"]
    assert isinstance(model.b, DCPConv2d) and not model.b.prunable and model.b.input_source is model.a
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8)).sum().backward()
    assert model.a.selected.view(4, 2).sum(1).tolist() == [1, 1, 1, 1]  # 4 of 8, one per group
    plain = prop.finalize()
    assert plain.a.out_channels == 4 and plain.b.in_channels == 4 and plain.b.groups == 4
    model.eval(), plain.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))


@pytest.mark.parametrize("backend", [b for b in ("triton", "extension") if dcp_kernels.ops.backends("cpu")[b]])
def test_grouped_convs_run_on_torch_where_no_grouped_kernel_exists(backend):
    """Triton and the extension have no grouped-conv kernel: convert() puts the grouped convs that run
    compact on 'torch', says so (a warning naming them, a note in the report), and the model then
    trains like the reference."""
    reference, model = _GroupedNet(), _GroupedNet()
    model.load_state_dict(reference.state_dict())
    ref = dcp_kernels.convert(reference, 0.5, explore_epochs=0, backend="reference")
    with pytest.warns(UserWarning, match=f"backend '{backend}' has no grouped-conv kernel: 2 grouped conv"):
        prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, backend=backend)
    assert prop.backend_fallbacks == {"b": backend, "d": backend}
    assert model.b.backend == model.d.backend == "torch" and model.a.backend == backend
    assert f"runs on 'torch' (no grouped-conv kernel in '{backend}')" in prop.report()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8, generator=g)
        losses = []
        for net in (reference, model):
            net.zero_grad()
            loss = net(x).square().mean()
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prop.utility_vector(), ref.utility_vector(), rtol=1e-4, atol=1e-6)
    # A grouped layer asked for a backend without grouped kernel, one by one: refused, not rerouted.
    model.b.backend = backend
    with pytest.raises(NotImplementedError, match=f"'b': backend '{backend}' has no grouped-conv kernel"):
        model(torch.randn(2, 3, 8, 8))


def _deferred_update_step(model, prop, x, y, case, failures):
    """One training step of ``case`` (see the test below); ``failures`` counts the injected errors."""
    captured = []
    hooks = []
    if case == "part-of-the-network":  # the loss reads the second layer's output only
        hooks.append(prop.layers[1].register_forward_hook(lambda m, i, out: captured.append(out)))
    if case == "failed-backward" and not failures:
        def fail_once(grad):
            failures.append(1)
            raise RuntimeError("injected")
        def on_output(module, inputs, out):
            out.register_hook(fail_once)  # runs after the later layers' backward

        hooks.append(prop.layers[0].register_forward_hook(on_output))
    if case == "two-forwards":  # each layer's backward runs twice in one pass
        logits = model(x[:4])
        loss = F.cross_entropy(logits, y[:4]) + F.cross_entropy(model(x[4:]), y[4:])
    else:
        loss = F.cross_entropy(model(x), y)
        if captured:
            loss = captured[0].square().mean()
    for hook in hooks:
        hook.remove()
    try:
        loss.backward()
    except RuntimeError as error:
        assert "injected" in str(error)


@pytest.mark.parametrize("case", ["plain", "two-forwards", "part-of-the-network", "failed-backward"])
def test_network_wide_utility_update_equals_updating_each_layer_at_once(case):
    """The compact backends leave each layer's utility measurement in a network-wide buffer and update
    all layers at the end of the backward pass (``rule.UtilityUpdates``); the reference updates in
    each layer's backward. Equal utilities and selections every step, also when a layer's backward
    runs twice in one pass, when the pass reaches only part of the network (the others keep their
    utilities), and after a pass that failed half-way (its layers' measurements still count)."""
    torch.manual_seed(0)
    ref_model = small_vgg()
    fast_model = copy.deepcopy(ref_model)
    ref = dcp_kernels.convert(ref_model, 0.5, explore_epochs=1, backend="reference")
    fast = dcp_kernels.convert(fast_model, 0.5, explore_epochs=1, backend="torch")
    g = torch.Generator().manual_seed(1)
    ref_failures, fast_failures = [], []
    for step in range(5):
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
        for model, prop, failures in ((ref_model, ref, ref_failures), (fast_model, fast, fast_failures)):
            model.train()
            _deferred_update_step(model, prop, x, y, case if step >= 2 else "plain", failures)
            model.zero_grad(set_to_none=True)
            if step == 0:
                prop.epoch_end()
        if case == "failed-backward" and step == 2:
            # The failed pass never reached its end: its measurements are applied before the next
            # selection, which a forward (without gradients, so without a measurement) makes.
            with torch.no_grad():
                ref_model(x), fast_model(x)
        for name, a, b in zip(ref.layer_names, ref.layers, fast.layers):
            torch.testing.assert_close(b.selected, a.selected, msg=f"step {step}, {name}: selection")
            # Utilities are O(1) (max-normalised sums); measured difference ~1e-7.
            torch.testing.assert_close(b.utility, a.utility, rtol=0, atol=1e-5, msg=f"step {step}, {name}: utility")
    assert ref_failures == fast_failures == ([1] if case == "failed-backward" else [])
    if case == "part-of-the-network":  # the layers past the second kept the utilities of step 1
        assert not fast.layers[-1].utility.equal(torch.zeros_like(fast.layers[-1].utility))


def test_finalize_keeps_the_weights_memory_format():
    """A channels_last model finalizes to channels_last convs (an NCHW weight among NHWC activations
    costs cuDNN a layout conversion per conv), with the gated model's outputs."""
    torch.manual_seed(0)
    model = small_vgg().to(memory_format=torch.channels_last)
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=1)
    _train(model, prop, 3, size=16)
    plain = prop.finalize()
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert any(c.out_channels < 16 for c in convs)
    model.eval()
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    torch.testing.assert_close(plain.eval()(x), model(x), rtol=1e-5, atol=1e-5)
