"""Step level: one whole training step (forward, backward, SGD step, utility update, selection).

Variants per network and prune ratio (one group each):
  dense      the network as built (nn.Conv2d), trained normally
  reference  converted with the paper's masked implementation
  torch      converted with our compact backend (compact activations between layers)
  triton     converted with the Triton kernels (CUDA only; skipped elsewhere)
  triton-static  the same with ``static_shapes=True`` (full-width activations, the selection read on
             the device only: the step CUDA graphs capture; benchmarks/bench_graphs.py graphs it)
  torch-capacity  ``backend="torch", static_shapes=True``: capacity widths (compact tensors of a
             fixed number of slots, padded with masked unselected channels; ATen convolutions at
             shapes that stay the same from step to step)
  torch-round8  ``torch`` with kept widths in multiples of 8 (``round_to=8``) on every device: few
             distinct conv shapes, so oneDNN's primitive cache and cuDNN's plans stay warm. Its
             selection is coarser than the others', so *ideal* (the ``torch`` selection's network)
             is not its ideal: read it against dense
  ideal      the same network built dense with exactly the per-layer widths the selection kept
             (the finalized model): what perfect skipping costs. Global selection keeps layers
             unevenly, so this is not simply (1 - prune_ratio)**2 of dense.

The selection comes from two exploration steps on random data, then one selecting step (widths in
multiples of 8 on a GPU: ``round_to=8``, dcp-train's default on every device). Networks named ``...-residual``
convert with ``prune_residual=True`` (residual groups pruned too, ranked by their members' mean
utility), so their ideal is really smaller than dense. ``cudnn.benchmark`` is on for every variant.
Every DCP variant's kept widths, FLOPs ratio and capacity waste are in ``extra_info``.
``--dtype bf16`` (or fp16) trains under autocast with channels-last tensors; fp32 (default) uses
PyTorch's defaults (TF32 convolutions on CUDA). The ``GPU_NETWORKS`` (ResNet-50 at 224 px, batch 64
and 128; CIFAR nets at batch 128) are the sizes users train on a GPU; they are skipped on a CPU.
Each variant's peak memory during one step (``extra_info["peak_bytes"]``) is measured once, outside
the timed rounds (see ``peak_memory.py``).
``vgg16-narrow-b1`` (``HOST_NETWORKS``) is VGG-16 at 1/16 width on one image: its step time is host
work, the per-step overhead each variant adds on any device. ``--compile`` runs every variant's model
under ``torch.compile`` (compiled during two warm-up rounds), for compiled-vs-compiled ratios;
``--compile-mode reduce-overhead`` captures them in CUDA graphs too (captured vs captured).
``test_selection`` times ``prop.select()`` alone, to read its share of a step.
``test_training_step_interleaved`` times the variants of a group in turn (the ratios to trust on a
noisy machine); ``test_training_step`` times each variant on its own.
"""
import copy
import importlib.util
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_skip_reason
from peak_memory import peak_bytes

import dcp_kernels
from dcp_kernels import ops
from dcp_kernels.models import resnet_cifar, vgg

# cuDNN picks its fastest algorithm per shape (every variant alike): the shapes of static-shape
# variants repeat, so its search pays off; dense and ideal always had fixed shapes.
torch.backends.cudnn.benchmark = True

NETWORKS = {
    "vgg16-cifar": (lambda: vgg("vgg16"), 64, 32),  # (factory, batch, image size)
    "resnet56-cifar": (lambda: resnet_cifar(56), 64, 32),
    "resnet56-cifar-residual": (lambda: resnet_cifar(56), 64, 32),
}
QUICK_NETWORKS = {"tiny-vgg": (lambda: vgg([16, "M", 32, 32, "M", 64]), 8, 16)}
# VGG-16's 13 convs at 1/16 width (4-32 channels), one 32 px image: the arithmetic costs next to
# nothing, so the step time is host work (Python, autograd, dispatch; launches on a GPU). That is
# what a GPU step at CIFAR size waits on (docs/benchmarks-gpu.md: the DCP step there is host-bound),
# measurable on any machine. One prune ratio.
HOST_NETWORKS = {"vgg16-narrow-b1": (lambda: vgg("vgg16", width=1 / 16), 1, 32)}


