"""Triton kernels beyond the shared backend grid (tests/test_ops.py runs that grid on them too).

Without a GPU these run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1):
exact kernel semantics, slow, so the shapes are small. On a GPU machine the same tests create CUDA
tensors and run the compiled kernels; tests named ``cuda`` need a GPU and are skipped without one.
"""
import os

import pytest
import torch
from conftest import sorted_subset

from dcp_kernels import ops

pytestmark = pytest.mark.skipif(not ops.backends()["triton"],
                                reason="Triton unavailable: not installed, or older than ops.MIN_TRITON")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _cuda_tensors_when_a_gpu_exists():
    """Compiled Triton kernels need CUDA tensors: on a GPU machine every test here creates its
    tensors there (without a GPU they stay on the CPU, in the interpreter). What ran on a GPU, and
    when: docs/benchmarks-gpu.md."""
    if torch.cuda.is_available():
        with torch.device("cuda"):
            yield
    else:
        yield


def _kernels():
    return ops._triton_backend()


def _reference(x, w, b, in_idx, out_idx, stride, padding, dilation, groups, grad):
    x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    b = None if b is None else b.detach().requires_grad_(True)
    y = ops.gathered_conv2d(x, w, b, in_idx, out_idx, stride, padding, dilation, groups, backend="reference")
    (y * grad).sum().backward()
    return y, x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("split", [2, 3])
def test_grad_weight_split_k_is_the_single_pass_result(split):
    """Split-K partial sums (used on GPUs when the tile grid is small) add up to the one-pass grad."""
    x, gy = torch.randn(3, 7, 9, 9), torch.randn(3, 5, 5, 5)
    in_idx, out_idx = sorted_subset(7, 4, 1), sorted_subset(6, 5, 2)
    one = torch.zeros(6, 7, 3, 3)
    many = torch.zeros(6, 7, 3, 3)
    from dcp_kernels.ops.triton.grad_weight import conv_grad_weight
    conv_grad_weight(gy, x, in_idx, out_idx, one, (2, 2), (1, 1), (1, 1), gy_compact=True, x_compact=False, split=1)
    conv_grad_weight(gy, x, in_idx, out_idx, many, (2, 2), (1, 1), (1, 1), gy_compact=True, x_compact=False,
                     split=split)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
    grad = torch.zeros(3, 6, 5, 5)
    grad[:, out_idx] = gy
    ref = _reference(x, torch.randn(6, 7, 3, 3), None, in_idx, out_idx, 2, 1, 1, 1, grad)
    torch.testing.assert_close(many, ref[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 40])
