"""Step level under CUDA graphs (GPU only): eager against graphed, dense against DCP against ideal.

A DCP step on a GPU waits on the host (docs/benchmarks-gpu.md); a CUDA graph removes the host from
the step. Variants, timed in turn (interleaved), prune 0.5, widths in multiples of 8:
  dense, dense-graphed            the network as built; eager, and one step captured and replayed
  triton-static                   converted with backend="triton", static_shapes=True, eager
  triton-static-graphed           the same, captured with dcp_kernels.cuda_graphs.GraphedStep
  ideal, ideal-graphed            the finalized network of the kept widths; eager and graphed
"Graphs vs graphs" is ``triton-static-graphed / dense-graphed``; the target is <= 1.0 on CIFAR VGG-16
batch 128 (GPU step issue, part 2). Every round trains on the same batch; the DCP variant's
selection still moves every step (its utilities change), inside the graph.
"""
import copy
import statistics
import time

import bench_step
import pytest
from gpu_step import _eager_plain, _graphed_plain, _plain_step
import torch

import dcp_kernels
from dcp_kernels.cuda_graphs import GraphedStep

NETWORKS = {name: bench_step.ALL_NETWORKS[name]
            for name in ("vgg16-cifar-b128", "resnet56-cifar-b128", "resnet50-imagenet-b64")}
RATIO = 0.5
VARIANTS = ["dense", "dense-graphed", "triton-static", "triton-static-graphed", "ideal", "ideal-graphed"]


def _static_dcp(name, device, dtype):
    """A converted copy on the static-shape Triton step, after exploration and its first selection."""
    factory, batch, size = NETWORKS[name]
    amp_dtype, channels_last = bench_step._precision(dtype)
    torch.manual_seed(0)
    model = factory().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    prop = dcp_kernels.convert(model, RATIO, explore_epochs=1, backend="triton", round_to=8, static_shapes=True)
    model.train()
    for seed in (1, 2):
        bench_step._sgd_step(model, *bench_step._batch(batch, size, device, seed, channels_last), amp_dtype)()
    prop.epoch_end()
    bench_step._sgd_step(model, *bench_step._batch(batch, size, device, 3, channels_last), amp_dtype)()
    return model, prop


def _steps(name, device, dtype, x, y):
    amp_dtype, channels_last = bench_step._precision(dtype)
    factory = NETWORKS[name][0]
    torch.manual_seed(0)
    dense = factory().to(device)
    if channels_last:
        dense = dense.to(memory_format=torch.channels_last)
    model, prop = _static_dcp(name, device, dtype)
    ideal = copy.deepcopy(prop.finalize())
    graphed_model, graphed_prop = _static_dcp(name, device, dtype)
    opt = torch.optim.SGD(graphed_model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    graphed = GraphedStep(_plain_step(graphed_model, opt, amp_dtype), graphed_model, graphed_prop, opt, warmup=2)
    steps = {
        "dense": _eager_plain(dense.train(), x, y, amp_dtype),
        "dense-graphed": _graphed_plain(copy.deepcopy(dense).train(), x, y, amp_dtype),
        "triton-static": bench_step._sgd_step(model, x, y, amp_dtype),
        "triton-static-graphed": lambda: graphed(x, y),
        "ideal": _eager_plain(ideal.train(), x, y, amp_dtype),
        "ideal-graphed": _graphed_plain(copy.deepcopy(ideal).train(), x, y, amp_dtype),
    }
    for _ in range(4):  # the graphed DCP step: warm-up, capture, replays
        steps["triton-static-graphed"]()
    assert graphed.captures == 1, "the DCP step should be captured once"
    return steps, prop


@pytest.mark.parametrize("name", list(NETWORKS))
def test_graphed_step_interleaved(benchmark, quick, device, dtype, timed, name):
    """Eager and graphed steps of dense, the static-shape DCP step and ideal, timed in turn."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need --device cuda")
    if name.startswith("resnet50") and dtype == torch.float32:
        pytest.skip("ResNet-50 is measured as users train it on a GPU: --dtype bf16")
    _, batch, size = NETWORKS[name]
    x, y = bench_step._batch(batch, size, device, 4, bench_step._precision(dtype)[1])
    steps, prop = _steps(name, device, dtype, x, y)
    steps = {variant: timed(fn) for variant, fn in steps.items()}
    samples: dict[str, list[float]] = {v: [] for v in steps}

    def one_round():
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            samples[variant].append(time.perf_counter() - start)

    rounds = 3 if quick else 10
    precision = bench_step._precision_label(dtype) + "-graphs"
    benchmark.group = f"step-graphs {name} batch={batch} {size}x{size} prune={RATIO} {precision}"
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=1, iterations=1)
    medians = {v: statistics.median(t[1:]) for v, t in samples.items()}
    benchmark.extra_info.update(level="step-interleaved", model=name, prune_ratio=RATIO, interleaved=medians,
                                dtype=precision, device=str(device), kept=dict(prop.kept()))
