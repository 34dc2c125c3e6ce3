"""Benchmark options and helpers shared by the op and step benchmarks.

``--quick`` runs only the benchmarks marked ``quick`` (small shapes: what CI runs to keep this
suite from rotting); without it those are deselected and the full-size benchmarks run.
``--device cuda`` runs on the GPU (see ``benchmarks/gpu.sh``); timings then synchronise the device.
``--dtype bf16|fp16`` runs the op benchmarks in that precision and the step benchmarks under that
autocast with channels-last tensors.
"""
import pytest
import torch

from dcp_kernels import ops


def backend_skip_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` is not benchmarked on ``device`` (None when it is)."""
    if backend == "triton" and device.type != "cuda":
        return "the Triton backend runs on CUDA devices only (its CPU interpreter is for tests, not timing)"
    if backend in ops.BACKENDS and not ops.backends(device)[backend]:
        return f"backend {backend!r} is not available on {device}"
    return None


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="run only the small, fast benchmark subset")
    parser.addoption("--device", default="cpu", help="device to benchmark on (cpu or cuda)")
    parser.addoption("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                     help="data type of the op benchmarks (default fp32)")
    parser.addoption("--compile", action="store_true",
                     help="step benchmarks: every variant's model runs under torch.compile (inductor; compiled "
                          "in the warm-up rounds), to compare compiled DCP with compiled dense and ideal")
    parser.addoption("--rounds", type=int, default=None,
                     help="interleaved step benchmarks: timed rounds (default 5, --quick 3); more rounds read the "
                          "steady state of a selection that moves every step (new conv shapes at first)")
    parser.addoption("--variants", default=None,
                     help="step benchmarks: only these variants, comma-separated (e.g. dense,torch,ideal)")
    parser.addoption("--channels-last", action="store_true",
                     help="op benchmarks: activations and weights in channels_last (how GPU users train)")
    parser.addoption("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                     help="torch.compile mode with --compile (reduce-overhead: CUDA graphs, captured vs captured)")


def allow_compiling_every_variant() -> None:
    """Every variant of a group compiles the same nn.Sequential.forward (dense, ideal, each backend):
    their graphs share one code object's recompile budget (8 by default), past which dynamo would
    silently run the remaining variants eagerly. Raised for the benchmark process only."""
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024


def pytest_configure(config):
    if config.getoption("--compile"):
        allow_compiling_every_variant()
    config.addinivalue_line("markers", "quick: a small benchmark case run by --quick")
    config.addinivalue_line("markers", "gpu_size: a case at GPU training size (skipped on a CPU)")


def pytest_collection_modifyitems(config, items):
    quick = config.getoption("--quick")
    keep = [item for item in items if (item.get_closest_marker("quick") is not None) == quick]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture
def quick(request) -> bool:
    return bool(request.config.getoption("--quick"))


@pytest.fixture
def device(request) -> torch.device:
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.exit("--device cuda was given but no CUDA device is available", returncode=2)
    return dev


@pytest.fixture
def dtype(request) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[request.config.getoption("--dtype")]


@pytest.fixture
def only_variants(request) -> set[str] | None:
    """``--variants``: the variants a step benchmark runs (None: all it can)."""
    value = request.config.getoption("--variants")
    return None if value is None else {v.strip() for v in value.split(",") if v.strip()}


@pytest.fixture
def rounds(request, quick) -> int:
    """``--rounds``: timed rounds of an interleaved step benchmark."""
    value = request.config.getoption("--rounds")
    if value is not None and value < 1:
        pytest.exit(f"--rounds must be >= 1, got {value}", returncode=2)
    return value or (3 if quick else 5)


@pytest.fixture
def channels_last(request) -> bool:
    return bool(request.config.getoption("--channels-last"))


@pytest.fixture
def compiled(request) -> bool | str:
    """False, True (torch.compile's default mode) or a mode name (``--compile-mode``)."""
    if not request.config.getoption("--compile"):
        return False
    mode = request.config.getoption("--compile-mode")
    return True if mode == "default" else mode


@pytest.fixture
def timed(device):
    """Wrap a step so the measured time includes the device's work, not only its launch."""

    def wrap(fn):
        if device.type != "cuda":
            return fn

        def synced():
            out = fn()
            torch.cuda.synchronize(device)
            return out

        return synced

    return wrap


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
