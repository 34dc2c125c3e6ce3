"""The ``torch`` backend's GPU BN backward: Triton's fused BN backward with the DCP utility
(``ops/triton/batch_norm_compact.py``), run here in Triton's CPU interpreter.

On CUDA tensors the ``torch`` backend takes it instead of ``native_batch_norm_backward`` plus its own
utility reduction (``ops.layer.fused_bn_backward_applies``); on the CPU it is forced on with
``forced_fused_bn_backward(True)``. The kernel test runs on CUDA too where a GPU is visible
(benchmarks/gpu_check.sh, stage d). Checked: the kernels against PyTorch's BN backward and a float64
utility (NCHW, channels_last, bf16, widths and pixel counts that are not multiples of the blocks),
and whole selecting steps of converted residual networks (exact and capacity widths) against the
unfused ``torch`` step.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcp_kernels
from dcp_kernels.ops.layer import forced_fused_bn_backward

_ON_CPU = pytest.mark.skipif(not dcp_kernels.ops.backends("cpu")["triton"],
                             reason="runs Triton on CPU tensors: needs Triton and TRITON_INTERPRET=1")
_DEVICES = [pytest.param("cpu", marks=_ON_CPU)] + (["cuda"] if torch.cuda.is_available() else [])


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.float32, True),
                                                 (torch.bfloat16, True)], ids=["fp32", "fp32-cl", "bf16-cl"])
@pytest.mark.parametrize("device", _DEVICES)
def test_kernels_equal_batch_norm_backward_and_the_utility(device, dtype, channels_last):
    """Input, weight and bias gradients equal ``native_batch_norm_backward``'s and the utility equals
    ``sum_b |sum_hw g * BN(y)|`` in float64, for 21 channels (not a multiple of the channel block) and
    5x7 pixels (not a multiple of the pixel block), with a mean 3x the spread. Measured (fp32): 1e-7 to
    3e-7 of the largest value; bf16 input gradients 5e-3 (bf16's rounding of the result, which PyTorch's
    bf16 backward has too), parameter gradients and utility 3e-7 (float32 accumulation). Tolerances: 1e-5,
    and 2e-2 for bf16 input gradients."""
    from dcp_kernels.ops import _triton_backend

    gen = torch.Generator().manual_seed(0)
    y = (torch.randn(3, 21, 5, 7, generator=gen) + 3.0).to(device, dtype)
    g = torch.randn(3, 21, 5, 7, generator=gen).to(device, dtype)
    if channels_last:
        y, g = y.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    weight, bias = (torch.rand(21, generator=gen) + 0.5).to(device), torch.randn(21, generator=gen).to(device)
    _, mean, invstd = torch.native_batch_norm(y, weight, bias, None, None, True, 0.1, 1e-5)
    grad_y, params, v = _triton_backend().batch_norm_backward_with_utility(g, y, weight, bias, mean, invstd)
    want_y, want_w, want_b = torch.ops.aten.native_batch_norm_backward(
        g, y, weight, None, None, mean, invstd, True, 1e-5, [True, True, True])
    xhat = (y.double() - mean.double().view(1, -1, 1, 1)) * invstd.double().view(1, -1, 1, 1)
    a = xhat * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    want_v = (g.double() * a).sum((2, 3)).abs().sum(0)
    assert grad_y.dtype == dtype and params.dtype == v.dtype == torch.float32
    assert grad_y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert _relative(grad_y, want_y) <= (2e-2 if dtype == torch.bfloat16 else 1e-5)
    assert _relative(params[0], want_w) <= 1e-5
    assert _relative(params[1], want_b) <= 1e-5
    assert _relative(v, want_v) <= 1e-5
    assert _triton_backend().batch_norm_backward_with_utility(g, y, weight, bias, mean, invstd, False)[0] is None


class _Bottleneck(nn.Module):
    def __init__(self, c: int, mid: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(x + self.bn3(self.conv3(out)))


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                         _Bottleneck(24, 12), _Bottleneck(24, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(24, 5))


def _count_fused_calls(monkeypatch) -> list:
    """A list that gets one entry per call of the fused BN backward."""
    from dcp_kernels.ops import _triton_backend

    calls = []
    real = _triton_backend().batch_norm_backward_with_utility
    monkeypatch.setattr(_triton_backend(), "batch_norm_backward_with_utility",
                        lambda *args: calls.append(args[1].shape) or real(*args))
    return calls


def _step(model, x, y):
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}


@_ON_CPU
@pytest.mark.parametrize("static_shapes", [False, True], ids=["exact", "capacity"])
def test_fused_step_trains_like_the_unfused_torch_step(monkeypatch, static_shapes):
    """Four selecting steps of a residual CNN (residual groups pruned, compact) with the fused BN
    backward against the same steps without it, both on ``torch``: equal selections, gradients, BN
    statistics and utilities. Each step starts both from the unfused model's state (free-running,
    rounding-level differences would flip near-ties of the selection). Measured: gradients, statistics
    and utilities within 4.2e-7 of their scale; tolerance 1e-4."""
    calls = _count_fused_calls(monkeypatch)
    torch.manual_seed(0)
    plain_model = _net()
    fused_model = copy.deepcopy(plain_model)
    kwargs = dict(explore_epochs=1, backend="torch", prune_residual=True, static_shapes=static_shapes,
                  capacity_multiple=4)
    plain = dcp_kernels.convert(plain_model, 0.5, **kwargs)
    fused = dcp_kernels.convert(fused_model, 0.5, **kwargs)
    opt = torch.optim.SGD(plain_model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        fused_model.load_state_dict(plain_model.state_dict())
        x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen)
        with forced_fused_bn_backward(False):
            loss_p, grads_p, state_p = _step(plain_model, x, y)
        assert not calls
        with forced_fused_bn_backward(True):
            loss_f, grads_f, state_f = _step(fused_model, x, y)
        assert len(calls) == len(fused.layers), "every layer's BN backward must take the fused op"
        calls.clear()
        assert torch.equal(torch.cat([l.selected for l in fused.layers]), torch.cat([l.selected for l in plain.layers]))
        assert torch.equal(loss_f, loss_p)  # the forward is the same code
        for key, want in {**grads_p, **state_p}.items():
            got = {**grads_f, **state_f}[key]
            if want.is_floating_point():
                scale = max(float(want.abs().max()), 1e-3)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{step} {key}: {m}")
            else:
                assert torch.equal(got, want), f"step {step}: {key}"
        opt.step()
        if step == 0:
            plain.epoch_end()
            fused.epoch_end()
    assert not torch.cat([l.selected for l in plain.layers]).all(), "the selection must prune after exploration"
    assert any(not torch.equal(l.utility, torch.zeros_like(l.utility)) for l in fused.layers)


@_ON_CPU
def test_fused_backward_is_taken_only_where_asked(monkeypatch):
    """On CPU tensors the ``torch`` step keeps PyTorch's BN backward unless forced; forced, every
    converted layer with a BatchNorm runs the fused op once per backward."""
    from dcp_kernels.ops import layer as layer_step

    calls = _count_fused_calls(monkeypatch)
    model = _net()
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, backend="torch", prune_residual=True)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))
    assert not layer_step.fused_bn_backward_applies(x)
    F.cross_entropy(model(x), y).backward()
    assert calls == []
    with forced_fused_bn_backward(True):
        F.cross_entropy(model(x), y).backward()
    assert len(calls) == len(prop.layers)
    assert not layer_step.fused_bn_backward_applies(x)  # the context restored the automatic choice
