"""The fused gather implicit-GEMM convolution of the CUDA extension (csrc/fused_conv_kernels.cuh).

``dcp::implicit_gemm_conv2d[_backward]`` on CPU tensors runs the CUDA kernels' own source, compiled by the
host compiler, under the CPU emulation of the CUDA execution model (csrc/emulation/cuda_emulation.h, a
test-only extension built by tests/emulated_kernels.py:
a fiber per CUDA thread, shared memory, barriers checked for divergence and run in two thread orders,
device-side asserts, emulated WMMA fragments with the API's alignment rules), with the host side
unchanged (checks, allocation, problems, tile family and split-K choice, csrc/fused_conv.h). Checked
against the reference convolution here: the index arithmetic, tiling, split-K, epilogues and the
kernels' thread-level code (staging, barriers, fragment offsets). Not checked without a GPU: speed, and
whatever nvcc compiles differently from the host compiler. Where a GPU exists, every test here also
runs on CUDA tensors, i.e. on the kernels on the device, with the same configurations forced.

Unwritten outputs show: with deterministic algorithms on, PyTorch fills ``empty`` tensors with NaN.
"""
import pytest
import torch
from conftest import DEVICES, sorted_subset

from dcp_kernels import ops
from dcp_kernels.ops import extension

pytestmark = pytest.mark.skipif(not extension.AVAILABLE,
                                reason=f"the C++ extension is not built here ({extension.LOAD_ERROR})")


