"""Norms whose statistics mix channels (dcp_kernels/norms.py): GroupNorm normalises each group over its
kept channels (every group keeping the same number), a GRN's channel mean counts the unselected
channels as zeros and finalize() folds that count. The reference-backend comparison of both is
test_zoo.py's "zoo-norms" case."""
import pytest
import torch
import torch.nn.functional as F
from test_zoo import convert_train_finalize, n_params
from torch import nn
from zoo_layers import GlobalResponseNorm, GroupNormAct, NormZooNet

import dcp_kernels
from dcp_kernels.norms import masked_group_norm


def _equal_per_group(channels: int, groups: int, kept_per_group: int, generator) -> torch.Tensor:
    keep = torch.zeros(groups, channels // groups, dtype=torch.bool)
    for g in range(groups):
        keep[g, torch.randperm(channels // groups, generator=generator)[:kept_per_group]] = True
    return keep.flatten()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_group_norm_is_group_norm_of_the_kept_channels(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 24, 5, 7, generator=g) * 2 + 1).to(dtype)
    weight, bias = torch.rand(24, generator=g) + 0.5, torch.rand(24, generator=g) - 0.5
    keep = _equal_per_group(24, 4, 4, g)
    x_pruned = x.clone()
    x_pruned[:, ~keep] = 7.0  # whatever the unselected channels hold
    idx = keep.nonzero().squeeze(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = masked_group_norm(x_pruned, 4, weight, bias, 1e-5, keep)
        expected = F.group_norm(x[:, idx], 4, weight[idx], bias[idx], 1e-5)
    assert out.dtype == expected.dtype
    # Measured: 4.8e-7 (float32); bf16: the same bf16 inputs reduced in float32 here and by ATen, the
    # outputs (O(1)) rounded to bf16: within one bf16 ulp at 2 (0.0156).
    torch.testing.assert_close(out[:, idx].float(), expected.float(), rtol=0,
                               atol=1e-5 if dtype == torch.float32 else 0.0157)
    assert out[:, ~keep].abs().max() == 0


class ConvNextV2GRN(nn.Module):
    """transformers' GRN: features last (tokens), (1, 1, 1, C) parameters, eps written in its forward."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(1, 1, 1, dim) + 0.5)
        self.bias = nn.Parameter(torch.rand(1, 1, 1, dim) - 0.5)

    def forward(self, x):
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        return self.weight * (x * (g / (g.mean(dim=-1, keepdim=True) + 1e-6))) + self.bias + x


@pytest.mark.parametrize("make, channel_dim", [(GlobalResponseNorm, 1), (ConvNextV2GRN, -1)],
                         ids=["timm-nchw", "transformers-tokens"])
def test_grn_counts_the_unselected_channels_as_zeros_and_finalize_folds_it(make, channel_dim):
    """The masked reference: the original GRN on the input with the unselected channels zeroed, read
    at the kept channels; and the finalized GRN on the kept channels alone."""
    from types import SimpleNamespace

    from dcp_kernels.norms import DCPGlobalResponseNorm

    torch.manual_seed(0)
    grn = make(12)
    layer = DCPGlobalResponseNorm(grn, channel_dim)
    keep = torch.rand(12) < 0.5
    layer.set_source(SimpleNamespace(selected=keep, static_shapes=False, slot_scale=lambda: None,
                                     selected_indices=lambda: keep.nonzero().squeeze(1)))
    shape = [1, 1, 1, 1]
    shape[channel_dim] = -1
    x = torch.randn(2, 12, 5, 6) if channel_dim == 1 else torch.randn(2, 5, 6, 12)
    garbage = torch.where(keep.view(shape), x, torch.full_like(x, 5.0))  # whatever unselected channels hold
    out = layer(garbage)
    expected = grn(x * keep.view(shape))
    idx = keep.nonzero().squeeze(1)
    # Measured: 2.4e-7 on O(1) outputs (float32).
    torch.testing.assert_close(out.index_select(channel_dim, idx), expected.index_select(channel_dim, idx),
                               rtol=0, atol=1e-5)
    plain = layer.plain(idx)
    assert type(plain) is make
    # transformers' eps stays 1e-6 in its forward: the outputs then differ by ~1e-6 of the channel mean.
    torch.testing.assert_close(plain(x.index_select(channel_dim, idx)), expected.index_select(channel_dim, idx),
                               rtol=0, atol=1e-5)


def test_group_norms_keep_equal_counts_per_group_and_finalize_equal():
    model = NormZooNet()
    converted, prop, plain = convert_train_finalize(model, size=16, prune_residual=True)
    assert set(prop.layer_names) == {"stem", "conv1", "conv2", "conv3"}
    pruned = []
    for name, blocks in (("gn0", 8), ("gn1", 4), ("gn2", 8)):  # gn0 and gn2 share a group: lcm(4, 8) blocks
        selected = getattr(converted, name).source.selected
        per_block = selected.view(blocks, -1).sum(1)
        assert (per_block == per_block[0]).all(), (name, per_block)
        pruned.append(not selected.all())
    assert any(pruned)
    kept = prop.kept()
    # The original classes, cut: the same groups (one channel per group: as many groups as channels).
    assert type(plain.gn0) is GroupNormAct and (plain.gn0.num_groups, plain.gn0.num_channels) == (4, kept["stem"])
    assert type(plain.gn3) is nn.GroupNorm and plain.gn3.num_groups == plain.gn3.num_channels == kept["conv3"]
    assert type(plain.grn) is GlobalResponseNorm and plain.grn.weight.shape == (kept["conv1"],)
    assert plain.grn.eps == pytest.approx(1e-6 * 24 / kept["conv1"])
    assert n_params(plain) < n_params(NormZooNet())


def test_a_group_norm_right_after_a_conv_measures_its_utility():
    """Behind a GroupNorm the conv's own output gives no utility (one channel per group: every
    ``sum_hw g * a`` is exactly zero), so the GroupNorm's output is measured, as an owned BatchNorm's is:
    one exploring step from zero utilities gives ``v / max(v)``, ``v = sum_b |sum_hw g * y|`` at its output."""
    import copy

    torch.manual_seed(0)
    model = NormZooNet().double()
    plain = copy.deepcopy(model)
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=1, prune_residual=True,
                               example_inputs=(torch.randn(2, 3, 16, 16, dtype=torch.float64),))
    outputs = {}

    def keep(module, args, out, name):
        out.retain_grad()
        outputs[name] = out

    for name in ("gn1", "gn3"):
        plain.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: keep(m, a, out, name))
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 5, (4,))
    model.train(), plain.train()
    F.cross_entropy(plain(x), y).backward()
    F.cross_entropy(model(x), y).backward()
    prop.utility_vector()  # applies the backward's pending updates
    for conv, norm in (("conv1", "gn1"), ("conv3", "gn3")):
        v = (outputs[norm] * outputs[norm].grad).sum((2, 3)).abs().sum(0)
        utility = getattr(model, conv).utility
        torch.testing.assert_close(utility.double(), v / v.max(), rtol=1e-6, atol=1e-7)  # float32 buffers
        assert getattr(model, conv).utility_at_norm


def test_state_dict_keys_are_the_original_models():
    model = NormZooNet()
    keys = set(model.state_dict())
    dcp_kernels.convert(model, 0.5, example_inputs=(torch.randn(2, 3, 16, 16),))
    assert keys <= set(model.state_dict())


class _NormThenMix(nn.GroupNorm):
    def forward(self, x):
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return y.flip(1)  # mixes channels after the norm


class _TwoMeans(GlobalResponseNorm):
    def forward(self, x):
        return super().forward(x) - x.mean(dim=1, keepdim=True)


_TwoMeans.__name__ = "GlobalResponseNorm"  # a GRN by its name, not by its forward


class _OtherGroups(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, 2 * self.num_groups, self.weight, self.bias, self.eps)


class _GammaBeta(nn.Module):
    """The official ConvNeXt V2 naming (gamma, beta): a GRN by its class name whose weight DCP would
    not know how to fold."""

    def __init__(self, dim):
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        g = x.norm(p=2, dim=(2, 3), keepdim=True)
        return self.gamma.view(1, -1, 1, 1) * (x * g / (g.mean(dim=1, keepdim=True) + 1e-6)) + x


class _FoldsWrong(GlobalResponseNorm):
    def forward(self, x):  # the weight scales x, not x * Nx: scaling it by C / k would not fold the mean
        g = x.norm(p=2, dim=(2, 3), keepdim=True)
        return x * g / (g.mean(dim=1, keepdim=True) + self.eps) + self.weight.view(1, -1, 1, 1) * x


_GammaBeta.__name__ = _FoldsWrong.__name__ = "GlobalResponseNorm"


@pytest.mark.parametrize("make, reason", [
    (lambda: _NormThenMix(2, 8), "_NormThenMix: its forward applies flip after group_norm"),
    (lambda: _OtherGroups(2, 8), "_OtherGroups: its group_norm runs with other groups, weight or bias"),
    (lambda: _TwoMeans(8), "GlobalResponseNorm: its forward takes 2 means over the channels"),
    (lambda: _GammaBeta(8), "GlobalResponseNorm: a GRN layer of a form DCP does not know"),
    (lambda: _FoldsWrong(8), "GlobalResponseNorm: finalize() could not fold its channel mean"),
])
def test_norm_forwards_dcp_does_not_understand_stay_dense_with_the_class_named(make, reason):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.b = nn.Conv2d(3, 8, 3, padding=1), make(), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.b(self.norm(self.a(x))).mean((2, 3)))

    model = Net()
    prop = dcp_kernels.convert(model, 0.5, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert prop.layer_names == ["b"]
    assert reason in prop.report()


timm = pytest.importorskip("timm")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnetv2_50x1_bit", "resnetv2_50d_gn", "convnextv2_atto"])
def test_timm_group_norm_and_grn_models_round_trip(name):
    """Refused before with "no prunable conv layer found": weight-standardized convs and GroupNormAct
    (BiT), GroupNormAct (resnetv2_50d_gn), GRN in every block (ConvNeXt V2, features on tokens)."""
    model = timm.create_model(name, num_classes=5)
    if name.startswith("convnextv2"):
        for m in model.modules():  # timm starts GRN at zero, where it does nothing
            if type(m).__name__ == "GlobalResponseNorm":
                nn.init.uniform_(m.weight, 0.5, 1.5)
    _, prop, _ = convert_train_finalize(model, size=64)
    assert len(prop.layer_names) > 10


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", [
    # Pre-activation GroupNorm over weight-standardized convs, 50 layers: fp32 rounding is amplified
    # past the comparison's allowance by the third step (1.13x on one GroupNorm bias; in float64 the
    # same comparison is 6e-6 of it), so it runs in float64, as RegNetY does in test_zoo.py.
    ("resnetv2_50x1_bit", torch.float64),
    ("resnetv2_50d_gn", torch.float32),
    ("nf_resnet26", torch.float32),
    ("convnextv2_atto", torch.float32),
])
def test_timm_models_train_like_the_reference(name, dtype):
    """The `torch` backend against the reference over selecting steps (the extension's path for these
    layers is the same code: the hand-written nets of test_zoo.py run it)."""
    from test_zoo import train_like_the_reference

    def make():
        model = timm.create_model(name, num_classes=5)
        for m in model.modules():
            if type(m).__name__ == "GlobalResponseNorm":
                nn.init.uniform_(m.weight, 0.5, 1.5)
        return model

    train_like_the_reference(make, "torch", 32, dtype)