def _resnet50():
    import torchvision

    return torchvision.models.resnet50(num_classes=1000)


def _resnext50(num_classes=1000):
    import torchvision

    return torchvision.models.resnext50_32x4d(num_classes=num_classes)


# Networks with grouped convs (equal kept counts per group): `torch` and `reference` only (the
# Triton and extension kernels have no grouped conv; their grouped layers would run on `torch`).
# One CPU-size case at prune 0.5.
GROUPED_NETWORKS = {"resnext50-64px-b16": (lambda: _resnext50(10), 16, 64)}
# ResNet-50 with its residual groups pruned at a CPU size (the GPU twin: resnet50-imagenet-b128-residual).
RESIDUAL_NETWORKS = {"resnet50-112px-b16-residual": (lambda: _resnet50(), 16, 112)}


# The sizes users train on a GPU, where the convolutions (not launches) decide the step time. On
# the CPU one such step takes minutes: collected and skipped there.
GPU_NETWORKS = {
    "resnet50-imagenet-b64": (_resnet50, 64, 224),
    "resnet50-imagenet-b128": (_resnet50, 128, 224),
    "resnet50-imagenet-b128-residual": (_resnet50, 128, 224),
    "vgg16-cifar-b128": (lambda: vgg("vgg16"), 128, 32),
    "resnet56-cifar-b128": (lambda: resnet_cifar(56), 128, 32),
    "resnext50-imagenet-b64": (_resnext50, 64, 224),
}
GROUPED = {"resnext50-64px-b16", "resnext50-imagenet-b64"}
RATIOS = [0.0, 0.3, 0.5, 0.7]
GPU_RATIOS = [0.5, 0.7]
QUICK_RATIOS = [0.5]
_TRITON = importlib.util.find_spec("triton") is not None
VARIANTS = ["dense", *(name for name in ops.BACKENDS if name != "triton" or _TRITON),
            *(["triton-static"] if _TRITON else []), "torch-capacity", "torch-round8", "ideal"]
# How each DCP variant converts: (backend, static_shapes, round_to; None: 8 on a GPU, else 1).
CONVERSIONS = {"triton-static": ("triton", True, None), "torch-capacity": ("torch", True, None),
               "torch-round8": ("torch", False, 8)}


def _convert_kwargs(name: str) -> dict:
    """``prune_residual=True`` for the ``-residual`` networks."""
    return {"prune_residual": True} if name.endswith("-residual") else {}

_CACHE: dict = {}


def _precision_label(dtype: torch.dtype, compiled: bool = False) -> str:
    label = "fp32" if dtype == torch.float32 else f"{str(dtype).replace('torch.', '')}-autocast-channels_last"
    return label + ((f"-compiled-{compiled}" if isinstance(compiled, str) else "-compiled") if compiled else "")


def _batch(n, size, device, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (n,), generator=g).to(device)


