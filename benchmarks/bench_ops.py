"""Op level: one conv, forward alone and forward + backward, side by side in one run.

Variants per shape and keep ratio (one pytest-benchmark group each, so ratios read off directly):
  dense      F.conv2d on the full tensors (what nn.Conv2d training costs)
  reference  the paper's masked implementation (dense conv + channel masks)
  torch      our compact PyTorch backend on full-width tensors (the op contract: gather -> conv
             -> scatter, compact backward)
  triton     our fused gather implicit-GEMM Triton kernels (CUDA only; skipped elsewhere)
  <backend>-compact-io  that backend with compact input and output, as between two layers of a
             converted model (``compact_activations=True``): no gather/scatter copies
  ideal      a dense conv on tensors already of the compact size (perfect skipping)

``keep`` is the fraction of input and of output channels kept (the FLOPs scale with keep**2).
``--channels-last``: every tensor in channels_last (NHWC) memory, as GPU users train.
Gradients are taken with ``torch.autograd.grad`` so no variant pays for ``.grad`` accumulation.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_skip_reason

from dcp_kernels import ops

# (name, N, C, H, kernel): C_in = C_out = C, H = W. VGG-16 on CIFAR-10 (32x32 input, batch 64;
# the 32x32 layer at batch 32), ResNet-50 on ImageNet (224x224 input; batch scaled down to 8 for CPU).
SHAPES = [
    ("vgg16-cifar", 32, 64, 32, 3),
    ("vgg16-cifar", 64, 128, 16, 3),
    ("vgg16-cifar", 64, 256, 8, 3),
    ("vgg16-cifar", 64, 512, 4, 3),
    ("resnet50-imagenet", 8, 64, 56, 3),
    ("resnet50-imagenet", 8, 128, 28, 3),
    ("resnet50-imagenet", 8, 256, 14, 3),
    ("resnet50-imagenet", 8, 512, 7, 3),
]
# ResNet-50's 3x3 convs at the batch users train with on a GPU (collected and skipped on a CPU).
GPU_SHAPES = [
    ("resnet50-imagenet-b64", 64, 64, 56, 3),
    ("resnet50-imagenet-b64", 64, 128, 28, 3),
    ("resnet50-imagenet-b64", 64, 256, 14, 3),
    ("resnet50-imagenet-b64", 64, 512, 7, 3),
]
QUICK_SHAPES = [("tiny", 8, 32, 8, 3)]
KEEPS = [1.0, 0.75, 0.5, 0.25]
QUICK_KEEPS = [0.5]
# Every backend the dispatch point knows joins automatically; one that cannot run on --device is
# collected and skipped with the reason (Triton without a GPU). "<backend>-compact-io" is that
# backend between converted layers (compact input and output).
BACKENDS = [name for name in ops.BACKENDS if name != "triton" or importlib.util.find_spec("triton")]
COMPACT_IO = [f"{name}-compact-io" for name in BACKENDS if name != "reference"]
VARIANTS = ["dense", *BACKENDS, *COMPACT_IO, "ideal"]


def _case(n, c, h, k, keep, device, dtype):
    g = torch.Generator().manual_seed(0)
    kept = max(1, round(c * keep))
    x = torch.randn(n, c, h, h, generator=g).to(device, dtype).requires_grad_(True)
    w = torch.randn(c, c, k, k, generator=g).to(device, dtype).requires_grad_(True)
    in_idx = torch.randperm(c, generator=g)[:kept].sort().values.to(device)
    out_idx = torch.randperm(c, generator=g)[:kept].sort().values.to(device)
    grad = torch.randn(n, c, h, h, generator=g).to(device, dtype)
    return x, w, in_idx, out_idx, grad


def _step_fn(variant, backward, x, w, in_idx, out_idx, grad):
    """The timed call: the variant's forward, and its backward via autograd.grad if ``backward``."""
    pad = w.shape[-1] // 2
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if nhwc else torch.contiguous_format  # the compact tensors follow x
    xc = x.detach()[:, in_idx].contiguous(memory_format=fmt).requires_grad_(True)
    gc = grad[:, out_idx].contiguous(memory_format=fmt)
    wc = w.detach()[out_idx][:, in_idx].contiguous(memory_format=fmt).requires_grad_(True)
    if variant == "dense":
        inputs, g, forward = (x, w), grad, lambda: F.conv2d(x, w, padding=pad)
    elif variant == "ideal":
        inputs, g, forward = (xc, wc), gc, lambda: F.conv2d(xc, wc, padding=pad)
    elif variant.endswith("-compact-io"):
        inputs, g, backend = (xc, w), gc, variant.removesuffix("-compact-io")
        forward = lambda: ops.gathered_conv2d(xc, w, None, in_idx, out_idx, 1, pad, backend=backend,
                                              layout="compact", input_layout="compact", validate=False)
    else:
        inputs, g = (x, w), grad
        forward = lambda: ops.gathered_conv2d(x, w, None, in_idx, out_idx, 1, pad, backend=variant, validate=False)
    if not backward:
        return forward
    return lambda: torch.autograd.grad(forward(), inputs, g)


def _shape_id(s):
    return "{}-N{}xC{}xH{}-k{}".format(*s)


CASES = [pytest.param(s, keep, id=f"{_shape_id(s)}-keep{keep}") for s in SHAPES for keep in KEEPS] + [
    pytest.param(s, keep, id=f"{_shape_id(s)}-keep{keep}", marks=pytest.mark.gpu_size)
    for s in GPU_SHAPES for keep in KEEPS
] + [
    pytest.param(s, keep, id=f"quick-{_shape_id(s)}-keep{keep}", marks=pytest.mark.quick)
    for s in QUICK_SHAPES for keep in QUICK_KEEPS
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape, keep", CASES)
@pytest.mark.parametrize("passes", ["fwd+bwd", "fwd"])
def test_conv(benchmark, quick, device, dtype, timed, channels_last, passes, shape, keep, variant):
    reason = backend_skip_reason(variant.removesuffix("-compact-io"), device)
    if shape in GPU_SHAPES and device.type != "cuda":
        reason = "a GPU-size shape (seconds per call on a CPU): run with --device cuda"
    if reason:
        pytest.skip(reason)
    name, n, c, h, k = shape
    precision = str(dtype).replace("torch.", "")
    if channels_last:
        precision += "-channels_last"
    benchmark.group = f"op {passes} {name} conv{k}x{k} N={n} C={c} H=W={h} keep={keep} {precision}"
    benchmark.extra_info.update(level="op", passes=passes, model=name, shape=[n, c, h, k], keep=keep,
                                variant=variant, dtype=precision, device=str(device),
                                threads=torch.get_num_threads())
    x, w, in_idx, out_idx, grad = _case(n, c, h, k, keep, device, dtype)
    if channels_last:
        fmt = torch.channels_last
        x = x.detach().contiguous(memory_format=fmt).requires_grad_(True)
        w = w.detach().contiguous(memory_format=fmt).requires_grad_(True)
        grad = grad.contiguous(memory_format=fmt)
    fn = timed(_step_fn(variant, passes == "fwd+bwd", x, w, in_idx, out_idx, grad))
    benchmark.pedantic(fn, rounds=3 if quick else 10, warmup_rounds=1 if quick else 2, iterations=1)