@pytest.fixture(autouse=True)
def _emulated_kernels(request):
    """The emulated kernels are a test-only extension (tests/emulated_kernels.py), built on first use by
    the first CPU case: the CUDA cases (benchmarks/gpu_check.sh) run the real kernels and build nothing."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("device", "cpu") == "cpu":
        import emulated_kernels

        emulated_kernels.load()
# On CPU tensors the ops run the kernels emulated; on CUDA tensors (where a GPU exists) on the device.
DEVICES_BUILT = [d for d in DEVICES if d == "cpu" or extension.CUDA_BUILT]


@pytest.fixture(autouse=True)
def _nan_filled_empty_tensors():
    saved = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.utils.deterministic.fill_uninitialized_memory = saved[1]


def _case(n, c_in, c_out, h, w, kernel, k_in, k_out, depthwise, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    channels_in = c_out if depthwise else c_in
    x = torch.randn(n, channels_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, 1 if depthwise else c_in, *kernel, generator=g, dtype=torch.float64)
    weight /= weight[0].numel() ** 0.5  # outputs O(1)
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    in_idx, out_idx = sorted_subset(channels_in, k_in, seed + 1), sorted_subset(c_out, k_out, seed + 2)
    to = dict(device=device, dtype=dtype)
    return x.to(**to), weight.to(**to), bias.to(**to), in_idx.to(device), out_idx.to(device)


def _reference(x, weight, bias, in_idx, out_idx, stride, padding, dilation, depthwise, grad_seed=3):
    """y (full width) and the gradients of sum(y * r) for a fixed random r, in float64."""
    x64, w64, b64 = (t.detach().double().cpu().requires_grad_(True) for t in (x, weight, bias))
    groups = x.shape[1] if depthwise else 1
    y = ops.gathered_conv2d(x64, w64, b64, in_idx.cpu(), out_idx.cpu(), stride, padding, dilation, groups,
                            backend="reference")
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    (y * r).sum().backward()
    return y.detach(), r, x64.grad, w64.grad, b64.grad


def _run(device_op, x, weight, bias, in_idx, out_idx, stride, padding, dilation, depthwise, x_compact, y_compact,
         mma, splits):
    """Forward and backward through the op pair, inputs in the layouts asked for; results on the CPU in float64."""
    y_ref, r, gx_ref, gw_ref, gb_ref = _reference(x, weight, bias, in_idx, out_idx, stride, padding, dilation,
                                                  depthwise)
    x_in = x[:, in_idx] if x_compact else x
    conf = ([stride] * 2, [padding] * 2, [dilation] * 2, depthwise, x_compact, y_compact)
    forward, backward = device_op
    y = forward(x_in, weight, bias, in_idx, out_idx, *conf, mma, splits)
    grad_y = r.to(x.device, x.dtype)
    if y_compact:
        grad_y = grad_y[:, out_idx.cpu()].to(x.device)
    gx, gw, gb = backward(grad_y, x_in, weight, in_idx, out_idx, *conf, [True, True, True], mma, splits)
    cpu = in_idx.cpu(), out_idx.cpu()
    want = (y_ref[:, cpu[1]] if y_compact else y_ref, gx_ref[:, cpu[0]] if x_compact else gx_ref, gw_ref, gb_ref)
    return [t.cpu().double() for t in (y, gx, gw, gb)], want


OPS = (lambda *a: torch.ops.dcp.implicit_gemm_conv2d(*a), lambda *a: torch.ops.dcp.implicit_gemm_conv2d_backward(*a))

# (n, c_in, c_out, h, w, kernel, k_in, k_out, stride, padding, dilation): sizes off the 64-wide tiles,
# k = 1 and k = C, 1x1 and non-square kernels, strides and dilations that leave input pixels unread.
GEOMETRIES = [
    (2, 6, 5, 7, 9, (3, 3), 4, 3, 1, 1, 1),
    (3, 9, 70, 11, 10, (3, 3), 9, 67, 2, 1, 1),
    (2, 5, 4, 9, 9, (3, 2), 1, 1, 1, 2, 2),
    (2, 7, 8, 8, 8, (1, 1), 7, 8, 1, 0, 1),
    (1, 66, 3, 5, 6, (3, 3), 65, 2, 2, 0, 1),
    (4, 4, 4, 13, 12, (5, 5), 2, 4, 3, 2, 1),
]


@pytest.mark.parametrize("device", DEVICES_BUILT)
@pytest.mark.parametrize("x_compact, y_compact", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "N{}-C{}x{}-{}x{}-k{}-keep{}x{}-s{}p{}d{}".format(
    g[0], g[1], g[2], g[3], g[4], "x".join(map(str, g[5])), g[6], g[7], g[8], g[9], g[10]))
def test_matches_the_reference_float64(geometry, x_compact, y_compact, device):
    n, c_in, c_out, h, w, kernel, k_in, k_out, stride, padding, dilation = geometry
    case = _case(n, c_in, c_out, h, w, kernel, k_in, k_out, False, torch.float64, device)
    got, want = _run(OPS, *case, stride, padding, dilation, False, x_compact, y_compact, mma=0, splits=0)
    for name, a, b in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES_BUILT)
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 1000])
def test_split_k_ranges_cover_the_batch_once(splits, device):
    """Grad-weight split 1..many ways (1000: more splits than K tiles, clamped): every split's range
    summed once, in order."""
    case = _case(3, 9, 7, 9, 11, (3, 3), 5, 4, False, torch.float64, device)
    got, want = _run(OPS, *case, 1, 1, 1, False, False, False, mma=0, splits=splits)
    torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES_BUILT)
def test_channels_last_input_is_read_through_its_strides(device):
    x, weight, bias, in_idx, out_idx = _case(2, 8, 6, 7, 7, (3, 3), 5, 4, False, torch.float64, device)
    got, want = _run(OPS, x.contiguous(memory_format=torch.channels_last), weight, bias, in_idx, out_idx, 1, 1, 1,
                     False, False, False, mma=0, splits=2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", [(2, 5, 6, 9, 8, (3, 3), 3, 4, 1, 1, 1), (3, 4, 7, 10, 9, (3, 3), 4, 7, 2, 1, 2),
                                      (1, 3, 5, 6, 6, (5, 5), 1, 1, 1, 2, 1)])
@pytest.mark.parametrize("device", DEVICES_BUILT)
def test_depthwise_matches_the_reference(geometry, device):
    n, _, c, h, w, kernel, k_in, k_out, stride, padding, dilation = geometry
    case = _case(n, c, c, h, w, kernel, k_in, k_out, True, torch.float64, device)
    for y_compact in (False, True):
        got, want = _run(OPS, *case, stride, padding, dilation, True, False, y_compact, mma=0, splits=0)
        for name, a, b in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


# Largest |error| / max|value| over the four results, measured (2026-11-28, 3 seeds, both tile families):
# 4.2e-4 (float16) and 3.9e-3 (bfloat16), i.e. rounding the outputs to 16 bits (half an ulp at the largest
# value: 4.9e-4 and 3.9e-3; float accumulation adds nothing visible). Tolerance: twice that bound.
HALF_TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("device", DEVICES_BUILT)
@pytest.mark.parametrize("mma", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_with_both_tile_families(dtype, mma, device):
    """fp16/bf16 inputs, float accumulation, on the SIMT tiles and the tensor-core tiles (64x64x16)."""
    if device == "cuda" and mma and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("tensor-core tiles need compute capability 8.0")
    case = _case(2, 20, 70, 9, 9, (3, 3), 17, 66, False, dtype, device)
    got, want = _run(OPS, *case, 1, 1, 1, False, False, False, mma=mma, splits=0)
    # The reference runs on the same rounded inputs in float64: what is left is accumulation and output rounding.
    for name, a, b in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, want):
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=HALF_TOLERANCE[dtype] * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES_BUILT)
def test_float32_on_tensor_core_tiles_is_tf32(device):
    """fp32 on the tensor-core tiles multiplies TF32 operands (10 mantissa bits, as cuDNN with TF32
    allowed), accumulating in fp32; the SIMT tiles stay exact fp32."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("tensor-core tiles need compute capability 8.0")
    case = _case(2, 20, 70, 9, 9, (3, 3), 17, 66, False, torch.float32, device)
    tf32, _ = _run(OPS, *case, 1, 1, 1, False, False, False, mma=1, splits=0)
    exact, want = _run(OPS, *case, 1, 1, 1, False, False, False, mma=0, splits=0)
    for name, t, e, w in zip(("y", "grad_x", "grad_weight", "grad_bias"), tf32, exact, want):
        scale = float(w.abs().max())
        # Largest error / scale measured (2026-11-28, seeds 0-2): fp32 1.4e-6, TF32 3.6e-4 (TF32 rounds each
        # operand by up to 4.9e-4 relative; errors of a sum partly cancel). Tolerances: 1e-5 and 2e-3.
        torch.testing.assert_close(e, w, rtol=0, atol=1e-5 * scale, msg=lambda m: f"{name} (fp32): {m}")
        torch.testing.assert_close(t, w, rtol=0, atol=2e-3 * scale, msg=lambda m: f"{name} (tf32): {m}")
    # grad_bias sums grad_y only: no product, so no TF32 rounding; the three GEMMs are rounded.
    assert all(float((t - e).abs().max()) > 0 for t, e in zip(tf32[:3], exact[:3]))


