"""Count host syncs and kernel launches in steady-state DCP training steps on a GPU, per backend.

``torch.cuda.set_sync_debug_mode("warn")`` makes PyTorch warn at every operation that synchronises
the host with the device (``.item()``, ``nonzero``, device-to-host copies, ...). This script runs a
converted network past exploration, then counts those warnings over a few selecting steps and
prints one line per backend (and writes JSON with ``--json``). Expected: one per step (the batched
read of all layers' kept counts, ``dcp_kernels.rule.host_read``), zero while exploring; zero always
for ``triton-static`` (``static_shapes=True``: the selection is never read on the host). The CPU
equivalent, which runs in the test suite, is tests/test_syncs.py. It also counts the CUDA kernels
one selecting step launches (``torch.profiler`` kernel events), for dense and each backend: a CIFAR
step is launch-bound, so this is the count the GPU-step work drives down (CPU counts of the same
thing: tests/test_syncs.py and docs/benchmarks-gpu.md).

    python benchmarks/sync_check.py [--json out.json] [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import warnings

import torch
import torch.nn.functional as F

import dcp_kernels
from dcp_kernels.models import vgg


def count_kernels(step, device: torch.device) -> int:
    """CUDA kernels (and memsets/copies) launched by one call of ``step``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def count_syncs(backend: str, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = vgg("vgg16").to(device)
    if backend == "dense":
        prop = None
    else:
        static = backend == "triton-static"
        prop = dcp_kernels.convert(model, 0.5, explore_epochs=1, backend="triton" if static else backend, round_to=8,
                                   static_shapes=static)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(64, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def counted(n: int) -> list[str]:
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(n):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]

    step()  # exploring: the first step writes the all-selected state
    exploring = counted(steps)
    if prop is not None:
        prop.epoch_end()
    step()
    step()  # warm: autotuning and cuDNN plans for the first widths
    selecting = counted(steps)
    return {"backend": backend, "steps": steps, "exploring_syncs": len(exploring), "selecting_syncs": len(selecting),
            "selecting_per_step": len(selecting) / steps, "kernels_per_step": count_kernels(step, device),
            "examples": sorted(set(selecting))[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sync_check: needs a CUDA device (the CPU equivalent is tests/test_syncs.py)")
    device = torch.device("cuda")
    results = []
    available = dcp_kernels.backends(device)
    for backend, usable in [("dense", True), *available.items(), ("triton-static", available["triton"])]:
        if not usable:
            continue
        try:
            result = count_syncs(backend, args.steps, device)
        except Exception as error:  # report every backend, even when one fails
            result = {"backend": backend, "error": f"{type(error).__name__}: {error}"}
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
