"""convert() on models built the way other zoos build them: norm layers of any class (timm's
BatchNormAct2d, SyncBatchNorm, torchvision's FrozenBatchNorm2d), timm models, and the registry that
tells convert() about a user's own channel-wise modules and functions."""
import pytest
import torch
import torch.nn.functional as F
from test_zoo import convert_train_finalize, n_params
from torch import nn

import dcp_kernels


class _NormAct(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own forward (norm + activation), as timm's BatchNormAct2d."""

    def forward(self, x):
        return F.relu(super().forward(x))  # fx would trace into it: F.batch_norm, then relu


def _frozen_bn(channels):
    torchvision = pytest.importorskip("torchvision")
    bn = torchvision.ops.FrozenBatchNorm2d(channels)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2)
    return bn


class _Net(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1), norm(8)
        self.c2, self.n2 = nn.Conv2d(8, 12, 3, padding=1), norm(12)
        self.c3 = nn.Conv2d(12, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.n1(self.c1(x)))
        x = F.relu(self.n2(self.c2(x)))
        return self.fc(self.c3(x).mean((2, 3)))


@pytest.mark.parametrize("norm", [_NormAct, nn.SyncBatchNorm, _frozen_bn], ids=["subclass", "sync", "frozen"])
def test_norm_layers_of_any_class_follow_their_conv(norm):
    model = _Net(norm)
    dense = n_params(model)
    _, prop, plain = convert_train_finalize(model, size=16)
    assert prop.layer_names == ["c1", "c2", "c3"]
    kept = prop.kept()
    # The norm stays a module of its own class, cut to the kept channels.
    assert type(plain.n1) is type(model.n1) and plain.n1.running_mean.shape == (kept["c1"],)
    assert plain.n2.weight.shape == (kept["c2"],) and plain.c3.in_channels == kept["c2"]
    assert n_params(plain) < dense


def test_f_batch_norm_in_a_forward_is_named():
    class Raw(_Net):
        def forward(self, x):
            x = F.batch_norm(self.c1(x), self.n1.running_mean, self.n1.running_var, training=self.training)
            x = F.relu(self.n2(self.c2(F.relu(x))))
            return self.fc(self.c3(x).mean((2, 3)))

    prop = dcp_kernels.convert(Raw(nn.BatchNorm2d), 0.5)
    assert "c1" not in prop.layer_names and "c2" in prop.layer_names
    assert "use a BatchNorm module" in prop.report()


class _Swishish(nn.Module):
    """A user's own activation, written with ops fx would see as unknown."""

    def forward(self, x):
        return x * torch.special.expit(x)


class _ChannelShuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class _Scale(nn.Module):
    """Per-channel scale: a per_channel module finalize() must cut."""

    def __init__(self, channels):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.gain.view(1, -1, 1, 1)


class _Custom(nn.Module):
    def __init__(self, middle):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.middle = middle
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.c2(self.middle(self.b1(self.c1(x)))).mean((2, 3)))


def test_registry_elementwise_per_channel_and_mixing():
    # Unregistered, the activation's ops are not understood: c1 stays dense, with the reason.
    with pytest.warns(UserWarning, match="special_expit', which DCP does not understand"):
        prop = dcp_kernels.convert(_Custom(_Swishish()), 0.5)
    assert prop.layer_names == ["c2"]
    dcp_kernels.register(_Swishish, "elementwise")
    dcp_kernels.register(_Scale, "per_channel")
    dcp_kernels.register(_ChannelShuffle, "mixing")
    try:
        _, prop, _ = convert_train_finalize(_Custom(_Swishish()), size=16)
        assert prop.layer_names == ["c1", "c2"]
        model, prop, plain = convert_train_finalize(_Custom(_Scale(8)), size=16)
        assert plain.middle.gain.shape == (prop.kept()["c1"],)
        with pytest.warns(UserWarning, match="registered as channel-mixing"):
            prop = dcp_kernels.convert(_Custom(_ChannelShuffle()), 0.5)
        assert prop.layer_names == ["c2"]
    finally:
        for t in (_Swishish, _Scale, _ChannelShuffle):
            dcp_kernels.unregister(t)


@pytest.mark.parametrize("target, kind, error, match", [
    (_Scale, "channelwise", ValueError, "kind must be one of"),
    (int, "elementwise", TypeError, "not an nn.Module subclass"),
    (nn.Conv2d, "elementwise", ValueError, "convs are DCP's own business"),
    (torch.sigmoid, "per_channel", ValueError, "a function cannot be 'per_channel'"),
    (3, "mixing", TypeError, "expected an nn.Module subclass or a function"),
])
def test_bad_registrations_are_refused(target, kind, error, match):
    with pytest.raises(error, match=match):
        dcp_kernels.register(target, kind)


timm = pytest.importorskip("timm")


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", [
    ("cspresnet50", {}),  # BatchNormAct2d everywhere, cross-stage concats
    ("ese_vovnet19b_dw", {}),  # BatchNormAct2d, depthwise convs, concat aggregation, eSE
    ("repvgg_a0", {"prune_residual": True}),  # every conv summed in its block
])
def test_timm_models_round_trip(name, kwargs):
    model = timm.create_model(name, num_classes=5)
    convert_train_finalize(model, size=64, example_inputs=(torch.randn(2, 3, 64, 64),), **kwargs)