def test_tf32_rounding_is_to_nearest_ties_away():
    x = torch.tensor([1 + 2 ** -11, 1 + 2 ** -10 + 2 ** -11, -(1 + 2 ** -11), 1 + 2 ** -12, 3.0e38, float("inf")])
    w = torch.ones(1, 1, 1, 1)
    idx = torch.tensor([0])
    got = torch.ops.dcp.implicit_gemm_conv2d(x.view(6, 1, 1, 1), w, None, idx, idx, [1, 1], [0, 0], [1, 1],
                                             False, False, False, 1, 0).flatten()
    want = torch.tensor([1 + 2 ** -10, 1 + 2 ** -9, -(1 + 2 ** -10), 1.0, 3.0e38, float("inf")])
    assert torch.equal(got[:4], want[:4]) and float(got[4]) == pytest.approx(3.0e38, rel=1e-3) and got[5] == want[5]


def test_configuration_errors_name_the_argument():
    x, weight, bias, in_idx, out_idx = _case(1, 4, 4, 5, 5, (3, 3), 2, 2, False, torch.float32, "cpu")
    conf = ([1, 1], [1, 1], [1, 1], False, False, False)
    with pytest.raises(RuntimeError, match="mma=1 \\(tensor-core tiles\\) needs float16/bfloat16/float32"):
        torch.ops.dcp.implicit_gemm_conv2d(x.double(), weight.double(), bias.double(), in_idx, out_idx, *conf, 1, 0)
    with pytest.raises(RuntimeError, match="mma must be -1"):
        torch.ops.dcp.implicit_gemm_conv2d(x, weight, bias, in_idx, out_idx, *conf, 2, 0)
    with pytest.raises(RuntimeError, match="wgrad_splits must be >= 0"):
        torch.ops.dcp.implicit_gemm_conv2d_backward(torch.ones(1, 4, 5, 5), x, weight, in_idx, out_idx, *conf,
                                                    [False, True, False], 0, -1)
    with pytest.raises(RuntimeError, match="grad_y has shape"):
        torch.ops.dcp.implicit_gemm_conv2d_backward(torch.ones(1, 4, 4, 5), x, weight, in_idx, out_idx, *conf,
                                                    [True, True, True], 0, 0)


