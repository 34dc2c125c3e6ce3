"""Op level: one conv, forward + backward, side by side in one run.

Variants per shape and keep ratio (one pytest-benchmark group each, so ratios read off directly):
  dense      F.conv2d on the full tensors (what nn.Conv2d training costs)
  reference  the paper's masked implementation (dense conv + channel masks)
  torch      our compact PyTorch backend on full-width tensors (the op contract: gather -> conv
             -> scatter, compact backward)
  torch-compact-io  the same backend with compact input and output, as between two layers of a
             converted model (``compact_activations=True``): no gather/scatter copies
  ideal      a dense conv on tensors already of the compact size (perfect skipping)

``keep`` is the fraction of input and of output channels kept (the FLOPs scale with keep**2).
Gradients are taken with ``torch.autograd.grad`` so no variant pays for ``.grad`` accumulation.
"""
import pytest
import torch
import torch.nn.functional as F

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
QUICK_SHAPES = [("tiny", 8, 32, 8, 3)]
KEEPS = [1.0, 0.75, 0.5, 0.25]
QUICK_KEEPS = [0.5]
VARIANTS = ["dense", "reference", "torch", "torch-compact-io", "ideal"]


def _case(n, c, h, k, keep, device):
    g = torch.Generator().manual_seed(0)
    kept = max(1, round(c * keep))
    x = torch.randn(n, c, h, h, generator=g).to(device).requires_grad_(True)
    w = torch.randn(c, c, k, k, generator=g).to(device).requires_grad_(True)
    in_idx = torch.randperm(c, generator=g)[:kept].sort().values.to(device)
    out_idx = torch.randperm(c, generator=g)[:kept].sort().values.to(device)
    grad = torch.randn(n, c, h, h, generator=g).to(device)
    return x, w, in_idx, out_idx, grad


def _step_fn(variant, x, w, in_idx, out_idx, grad):
    pad = w.shape[-1] // 2
    if variant == "dense":
        return lambda: torch.autograd.grad(F.conv2d(x, w, padding=pad), (x, w), grad)
    xc = x.detach()[:, in_idx].clone().requires_grad_(True)
    gc = grad[:, out_idx].contiguous()
    if variant == "ideal":
        wc = w.detach()[out_idx][:, in_idx].clone().requires_grad_(True)
        return lambda: torch.autograd.grad(F.conv2d(xc, wc, padding=pad), (xc, wc), gc)
    if variant == "torch-compact-io":
        return lambda: torch.autograd.grad(
            ops.gathered_conv2d(xc, w, None, in_idx, out_idx, 1, pad, backend="torch", layout="compact",
                                input_layout="compact", validate=False), (xc, w), gc
        )
    return lambda: torch.autograd.grad(
        ops.gathered_conv2d(x, w, None, in_idx, out_idx, 1, pad, backend=variant, validate=False), (x, w), grad
    )


def _shape_id(s):
    return "{}-N{}xC{}xH{}-k{}".format(*s)


CASES = [pytest.param(s, keep, id=f"{_shape_id(s)}-keep{keep}") for s in SHAPES for keep in KEEPS] + [
    pytest.param(s, keep, id=f"quick-{_shape_id(s)}-keep{keep}", marks=pytest.mark.quick)
    for s in QUICK_SHAPES for keep in QUICK_KEEPS
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape, keep", CASES)
def test_conv_fwd_bwd(benchmark, quick, device, timed, shape, keep, variant):
    name, n, c, h, k = shape
    benchmark.group = f"op {name} conv{k}x{k} fwd+bwd N={n} C={c} H=W={h} keep={keep}"
    benchmark.extra_info.update(level="op", model=name, shape=[n, c, h, k], keep=keep, variant=variant,
                                device=str(device), threads=torch.get_num_threads())
    fn = timed(_step_fn(variant, *_case(n, c, h, k, keep, device)))
    benchmark.pedantic(fn, rounds=3 if quick else 10, warmup_rounds=1 if quick else 2, iterations=1)
