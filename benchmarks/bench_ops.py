"""Op level: one 3x3 conv, forward + backward, fp32, side by side in one run.

Variants per shape (one pytest-benchmark group per shape and keep ratio, so ratios read off directly):
  dense      F.conv2d on the full tensors (what nn.Conv2d training costs)
  reference  the paper's masked implementation (dense conv + channel masks)
  torch      our compact PyTorch backend on full-width tensors (the op contract: gather -> conv
             -> scatter, compact backward)
  torch-compact-io  the same backend with compact input and output, as between two layers of a
             converted model (``compact_activations=True``): no gather/scatter copies
  ideal      a dense conv on tensors already of the compact size (perfect skipping)

Gradients are taken with ``torch.autograd.grad`` so no variant pays for ``.grad`` accumulation.
"""
import pytest
import torch
import torch.nn.functional as F

from dcp_kernels import ops

# (N, C, H): C_in = C_out = C, H = W.
SHAPES = [(64, 128, 16), (64, 256, 8), (32, 64, 32)]
QUICK_SHAPES = [(8, 32, 8)]
KEEPS = [0.5]
VARIANTS = ["dense", "reference", "torch", "torch-compact-io", "ideal"]


def _case(n, c, h, keep):
    g = torch.Generator().manual_seed(0)
    k = max(1, round(c * keep))
    x = torch.randn(n, c, h, h, generator=g, requires_grad=True)
    w = torch.randn(c, c, 3, 3, generator=g, requires_grad=True)
    in_idx = torch.randperm(c, generator=g)[:k].sort().values
    out_idx = torch.randperm(c, generator=g)[:k].sort().values
    grad = torch.randn(n, c, h, h, generator=g)
    return x, w, in_idx, out_idx, grad


def _step_fn(variant, x, w, in_idx, out_idx, grad):
    if variant == "dense":
        return lambda: torch.autograd.grad(F.conv2d(x, w, padding=1), (x, w), grad)
    xc = x.detach()[:, in_idx].clone().requires_grad_(True)
    gc = grad[:, out_idx].contiguous()
    if variant == "ideal":
        wc = w.detach()[out_idx][:, in_idx].clone().requires_grad_(True)
        return lambda: torch.autograd.grad(F.conv2d(xc, wc, padding=1), (xc, wc), gc)
    if variant == "torch-compact-io":
        return lambda: torch.autograd.grad(
            ops.gathered_conv2d(xc, w, None, in_idx, out_idx, 1, 1, backend="torch", layout="compact",
                                input_layout="compact", validate=False), (xc, w), gc
        )
    return lambda: torch.autograd.grad(
        ops.gathered_conv2d(x, w, None, in_idx, out_idx, 1, 1, backend=variant, validate=False), (x, w), grad
    )


SHAPE_PARAMS = [pytest.param(s, id="N{}xC{}xH{}".format(*s)) for s in SHAPES] + [
    pytest.param(s, id="quick-N{}xC{}xH{}".format(*s), marks=pytest.mark.quick) for s in QUICK_SHAPES
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("keep", KEEPS, ids=lambda k: f"keep{k}")
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_conv3x3_fwd_bwd(benchmark, quick, shape, keep, variant):
    n, c, h = shape
    benchmark.group = f"conv3x3 fwd+bwd N={n} C={c} H=W={h} keep_in=keep_out={keep}"
    benchmark.extra_info.update(shape=list(shape), keep=keep, variant=variant, threads=torch.get_num_threads())
    fn = _step_fn(variant, *_case(n, c, h, keep))
    benchmark.pedantic(fn, rounds=3 if quick else 15, warmup_rounds=1 if quick else 3, iterations=1)