def test_opcheck_of_the_configured_ops():
    """Schemas, fake kernels and dispatch of the configured ops (torch.library.opcheck)."""
    x, weight, bias, in_idx, out_idx = _case(2, 5, 4, 6, 6, (3, 3), 3, 2, False, torch.float32, "cpu")
    conf = ([2, 2], [1, 1], [1, 1], False, False)
    for y_compact in (False, True):
        torch.library.opcheck(torch.ops.dcp.implicit_gemm_conv2d.default,
                              (x, weight, bias, in_idx, out_idx, *conf, y_compact, 0, 0))
    torch.library.opcheck(torch.ops.dcp.implicit_gemm_conv2d_backward.default,
                          (torch.randn(2, 2, 3, 3), x, weight, in_idx, out_idx, *conf, True, [True, True, True], 0, 2))


def test_out_of_range_indices_trip_the_kernels_device_side_assert():
    """The kernels check every index they read on the device (no host sync): in the emulation, as on
    a GPU, an index outside the weight's channels fails the launch, naming the argument."""
    x, weight, bias, in_idx, out_idx = _case(1, 4, 6, 5, 5, (3, 3), 2, 3, False, torch.float32, "cpu")
    conf = ([1, 1], [1, 1], [1, 1], False, False, False)
    bad_in, bad_out = in_idx.clone(), out_idx.clone()
    bad_in[-1], bad_out[-1] = 4, 6
    with pytest.raises(RuntimeError, match=r"device-side assert.*in_idx holds an index outside \[0, C_in\)"):
        torch.ops.dcp.implicit_gemm_conv2d(x, weight, bias, bad_in, out_idx, *conf, 0, 0)
    with pytest.raises(RuntimeError, match=r"device-side assert.*out_idx holds an index outside \[0, C_out\)"):
        torch.ops.dcp.implicit_gemm_conv2d_backward(torch.ones(1, 6, 5, 5), x, weight, in_idx, bad_out, *conf,
                                                    [True, True, True], 1, 0)


def test_the_emulation_catches_races_divergent_barriers_and_wmma_misuse():
    """What the emulation claims to catch, shown on small kernels with each bug (and their fixed twins)."""
    run = torch.ops.dcp._emulation_selftest
    # Each thread reads its neighbour's shared slot: after a barrier right, without one wrong in one
    # of the two thread orders (each block of two runs in one).
    for side in ("next", "previous"):
        shift = 1 if side == "next" else -1
        want = torch.arange(64).roll(-shift).repeat(2, 1) + torch.tensor([[0], [1000]])
        assert torch.equal(run(f"synced_{side}"), want.int())
        assert not torch.equal(run(f"race_{side}"), want.int())
    with pytest.raises(RuntimeError, match=r"thread \(31, 0, 0\) waits at the __syncthreads\(\) of line \d+, "
                                           r"thread \(32, 0, 0\) at line"):
        run("divergent_barriers")
    with pytest.raises(RuntimeError, match=r"thread \(0, 0, 0\) returned while .* waits at the __syncthreads"):
        run("return_before_barrier")
    run("wmma_aligned")
    with pytest.raises(RuntimeError, match="load_matrix_sync .*not 256-bit aligned"):
        run("wmma_misaligned")
    with pytest.raises(RuntimeError, match="ldm = 18 is not a multiple of 16 bytes"):
        run("wmma_bad_ldm")
    with pytest.raises(RuntimeError, match=r"device-side assert .* thread \(5, 0, 0\) of block \(0, 0, 0\): "
                                           "thread 5 asserts"):
        run("assert")
    # Out-of-bounds reads are caught only by an AddressSanitizer build (csrc/sanitize.sh, run in CI,
    # makes "read_out_of_bounds" fail with ASan's report); here its in-bounds twin, and the refusal
    # to run the out-of-bounds case without ASan.
    assert torch.equal(run("read_in_bounds"), torch.arange(64, dtype=torch.float32))
    if not run("sanitized").item():
        with pytest.raises(RuntimeError, match="needs an AddressSanitizer build"):
            run("read_out_of_bounds")
