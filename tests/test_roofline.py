"""benchmarks/roofline.py, the roofline estimate of a training step traced on the CPU: its FLOPs are
FlopCounterMode's, its bytes are what each op reads and writes, views cost nothing, and the step
traced on fake tensors at another size is exactly the step run for real at that size (the rule that
turns a CPU trace into the GPU configuration's)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dcp_kernels
from dcp_kernels.models import resnet_cifar, vgg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import roofline  # noqa: E402

H100 = roofline.GPUS["h100"]


def _only(records, op):
    """The one record of ``op`` among ``records``."""
    found = [r for r in records if r.op == op]
    assert len(found) == 1, [r.op for r in records]
    return found[0]


def _prepared(factory, *, dcp: bool, prune_residual: bool = False, batch: int = 2, pixels: int = 16,
              dtype: torch.dtype = torch.float32):
    """A small model past DCP's exploration (two steps, epoch end), then roofline's extra step: the
    state every trace restores. bf16: autocast and channels_last, as bench_step runs it."""
    torch.manual_seed(0)
    model = factory()
    bf16 = dtype == torch.bfloat16
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    prop = None
    if dcp:
        prop = dcp_kernels.convert(model, 0.5, explore_epochs=1, backend="torch", prune_residual=prune_residual)
        opt = roofline._optimizer(model)
        for seed in (1, 2):
            roofline._train_step(model, opt, *roofline._batch(batch, pixels, bf16, seed), dtype if bf16 else None)
        prop.epoch_end()
    return roofline.prepare(model, prop, batch, pixels, dtype)


def _key(records):
    return [(r.op, r.cls, r.phase, r.module, r.flops, r.tensors) for r in records]


@pytest.mark.parametrize("dcp", [False, True], ids=["dense", "dcp"])
def test_flops_equal_flop_counter_mode(dcp):
    """The traced step's FLOPs are FlopCounterMode's total for the same step (same state, the same
    CUDA code paths the trace takes)."""
    prepared = _prepared(lambda: vgg([8, "M", 16, 16, "M", 32]), dcp=dcp)
    traced = sum(r.flops for r in roofline.trace_step(prepared, 4, 16, fake=False).records)
    prepared.restore()
    with roofline._cuda_code_paths(real_kernels=True), FlopCounterMode(display=False) as counter:
        roofline._train_step(prepared.model, prepared.opt, *roofline._batch(4, 16, False), None)
    assert traced == counter.get_total_flops() > 0


def test_conv_forward_bytes_and_flops():
    """A 3x3 conv (2, 3, 8, 8) * (4, 3, 3, 3) -> (2, 4, 8, 8): input + weight + output bytes,
    2 * output * 3 * 3 * 3 FLOPs; NCHW operands get cuDNN's transposes, channels_last ones none."""
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    conv = _only(roofline.trace_call(lambda: F.conv2d(x, w, padding=1)), "convolution")
    assert conv.bytes == 4 * (2 * 3 * 8 * 8 + 4 * 3 * 3 * 3 + 2 * 4 * 8 * 8)
    assert conv.flops == 2 * (2 * 4 * 8 * 8) * 3 * 3 * 3
    assert conv.cls == "conv" and conv.conv_channels == (3, 4)
    assert roofline.kernels_of(conv) == 1 + 3  # the conv, and x, w, y transposed
    cl = torch.channels_last
    conv_cl = _only(roofline.trace_call(lambda: F.conv2d(x.to(memory_format=cl), w.to(memory_format=cl), padding=1)),
                    "convolution")
    assert conv_cl.bytes == conv.bytes and roofline.kernels_of(conv_cl) == 1


def test_in_place_and_partial_write_bytes():
    """In place: add_ reads both and writes its destination; copy_/zero_ write without reading it;
    index_copy_ writes only its source's rows; index_select reads only the rows it gathers."""
    x, y = torch.randn(1000), torch.randn(1000)
    dst, src, idx = torch.zeros(10, 5), torch.randn(3, 5), torch.tensor([0, 4, 7])
    records = roofline.trace_call(lambda: (x.add_(y), x.copy_(y), x.zero_(), dst.index_copy_(0, idx, src),
                                           dst.index_select(0, idx)))
    assert [r.bytes for r in records] == [3 * 4000, 2 * 4000, 4000, 3 * 8 + 2 * 60, 3 * 8 + 2 * 60]
    assert [r.cls for r in records] == ["elementwise", "copy_fill", "copy_fill", "gather_scatter", "gather_scatter"]
    assert all(roofline.kernels_of(r) == 1 for r in records)


def test_views_are_free():
    x = torch.randn(4, 6)
    records = roofline.trace_call(lambda: (x.view(-1), x.t(), x.permute(1, 0), x[1:], x[:, 2], x.unsqueeze(0),
                                           x.expand(2, 4, 6), x.reshape(24), x.split(2), x.unbind(0), x.detach(),
                                           torch.empty(3), x.as_strided((2,), (1,))))
    assert records and all(r.cls == "view" and r.bytes == 0 for r in records), [(r.op, r.cls) for r in records]
    assert all(roofline.kernels_of(r) == 0 and roofline.op_seconds(r, H100) == 0 for r in records)