def test_several_tiles_in_every_dimension(groups):
    """Channel counts above the tile sizes (several N tiles, several K steps, ragged last tiles)."""
    x = torch.randn(1, 40, 5, 6)
    w = torch.randn(40, 40 // groups, 3, 3)
    in_idx, out_idx = sorted_subset(40, 37, 5), sorted_subset(40, 35, 6)
    grad = torch.randn(1, 40, 5, 6)
    ref = _reference(x, w, None, in_idx, out_idx, 1, 1, 1, groups, grad)
    xt, wt = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = ops.gathered_conv2d(xt, wt, None, in_idx, out_idx, 1, 1, 1, groups, backend="triton")
    (y * grad).sum().backward()
    for got, want in zip((y, xt.grad, wt.grad), ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("groups", [1, 6])
def test_half_precision_against_fp32_reference(dtype, tol, groups):
    """16-bit inputs, fp32 accumulation: within ``tol`` (relative to the values' scale) of the fp32
    reference computed from the same rounded inputs. fp16 keeps 11 mantissa bits, bf16 8."""
    x = torch.randn(2, 6, 8, 8).to(dtype)
    w = (torch.randn(6, 6 // groups, 3, 3) / 3).to(dtype)
    in_idx, out_idx = sorted_subset(6, 4, 3), sorted_subset(6, 3, 4)
    grad = torch.randn(2, 6, 8, 8).to(dtype)
    ref = _reference(x.float(), w.float(), None, in_idx, out_idx, 1, 1, 1, groups, grad.float())
    xt, wt = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = ops.gathered_conv2d(xt, wt, None, in_idx, out_idx, 1, 1, 1, groups, backend="triton")
    (y * grad).sum().backward()
    assert y.dtype == xt.grad.dtype == wt.grad.dtype == dtype
    for name, got, want in (("y", y, ref[0]), ("grad_x", xt.grad, ref[1]), ("grad_w", wt.grad, ref[2])):
        scale = float(want.detach().abs().max())
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * scale, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", ["selected", "all", "affine", "zero-gradient", "bf16"])
def test_utility_update_kernel_matches_the_rule(case):
    """The Triton utility step (reduction, optionally of ``a * scale + shift``, then one update
    program) against the rule written with PyTorch ops: ``U[idx] = d * U[idx] + v / max(v)``,
    other entries untouched, ``v / max = 0`` when every ``v`` is 0."""
    from dcp_kernels.ops import triton as triton_backend
    from dcp_kernels.rule import update_utilities

    torch.manual_seed(0)
    channels, kept = 40, 40 if case == "all" else 23
    idx = None if case == "all" else sorted_subset(channels, kept)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    a, g = torch.randn(3, kept, 5, 6).to(dtype), torch.randn(3, kept, 5, 6).to(dtype)
    if case == "zero-gradient":
        g.zero_()
    scale = shift = None
    if case == "affine":
        scale, shift = torch.rand(kept) + 0.5, torch.randn(kept)
    utility = torch.rand(channels) * 3  # O(1) values, as after a few steps
    want = utility.clone()
    a_ref = a if scale is None else a * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    update_utilities(want, ops.channel_utility(a_ref, g, backend="reference"), idx, 0.7)
    triton_backend.update_utility(a, g, utility, idx, 0.7, scale, shift)
    # fp32 sums of 90 O(1) products in another order: ~1e-6 relative measured; max-normalised.
    torch.testing.assert_close(utility, want, rtol=1e-5, atol=1e-6)
    if idx is not None:
        untouched = torch.ones(channels, dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(utility[untouched], want[untouched])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_utility_kernel_matches_reference_and_is_deterministic(layout):
    a, g = torch.randn(5, 19, 6, 7), torch.randn(5, 19, 6, 7)
    if layout == "channels_last":
        a, g = a.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    v = ops.channel_utility(a, g, backend="triton")
    torch.testing.assert_close(v, ops.channel_utility(a, g, backend="reference"), rtol=1e-5, atol=1e-7)
    assert torch.equal(v, ops.channel_utility(a, g, backend="triton"))
    assert v.dtype == torch.float32
    half = ops.channel_utility(a.half(), g.half(), backend="triton")
    assert half.dtype == torch.float32
    # fp16 inputs, fp32 accumulation: the reference on the same (rounded) values, in fp32. Products
    # of two fp16 values are exact in fp32; only the summation order differs (measured: up to 2.3e-7 relative).
    want = ops.channel_utility(a.half().float(), g.half().float(), backend="reference")
    torch.testing.assert_close(half, want, rtol=1e-5, atol=1e-7)


def _masked_reference(x, w, b, in_mask, out_mask, stride, padding, dilation, groups, grad):
    """Dense conv of the masked input, masked output: what a counted conv computes (fp64, exact)."""
    x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    b = None if b is None else b.detach().requires_grad_(True)
    y = torch.nn.functional.conv2d(x * in_mask.view(1, -1, 1, 1), w, b, stride, padding, dilation, groups)
    y = y * out_mask.view(1, -1, 1, 1)
    (y * grad).sum().backward()
    return y, x.grad * in_mask.view(1, -1, 1, 1), w.grad, None if b is None else b.grad


def _mask(n, k, seed):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[sorted_subset(n, k, seed)] = True
    return mask


def _poisoned(allocate):
    def poisoned(*args, **kwargs):
        t = allocate(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    return poisoned


# k = 1, k = C, and ragged widths across several 32-wide tiles (the interpreter's tile size).
COUNTED_CASES = [
    pytest.param(40, 37, 40, 35, 1, 1, 1, True, id="ragged-tiles"),
    pytest.param(9, 1, 7, 7, 2, 1, 1, False, id="k_in=1,k_out=C"),
    pytest.param(9, 9, 7, 1, 1, 2, 2, True, id="k_in=C,k_out=1,dilated"),
]


@pytest.mark.parametrize("c_in, k_in, c_out, k_out, stride, padding, dilation, bias", COUNTED_CASES)
@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_counted_conv_matches_the_masked_reference(c_in, k_in, c_out, k_out, stride, padding, dilation, bias,
                                                   depthwise, monkeypatch):
    """The counted ops (the selection read on the device, capacity grids): forward and all three
    gradients equal the masked dense conv in fp64, and every element of every output is written
    (outputs start as NaN-filled memory here, so an element left unwritten shows)."""
    from dcp_kernels.rule import kept_first

    if depthwise:
        c_out, k_out = c_in, k_in
    groups = c_in if depthwise else 1
    x = torch.randn(2, c_in, 6, 7, dtype=torch.float64)
    w = torch.randn(c_out, c_in // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(c_out, dtype=torch.float64) if bias else None
    in_mask, out_mask = _mask(c_in, k_in, 1), _mask(c_out, k_out, 2)
    y_ref = torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups)
    grad = torch.randn_like(y_ref)
    want = _masked_reference(x, w, b, in_mask, out_mask, stride, padding, dilation, groups, grad)
    xt, wt = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    bt = None if b is None else b.clone().requires_grad_(True)
    for name in ("empty", "empty_like"):  # NaN-filled fresh memory: an element left unwritten shows
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))
    y = _kernels().counted_conv2d(xt, wt, bt, kept_first(in_mask), kept_first(out_mask), (stride, stride),
                                  (padding, padding), (dilation, dilation), depthwise)
    (y * grad).sum().backward()
    monkeypatch.undo()
    for got, expected in zip((y, xt.grad, wt.grad, None if bt is None else bt.grad), want):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("split", [2, 3])
def test_counted_grad_weight_split_k_writes_the_whole_weight(split):
    """Counted split-K: full-size partial sums, every element written, equal to the one-pass result."""
    from dcp_kernels.ops.triton.grad_weight import conv_grad_weight
    from dcp_kernels.rule import kept_first

    x, gy = torch.randn(3, 7, 9, 9), torch.randn(3, 6, 5, 5)
    in_kept, out_kept = kept_first(_mask(7, 4, 1)), kept_first(_mask(6, 5, 2))
    one = torch.full((6, 7, 3, 3), float("nan"))
    many = torch.full((6, 7, 3, 3), float("nan"))
    counts = (in_kept[1], out_kept[1])
    conv_grad_weight(gy, x, in_kept[0], out_kept[0], one, (2, 2), (1, 1), (1, 1), gy_compact=False,
                     x_compact=False, split=1, counts=counts)
    conv_grad_weight(gy, x, in_kept[0], out_kept[0], many, (2, 2), (1, 1), (1, 1), gy_compact=False,
                     x_compact=False, split=split, counts=counts)
    assert torch.isfinite(one).all() and torch.isfinite(many).all()
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
    block = _mask(6, 5, 2).view(-1, 1) & _mask(7, 4, 1).view(1, -1)
    assert (one[~block] == 0).all(), "zeros outside the kept block"


@pytest.mark.parametrize("affine", [False, True])
def test_counted_utility_update_matches_the_rule(affine):
    """The counted utility update touches exactly the kept channels, as the rule's update does."""
    from dcp_kernels.rule import kept_first, update_utilities

    a, g = torch.randn(3, 10, 4, 5), torch.randn(3, 10, 4, 5)
    mask = _mask(10, 6, 3)
    g = g * mask.view(1, -1, 1, 1)
    scale, shift = (torch.rand(10) + 0.5, torch.randn(10)) if affine else (None, None)
    a_eff = a * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) if affine else a
    want = torch.rand(10)
    got = want.clone()
    idx = mask.nonzero().squeeze(1)
    v = ops.reference.channel_utility(a_eff, g).index_select(0, idx)
    update_utilities(want, v, idx, 0.6)
    _kernels().update_utility_counted(a, g, got, kept_first(mask), 0.6, scale, shift)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["ragged", "k=1", "k=C", "channels_last", "bf16", "untracked"])
def test_static_batch_norm_gate_matches_batch_norm_and_the_mask(case, monkeypatch):
    """The static step's Triton BN + gate (ops/triton/batch_norm.py) against ``F.batch_norm`` and the
    reference gate: outputs (exact zeros on unselected channels), running statistics (only the kept
    channels move), the three gradients, and the utility it reduces alongside (against the reference
    ``channel_utility`` of the BN output). 37 channels over several channel blocks, 2 x 9 x 9 pixels
    over several pixel tiles; outputs allocated as NaN so an unwritten element fails. Measured
    spread against PyTorch in fp32: below 1e-6 of the values' scale (tolerance 1e-5)."""
    from dcp_kernels.ops import reference
    from dcp_kernels.rule import kept_first

    c, k = 37, {"k=1": 1, "k=C": 37}.get(case, 23)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    y = torch.randn(2, c, 9, 9) * 2 + 0.5
    if case == "channels_last":
        y = y.to(memory_format=torch.channels_last)
    y = y.to(dtype)
    weight, bias = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    mask = _mask(c, k, 4)
    grad_out = torch.randn(2, c, 9, 9).to(dtype)
    running = None if case == "untracked" else (rm.clone(), rv.clone())

    kernels = _kernels()
    for name in ("empty", "empty_like"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))
    out, mean, invstd = kernels.batch_norm_gate(y, weight, bias, running, kept_first(mask), 0.1, 1e-5)
    grad_y, grad_w, grad_b, v = kernels.batch_norm_gate_backward(grad_out, y, weight, bias, mean, invstd,
                                                                  kept_first(mask))
    monkeypatch.undo()

    yr, wr, br = y.float().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
    want_rm, want_rv = rm.clone(), rv.clone()
    a = torch.nn.functional.batch_norm(yr, want_rm, want_rv, wr, br, True, 0.1, 1e-5)
    gate = mask.view(1, -1, 1, 1)
    (a * gate * grad_out.float()).sum().backward()
    tol = dict(rtol=3e-2, atol=3e-2) if case == "bf16" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), (a * gate).detach(), **tol)
    assert (out[:, ~mask] == 0).all() and (grad_y[:, ~mask] == 0).all()
    torch.testing.assert_close(grad_y.float(), yr.grad, **tol)
    torch.testing.assert_close(grad_w, wr.grad, **tol)
    torch.testing.assert_close(grad_b, br.grad, **tol)
    order, count = kept_first(mask)
    want_v = reference.channel_utility(a.detach(), grad_out.float() * gate)[order]
    want_v[int(count):] = 0
    torch.testing.assert_close(v, want_v, **tol)
    # Written at the channels into a given vector (a row of the network-wide utility update), every
    # entry (NaN-filled first): the utility at the kept channels, 0 elsewhere.
    row = torch.full((y.shape[1],), float("nan"))
    kernels.batch_norm_gate_backward(grad_out, y, weight, bias, mean, invstd, kept_first(mask), utility_out=row)
    torch.testing.assert_close(row, torch.where(mask, reference.channel_utility(a.detach(), grad_out.float() * gate),
                                                0.0), **tol)
    if running is not None:
        torch.testing.assert_close(running[0], torch.where(mask, want_rm, rm), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(running[1], torch.where(mask, want_rv, rv), rtol=1e-5, atol=1e-6)
        assert torch.equal(running[0][~mask], rm[~mask]) and torch.equal(running[1][~mask], rv[~mask])


def test_empty_batch():
    x, w = torch.randn(0, 4, 5, 5, requires_grad=True), torch.randn(3, 4, 3, 3, requires_grad=True)
    y = ops.gathered_conv2d(x, w, None, torch.tensor([1, 2]), torch.tensor([0, 2]), 1, 1, backend="triton")
    assert y.shape == (0, 3, 5, 5)
    y.sum().backward()
    assert torch.count_nonzero(w.grad) == 0


def test_opcheck_registered_ops():
    """Schema, fake kernels, autograd registration and dispatch of the custom ops (torch.library.opcheck)."""
    k = _kernels()
    x, w, b = torch.randn(2, 5, 6, 6, requires_grad=True), torch.randn(4, 5, 3, 3, requires_grad=True), torch.randn(4)
    in_idx, out_idx = torch.tensor([0, 2, 4]), torch.tensor([1, 3])
    for y_compact in (False, True):
        torch.library.opcheck(k.conv2d_op, (x, w, b, in_idx, out_idx, [1, 1], [1, 1], [1, 1], False, False, y_compact))
    xd, wd = torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(4, 1, 3, 3, requires_grad=True)
    torch.library.opcheck(k.conv2d_op, (xd, wd, None, in_idx[:2], out_idx, [2, 2], [1, 1], [1, 1], True, False, True))
    gy = torch.randn(2, 2, 6, 6)
    torch.library.opcheck(k.conv2d_backward_op,
                          (gy, x.detach(), w.detach(), in_idx, out_idx, [1, 1], [1, 1], [1, 1], False, False, True,
                           [True, True, True]))
    torch.library.opcheck(k.channel_utility_op, (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)))


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backends("cpu")["triton"] is False
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        ops.resolve_backend("triton", torch.device("cpu"))