def _precision(dtype: torch.dtype) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, channels_last) of a step benchmark: fp32 as built (TF32 where PyTorch's
    defaults allow it), or bf16/fp16 autocast with channels-last tensors (how GPU users train)."""
    return (None, False) if dtype == torch.float32 else (dtype, True)


def _sgd_step(model, x, y, amp_dtype=None, compile=False):
    """One training step; under ``amp_dtype`` autocast (bf16/fp16) when given; the model's forward
    (and with it its backward) under ``torch.compile`` when ``compile`` (True: the default mode, or
    a mode name such as ``"reduce-overhead"``)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    autocast = torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    mode = compile if isinstance(compile, str) else None
    forward = torch.compile(model, mode=mode) if compile else model

    def step():
        with autocast:
            loss = F.cross_entropy(forward(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _prepared(name, ratio, backend, device, dtype=torch.float32):
    """A converted copy of the network after exploration, with its first selection made.

    Cached per (network, ratio, device) group, so the variants of one group share it; the cache
    keeps one group alive at a time (memory).
    """
    group = (name, ratio, str(device), dtype)
    if _CACHE.get("group") != group:
        _CACHE.clear()
        _CACHE["group"] = group
    if backend not in _CACHE:
        factory, batch, size = ALL_NETWORKS[name]
        amp_dtype, channels_last = _precision(dtype)
        torch.manual_seed(0)
        model = factory().to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        # Widths in multiples of 8 on a GPU (tensor cores; dcp-train uses 8 on every device), the exact rule on the CPU,
        # unless the variant sets round_to (torch-round8).
        convert_backend, static, round_to = CONVERSIONS.get(backend, (backend, False, None))
        prop = dcp_kernels.convert(model, ratio, explore_epochs=1, backend=convert_backend,
                                   round_to=round_to or (8 if device.type == "cuda" else 1), static_shapes=static,
                                   **_convert_kwargs(name))
        for seed in (1, 2):  # two exploration steps
            _sgd_step(model, *_batch(batch, size, device, seed, channels_last), amp_dtype)()
        prop.epoch_end()
        _sgd_step(model, *_batch(batch, size, device, 3, channels_last), amp_dtype)()  # first selecting step
        _CACHE[backend] = (model, prop)
    return _CACHE[backend]


def _variant_model(name, ratio, variant, device, dtype=torch.float32):
    """(model, controller or None) for one variant of a group."""
    if variant == "dense":
        torch.manual_seed(0)
        model = ALL_NETWORKS[name][0]().to(device)
        return (model.to(memory_format=torch.channels_last) if _precision(dtype)[1] else model), None
    if variant == "ideal":
        _, prop = _prepared(name, ratio, "torch", device, dtype)
        return copy.deepcopy(prop.finalize()), prop
    return _prepared(name, ratio, variant, device, dtype)


def _networks(table, ratios, marks=()):
    return [pytest.param(name, ratio, id=f"{name}-prune{ratio}", marks=marks)
            for name in table for ratio in ratios]


CASES = (_networks(NETWORKS, RATIOS) + _networks(GROUPED_NETWORKS, [0.5]) + _networks(HOST_NETWORKS, [0.5])
         + _networks(RESIDUAL_NETWORKS, [0.5])
         + _networks(GPU_NETWORKS, GPU_RATIOS, marks=pytest.mark.gpu_size)
         + _networks(QUICK_NETWORKS, QUICK_RATIOS, marks=pytest.mark.quick))
ALL_NETWORKS = {**NETWORKS, **GROUPED_NETWORKS, **HOST_NETWORKS, **RESIDUAL_NETWORKS, **GPU_NETWORKS,
                **QUICK_NETWORKS}


def _skip_reason(name, variant, device):
    if name in GPU_NETWORKS and device.type != "cuda":
        return "a GPU-size training step (minutes per step on a CPU): run with --device cuda"
    if name.startswith(("resnet50", "resnext50")) and importlib.util.find_spec("torchvision") is None:
        return "needs torchvision (the dev extra)"
    if name in GROUPED and variant in ("triton", "triton-static", "extension"):
        return f"backend {variant!r} has no grouped-conv kernel (its grouped layers would run on torch)"
    variant = CONVERSIONS.get(variant, (variant,))[0]
    return None if variant is None else backend_skip_reason(variant, device)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name, ratio", CASES)
def test_training_step(benchmark, quick, device, dtype, compiled, timed, only_variants, name, ratio, variant):
    """Each variant timed on its own (readable in pytest-benchmark's table; sensitive to drift)."""
    reason = _skip_reason(name, variant, device)
    if only_variants is not None and variant not in only_variants:
        reason = "not among --variants"
    if reason:
        pytest.skip(reason)
    _, batch, size = ALL_NETWORKS[name]
    amp_dtype, channels_last = _precision(dtype)
    model, prop = _variant_model(name, ratio, variant, device, dtype)
    model.train()
    precision = _precision_label(dtype, compiled)
    benchmark.group = f"step {name} batch={batch} {size}x{size} prune={ratio} {precision}"
    benchmark.extra_info.update(level="step", model=name, prune_ratio=ratio, variant=variant, dtype=precision,
                                device=str(device), threads=torch.get_num_threads())
    if prop is not None:
        benchmark.extra_info.update(_widths(prop))
    step = _sgd_step(model, *_batch(batch, size, device, 4, channels_last), amp_dtype, compiled)
    step()  # the optimizer's momentum buffers exist (and a compiled model is compiled) before memory is measured
    benchmark.extra_info["peak_bytes"] = peak_bytes(step, device)
    benchmark.pedantic(timed(step), rounds=3 if quick else 4, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("name, ratio", CASES)
def test_training_step_interleaved(benchmark, rounds, device, dtype, compiled, timed, only_variants, name, ratio):
    """All variants of a group in turn: one round = one step of each. The per-variant medians over
    the rounds (``extra_info["interleaved"]``, seconds) are what ``report.py`` computes ratios from:
    a shared machine's slow spells then hit every variant alike."""
    reason = _skip_reason(name, None, device)
    if reason:
        pytest.skip(reason)
    _, batch, size = ALL_NETWORKS[name]
    amp_dtype, channels_last = _precision(dtype)
    x, y = _batch(batch, size, device, 4, channels_last)
    steps, widths = {}, {}
    variants = [v for v in VARIANTS if _skip_reason(name, v, device) is None
                and (only_variants is None or v in only_variants)]
    for variant in variants:
        model, prop = _variant_model(name, ratio, variant, device, dtype)
        model.train()
        steps[variant] = timed(_sgd_step(model, x, y, amp_dtype, compiled))
        if prop is not None and variant not in ("dense", "ideal"):
            widths[variant] = _widths(prop)
    samples: dict[str, list[float]] = {v: [] for v in variants}

    def one_round():
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            samples[variant].append(time.perf_counter() - start)

    # Compiled: two warm-up rounds (the first compiles, the second may still specialize).
    # Captured (reduce-overhead): a third warm-up round, in which the CUDA graphs are recorded.
    warmup = (3 if isinstance(compiled, str) else 2) if compiled else 1
    precision = _precision_label(dtype, compiled)
    benchmark.group = f"step-interleaved {name} batch={batch} {size}x{size} prune={ratio} {precision}"
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup, iterations=1)
    medians = {v: statistics.median(t[warmup:]) for v, t in samples.items()}
    benchmark.extra_info.update(level="step-interleaved", model=name, prune_ratio=ratio, interleaved=medians,
                                dtype=precision, device=str(device), threads=torch.get_num_threads(),
                                widths=widths)


def _widths(prop) -> dict:
    """What a DCP variant's step computes: kept channels per layer, conv FLOPs over dense, and under
    capacity widths the slots per layer and their waste (slots / kept)."""
    info = {"kept": dict(prop.kept()), "flops_ratio": prop.flops_ratio()}
    if prop.capacity:
        info.update(capacities=prop.capacities(), capacity_waste=prop.capacity_waste())
    return info


@pytest.mark.parametrize("name, ratio", [c for c in CASES if c.values[1] > 0])
def test_selection(benchmark, quick, device, timed, name, ratio):
    """``prop.select()`` alone (one stable sort over all utilities + writing the masks)."""
    reason = _skip_reason(name, None, device)
    if reason:
        pytest.skip(reason)
    _, prop = _prepared(name, ratio, "torch", device)
    benchmark.group = f"selection {name} prune={ratio}"
    benchmark.extra_info.update(level="selection", model=name, prune_ratio=ratio, variant="selection",
                                device=str(device), channels=prop.total_channels)
    benchmark.pedantic(timed(prop.select), rounds=20, warmup_rounds=2, iterations=5)