@torch.library.custom_op("roofline_test::scale_shift", mutates_args=())
def _scale_shift(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def test_custom_ops_count_their_parts():
    """A Python custom op is not one GPU kernel: its aten ops are recorded (a fused Triton/CUDA op
    listed in ONE_KERNEL_CUSTOM_OPS would be one record)."""
    x = torch.randn(10)
    assert [r.op for r in roofline.trace_call(lambda: _scale_shift(x))] == ["mul", "add"]


def test_host_reads_are_kernels_with_a_note():
    t = torch.arange(4)
    records = roofline.trace_call(lambda: (t.tolist(), t.sum().item()))
    reads = [r for r in records if r.cls == "host_read"]
    assert [r.op for r in reads] == ["tolist", "_local_scalar_dense"]
    assert all(roofline.kernels_of(r) == 1 and "host read" in r.note for r in reads)


# The trace takes the CUDA step's fused BN backward where Triton is installed; the real step can run
# its kernels on CPU tensors only in Triton's interpreter (tests/conftest.py sets it without a GPU).
_SAME_PATHS = pytest.mark.skipif(dcp_kernels.ops._triton_installed() and not dcp_kernels.ops.triton_interpreting(),
                                 reason="the real step runs the fused BN backward's Triton kernels on CPU tensors: "
                                        "needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("dcp", [False, pytest.param(True, marks=_SAME_PATHS)], ids=["dense", "dcp-residual-pruned"])
def test_fake_trace_at_another_size_is_the_real_step(dcp):
    """The estimate's rule: the state made by real steps at batch 2, 16 px; the step at batch 6,
    32 px traced on fake tensors is op for op the step run for real at that size (FLOPs, bytes,
    layouts, kernels, estimated time), DCP's size-dependent code paths included."""
    prepared = _prepared(lambda: resnet_cifar(8), dcp=dcp, prune_residual=True)
    fake = roofline.trace_step(prepared, 6, 32)
    real = roofline.trace_step(prepared, 6, 32, fake=False)
    assert _key(fake.records) == _key(real.records)
    assert {r.phase for r in fake.records} == ({"select", "forward", "backward", "optimizer"} if dcp
                                                else {"forward", "backward", "optimizer"})
    fake_est, real_est = (roofline.estimate(t, "h100") for t in (fake, real))
    assert [fake_est[k] for k in ("ms", "kernels", "gb")] == [real_est[k] for k in ("ms", "kernels", "gb")]
    if dcp:  # the selection's one host read; the CUDA step's fused BN backward (one per converted layer)
        assert sum(r.cls == "host_read" for r in fake.records) == 1
        fused = [r for r in fake.records if r.op == "dcp_triton::bn_backward_partials"]
        expected = len(prepared.prop.layers) if dcp_kernels.ops._triton_installed() else 0
        assert len(fused) == expected and all(roofline.kernels_of(r) == 1 for r in fused)
    # ... and the trace at another size is not the same trace scaled: conv FLOPs grow with batch * pixels
    small = roofline.trace_step(prepared, 2, 16)
    conv = [sum(r.flops for r in t.records if r.op.startswith("convolution")) for t in (small, fake)]
    assert conv[1] == conv[0] * 3 * 4


@_SAME_PATHS
def test_fake_trace_in_bf16_equals_the_real_step():
    """Under bf16 autocast the fake trace runs the real step's ops with its FLOPs and bytes (the
    tracer makes the meta kernel's bf16 batch-norm statistics fp32, as the real kernels return them)."""
    prepared = _prepared(lambda: resnet_cifar(8), dcp=True, prune_residual=True, dtype=torch.bfloat16)
    fake = roofline.trace_step(prepared, 4, 32)
    real = roofline.trace_step(prepared, 4, 32, fake=False)
    assert [(r.op, r.phase, r.module, r.flops) for r in fake.records] == [
        (r.op, r.phase, r.module, r.flops) for r in real.records]
    fake_bytes, real_bytes = (sum(r.bytes for r in t.records) for t in (fake, real))
    assert abs(fake_bytes / real_bytes - 1) < 1e-3


def test_multi_tensor_launches():
    """CUDA's multi_tensor_apply packing: 64 tensors a launch at depth 2, 320 blocks of 65536."""
    assert roofline.multi_tensor_launches([100] * 161, 2) == 3
    assert roofline.multi_tensor_launches([65536 * 320 + 1], 1) == 2
    assert roofline.multi_tensor_launches([0, 5], 3) == 1


def test_tile_factor_pads_pruned_widths_only():
    conv = roofline.OpRecord("convolution", "conv", "forward", "", 1, (), conv_channels=(64, 48))
    assert roofline.tile_factor(conv, 64) == pytest.approx(64 / 48)
    assert roofline.tile_factor(roofline.OpRecord("convolution", "conv", "forward", "", 1, (), conv_channels=(3, 128)),
                                64) == 1.0


def test_run_reports_every_variant_against_dense_and_its_ideal():
    """The report of a small network through bench_step's builders (imported from tests/)."""
    report = roofline.run("tiny-vgg", "h100", "fp32", ["dense", "ideal", "torch"], batch=8, pixels=16)
    variants = report["variants"]
    assert variants["dense"]["vs_dense"] == 1.0 and variants["ideal"]["vs_ideal"] == 1.0
    assert variants["torch"]["kernels"] > variants["ideal"]["kernels"]
    over = report["dcp_over_ideal"]["torch"]
    assert over["kernels"] == variants["torch"]["kernels"] - variants["ideal"]["kernels"]
    assert set(over["by_layer"]) and "(selection)" in over["by_layer"]
    assert "| torch |" in roofline.format_report(report)
