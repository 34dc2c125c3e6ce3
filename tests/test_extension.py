"""The C++/CUDA extension (``dcp_kernels._C``): its ops against the reference path on CPU.

The shared backend grid of tests/test_ops.py, tests/test_modules.py and tests/test_convert.py also
runs on the ``extension`` backend; this file adds what is specific to the compiled ops: argument
errors raised from C++ (TORCH_CHECK, argument named), opcheck, torch.compile, gradcheck, the build's
CUDA story. CUDA tests run only where a GPU exists.
"""
import pytest
import torch
from conftest import sorted_subset

from dcp_kernels import ops
from dcp_kernels.ops import extension

pytestmark = pytest.mark.skipif(
    not extension.AVAILABLE,
    reason=f"the C++ extension is not built here ({extension.LOAD_ERROR}); .ci/run fails when it is not built, see docs/building.md",
)
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and extension.CUDA_BUILT),
                                reason="needs a CUDA device and a CUDA build of the extension")

dcp = torch.ops.dcp


def _args(**changes):
    args = dict(x=torch.randn(2, 6, 7, 7), weight=torch.randn(4, 6, 3, 3), bias=None,
                in_idx=torch.tensor([0, 2, 5]), out_idx=torch.tensor([1, 3]),
                stride=[1, 1], padding=[1, 1], dilation=[1, 1], depthwise=False, x_compact=False, y_compact=False)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(x=torch.randn(6, 7, 7)), "x must be 4-D"),
        (dict(x=torch.randn(2, 5, 7, 7)), "x has 5 channels"),
        (dict(x=torch.randn(2, 6, 7, 7).double()), "weight dtype"),
        (dict(in_idx=torch.tensor([0, 6])), "in_idx holds indices outside \\[0, 6\\)"),
        (dict(out_idx=torch.tensor([-1, 2])), "out_idx holds indices outside"),
        (dict(out_idx=torch.tensor([], dtype=torch.long)), "out_idx is empty"),
        (dict(in_idx=torch.tensor([0, 1], dtype=torch.int32)), "in_idx must be a 1-D int64"),
        (dict(x=torch.randn(2, 6, 7, 7).contiguous(memory_format=torch.channels_last)), "x must be a contiguous"),
        (dict(weight=torch.randn(4, 6, 3, 3).transpose(2, 3)), "weight must be a contiguous"),
        (dict(bias=torch.randn(3)), "bias must be a \\(4,\\) tensor"),
        (dict(stride=[1]), "stride must hold 2 values"),
        (dict(padding=[-1, 0]), "padding non-negative"),
        (dict(x_compact=True), "x_compact: len\\(in_idx\\)"),
    ],
)
def test_bad_arguments_are_named_by_the_cpp_checks(changes, match):
    args = _args(**changes)
    with pytest.raises(RuntimeError, match=match):
        dcp.gathered_conv2d(*args.values())


def test_mixed_devices_and_cuda_tensors_are_refused_clearly():
    args = _args(in_idx=torch.tensor([0, 2], device="meta"))
    with pytest.raises(RuntimeError, match="in_idx is on meta but x is on cpu"):
        dcp.gathered_conv2d(*args.values())
    if not torch.cuda.is_available():
        return
    cuda = _args(x=torch.randn(2, 6, 7, 7, device="cuda"), weight=torch.randn(4, 6, 3, 3, device="cuda"),
                 in_idx=torch.tensor([0, 2], device="cuda"), out_idx=torch.tensor([1], device="cuda"))
    if not extension.CUDA_BUILT:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            dcp.gathered_conv2d(*cuda.values())
    mixed = dict(cuda, weight=torch.randn(4, 6, 3, 3))
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        dcp.gathered_conv2d(*mixed.values())


def test_utility_op_checks_and_is_thread_count_independent():
    a, g = torch.randn(3, 7, 5, 5), torch.randn(3, 7, 5, 5)
    with pytest.raises(RuntimeError, match="one shape"):
        dcp.channel_utility(a, g[:2])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dcp.channel_utility(a, g)
        torch.set_num_threads(max(2, threads))
        many = dcp.channel_utility(a, g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    torch.testing.assert_close(one, ops.channel_utility(a, g, backend="reference"), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("depthwise", [False, True])
def test_opcheck(depthwise):
    """Schema, fake kernels, autograd registration, dispatch (torch.library.opcheck)."""
    if depthwise:
        x, w = torch.randn(2, 5, 6, 6, requires_grad=True), torch.randn(5, 1, 3, 3, requires_grad=True)
        in_idx, out_idx = torch.tensor([0, 2, 4]), torch.tensor([1, 2])
    else:
        x, w = torch.randn(2, 5, 6, 6, requires_grad=True), torch.randn(4, 5, 3, 3, requires_grad=True)
        in_idx, out_idx = torch.tensor([0, 2, 4]), torch.tensor([1, 3])
    b = torch.randn(w.shape[0], requires_grad=True)
    for y_compact in (False, True):
        torch.library.opcheck(dcp.gathered_conv2d.default,
                              (x, w, b, in_idx, out_idx, [2, 2], [1, 1], [1, 1], depthwise, False, y_compact))
    gy = torch.randn(2, 2, 3, 3)
    torch.library.opcheck(dcp.gathered_conv2d_backward.default,
                          (gy, x.detach(), w.detach(), in_idx, out_idx, [2, 2], [1, 1], [1, 1], depthwise, False, True,
                           [True, True, True]))
    torch.library.opcheck(dcp.channel_utility.default, (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)))


@pytest.mark.parametrize("depthwise", [False, True])
def test_gradcheck_fp64(depthwise):
    groups = 4 if depthwise else 1
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    in_idx, out_idx = torch.tensor([0, 2, 3]), torch.tensor([1, 3])

    def f(x, w, b):
        return ops.gathered_conv2d(x, w, b, in_idx, out_idx, 2, 1, 1, groups, backend="extension")

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(dtype):
    x = torch.randn(2, 6, 8, 8).to(dtype)
    w = (torch.randn(5, 6, 3, 3) / 3).to(dtype)
    in_idx, out_idx = sorted_subset(6, 4, 3), sorted_subset(5, 3, 4)
    y = ops.gathered_conv2d(x, w, None, in_idx, out_idx, 1, 1, backend="extension")
    want = ops.gathered_conv2d(x.float(), w.float(), None, in_idx, out_idx, 1, 1, backend="reference")
    assert y.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol * float(want.abs().max()))


@needs_cuda
@pytest.mark.parametrize("groups", [1, 8])
def test_cuda_kernels_match_the_reference(groups):
    dev = torch.device("cuda")
    x = torch.randn(4, 8, 17, 15, device=dev, requires_grad=True)
    w = torch.randn(24 if groups == 1 else 8, 8 // groups, 3, 3, device=dev, requires_grad=True)
    in_idx = sorted_subset(8, 5, 1).to(dev)
    out_idx = sorted_subset(w.shape[0], w.shape[0] // 2, 2).to(dev)
    results = []
    for backend in ("reference", "extension"):
        xb, wb = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        y = ops.gathered_conv2d(xb, wb, None, in_idx, out_idx, 2, 1, 1, groups, backend=backend)
        (y * torch.arange(y.numel(), device=dev).view_as(y).sin()).sum().backward()
        results.append((y, xb.grad, wb.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    a, g = torch.randn(4, 8, 9, 9, device=dev), torch.randn(4, 8, 9, 9, device=dev)
    torch.testing.assert_close(ops.channel_utility(a, g, backend="extension"),
                               ops.channel_utility(a, g, backend="reference"), rtol=1e-5, atol=1e-7)
