"""Conv2d subclasses with their own forward (dcp_kernels/conv_forward.py): weight standardization and
run-time 'SAME' padding are kept, everything else stays dense with a reason that names the class.
The reference-backend comparison of these convs is test_zoo.py's "zoo-convs" case."""
import pytest
import torch
import torch.nn.functional as F
from zoo_layers import SamePadConv2d, ScaledWSConv2d, ZooConvNet
from test_zoo import convert_train_finalize, n_params
from torch import nn

import dcp_kernels
from dcp_kernels import DCPConv2d


def test_conv_subclasses_convert_train_and_finalize():
    model = ZooConvNet()
    dense = n_params(model)
    converted, prop, plain = convert_train_finalize(model, size=16, prune_residual=True)
    assert set(prop.layer_names) == {"stem", "pw", "down", "conv"}  # dw follows its input's channels
    assert "gain" in dict(converted.stem.named_parameters()) and "stem.gain" in converted.state_dict()
    # A padding forward keeps its class; a weight-standardizing one is baked into a plain conv.
    assert type(plain.dw) is SamePadConv2d and type(plain.down) is SamePadConv2d
    assert type(plain.stem) is nn.Conv2d and type(plain.conv) is nn.Conv2d
    kept = prop.kept()
    assert plain.down.weight.shape[:2] == (kept["down"], kept["pw"]) and plain.dw.groups == kept["stem"]
    assert n_params(plain) < dense


def test_the_layer_runs_the_modules_forward_on_its_own_tensors():
    """The operands come from the subclass's forward with the layer's current tensors: a gain
    reassigned on the layer, or a dtype change, is the one used (compared with an untouched copy of
    the original module given the same tensors)."""
    import copy

    torch.manual_seed(0)
    conv = ScaledWSConv2d(4, 6, 3, padding=1)
    expected = copy.deepcopy(conv)
    layer = DCPConv2d.from_modules(conv, prunable=False)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(layer(x), expected(x), rtol=0, atol=0)
    layer.gain = nn.Parameter(torch.full((6, 1, 1, 1), 2.0))
    assert not torch.allclose(layer(x), expected(x))
    expected.gain = nn.Parameter(torch.full((6, 1, 1, 1), 2.0))
    torch.testing.assert_close(layer(x), expected(x), rtol=0, atol=0)
    layer.double(), expected.double()
    torch.testing.assert_close(layer(x.double()), expected(x.double()), rtol=0, atol=0)
    same = DCPConv2d.from_modules(SamePadConv2d(4, 6, 4, stride=3), prunable=False)
    assert same(torch.randn(1, 4, 10, 11)).shape == (1, 6, 4, 4)  # ceil(10 / 3), ceil(11 / 3)


class _PostOp(nn.Conv2d):
    def forward(self, x):
        return F.relu(super().forward(x))


class _ScalesInput(nn.Conv2d):
    def forward(self, x):
        return super().forward(x * 2)


class _TwoConvs(nn.Conv2d):
    def forward(self, x):
        F.conv2d(x, self.weight, None, self.stride, self.padding)  # a result it does not use
        return super().forward(x)


class _WSAndPad(ScaledWSConv2d):
    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


@pytest.mark.parametrize("cls, reason", [
    (_PostOp, "_PostOp: its forward applies relu to the conv's output"),
    (_ScalesInput, "_ScalesInput: its forward applies mul to its input before the conv"),
    (_TwoConvs, "_TwoConvs's forward calls conv2d 2 times"),
    (_WSAndPad, "_WSAndPad's forward both transforms its weight and pads its input"),
])
def test_forwards_dcp_does_not_understand_stay_dense_with_the_class_named(cls, reason):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = cls(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(F.relu(self.b(F.relu(self.a(x)))))

    model = Net()
    with pytest.warns(UserWarning, match="left dense"):
        prop = dcp_kernels.convert(model, 0.5, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert prop.layer_names == ["b"]
    assert type(model.a) is cls  # left exactly as it was
    assert reason in prop.report()
    with pytest.raises(TypeError, match=reason.split(":")[0]):
        DCPConv2d.from_modules(cls(3, 8, 3, padding=1))


class _Holds(nn.Conv2d):
    """Keeps nn.Conv2d's forward but holds a buffer of its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("calls", torch.zeros(()))


def _weight_normed(*args, **kwargs):
    return torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(*args, **kwargs))


@pytest.mark.parametrize("make, reason", [
    (_weight_normed, "ParametrizedConv2d: its weight is parametrized"),
    (_Holds, "_Holds holds calls beside nn.Conv2d's tensors"),
])
def test_parametrized_convs_and_unknown_tensors_stay_dense(make, reason):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = make(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.b(F.relu(self.a(x))).mean((2, 3)))

    model = Net()
    with pytest.warns(UserWarning, match="left dense"):
        prop = dcp_kernels.convert(model, 0.5, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert prop.layer_names == ["b"] and reason in prop.report()


def test_padding_modules_and_f_pad_carry_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.pad, self.b = nn.Conv2d(3, 8, 3), nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3, stride=2)
            self.c, self.fc = nn.Conv2d(8, 4, 1), nn.Linear(4, 5)

        def forward(self, x):
            x = self.b(self.pad(F.relu(self.a(x))))
            return self.fc(self.c(F.pad(F.relu(x), (1, 1, 1, 1))).mean((2, 3)))

    model = Net()
    _, prop, plain = convert_train_finalize(model, size=16)
    assert prop.layer_names == ["a", "b", "c"]


def test_f_pad_of_the_channel_dimension_stays_dense():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(10, 4, 1)

        def forward(self, x):
            return self.b(F.pad(self.a(x), (0, 0, 0, 0, 1, 1)))

    with pytest.raises(ValueError, match="call_function 'pad'"):
        dcp_kernels.convert(Net(), 0.5, example_inputs=(torch.randn(2, 3, 8, 8),))


timm = pytest.importorskip("timm")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "nf_resnet26"])
def test_timm_conv_subclasses_round_trip(name):
    """tf_efficientnet_b0: Conv2dSame (its stride-2 depthwise convs); nf_resnet26: ScaledStdConv2d
    everywhere, no norm layer at all (refused before: "no prunable conv layer found")."""
    model = timm.create_model(name, num_classes=5)
    _, prop, _ = convert_train_finalize(model, size=64)
    report = prop.report()
    assert "Conv2dSame" not in report and "StdConv2d" not in report, report