@needs_cuda
@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("stride", [1, 2])
def test_compiled_kernels_on_cuda(groups, stride):
    """The compiled (not interpreted) kernels against the reference on a GPU, fp32 without TF32."""
    dev = torch.device("cuda")
    x = torch.randn(4, 8, 17, 15, device=dev)
    w = torch.randn(24 if groups == 1 else 8, 8 // groups, 3, 3, device=dev)
    b = torch.randn(w.shape[0], device=dev)
    in_idx = sorted_subset(8, 5, 1).to(dev) if groups == 1 else torch.arange(8, device=dev)
    out_idx = sorted_subset(w.shape[0], w.shape[0] // 2, 2).to(dev)
    y_ref = ops.gathered_conv2d(x, w, b, in_idx, out_idx, stride, 1, 1, groups, backend="reference")
    grad = torch.randn_like(y_ref)
    ref = _reference(x, w, b, in_idx, out_idx, stride, 1, 1, groups, grad)
    xt, wt, bt = (t.clone().requires_grad_(True) for t in (x, w, b))
    y = ops.gathered_conv2d(xt, wt, bt, in_idx, out_idx, stride, 1, 1, groups, backend="triton")
    (y * grad).sum().backward()
    for got, want in zip((y, xt.grad, wt.grad, bt.grad), ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ops_register_as_triton_ops_outside_the_interpreter():
    """On a GPU the ops are registered with ``torch.library.triton_op`` (the interpreter uses
    ``custom_op``): that registration runs here too, without a GPU, in a fresh process."""
    import subprocess
    import sys

    code = ("import torch, dcp_kernels.ops.triton\n"
            "print(torch.ops.dcp_triton.update_utility.default._schema)\n"
            "print(torch.ops.dcp_triton.conv2d_backward.default._schema)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Tensor(a4!) utility" in done.stdout and "dcp_triton::conv2d_backward(" in done.stdout
