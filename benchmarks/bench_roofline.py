"""Roofline ESTIMATES of one training step on an H100 (benchmarks/roofline.py), as benchmark entries.

Not timings: each entry traces every variant's step on the CPU (its state from real steps at a small
size, the step itself on fake tensors at the GPU configuration) and records the estimate in
``extra_info`` (``level="roofline"``, per variant: estimated ms, vs dense, vs ideal, kernels, GB,
TFLOP; DCP's extra time over its ideal). The measured time is the tracing's, run once
(``rounds=1``). The constants and their calibration error are roofline.py's (CALIBRATION,
CALIBRATION_ERROR); ``report.py`` leaves this level out of its tables.

    pytest benchmarks/bench_roofline.py --benchmark-only              # ResNet-50, VGG-16, ResNet-56
    pytest benchmarks/bench_roofline.py --benchmark-only --quick      # a tiny VGG, seconds
"""
import pytest
import roofline

GPU = "h100"
# (network, dtype): the GPU configurations (ResNet-50 224 px, CIFAR nets 32 px, batch 128),
# residual groups pruned (prune_residual=True), every variant.
FULL = [pytest.param(net, dtype, roofline.DEFAULT_VARIANTS, id=f"{net}-{dtype}")
        for net in ("resnet50", "vgg16", "resnet56") for dtype in ("fp32", "bf16")]
QUICK = [pytest.param("tiny-vgg", "fp32", ("dense", "ideal", "ideal-capacity", "torch", "torch-capacity"),
                      id="tiny-vgg-fp32", marks=pytest.mark.quick)]


def _summary(report: dict) -> dict:
    """What each variant's estimate says, for extra_info."""
    keys = ("ms", "vs_dense", "vs_ideal", "kernels", "gb", "tflop")
    return {name: {k: est[k] for k in keys} for name, est in report["variants"].items()}


@pytest.mark.parametrize("network, dtype, variants", FULL + QUICK)
def test_roofline_estimate(benchmark, network, dtype, variants):
    net = roofline.networks()[network]
    benchmark.group = f"roofline ESTIMATE {network} batch={net.gpu_batch} {net.gpu_pixels}px {dtype} {GPU}"
    report = benchmark.pedantic(lambda: roofline.run(network, GPU, dtype, variants), rounds=1, iterations=1)
    benchmark.extra_info.update(
        level="roofline", estimate=True, model=network, gpu=GPU, dtype=dtype, batch=net.gpu_batch,
        pixels=net.gpu_pixels, prune_ratio=report["config"]["prune_ratio"],
        prune_residual=report["config"]["prune_residual"], commit=report["commit"],
        variants=_summary(report),
        dcp_over_ideal={name: {k: over[k] for k in ("ideal", "ms", "kernels", "gb")}
                        for name, over in report["dcp_over_ideal"].items()},
        calibration_error=roofline.CALIBRATION_ERROR)
    assert report["variants"]["dense"]["ms"] > 0
