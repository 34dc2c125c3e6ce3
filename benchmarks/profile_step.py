"""Where a training step's time goes on a GPU: wall time per step against the GPU's busy time (sum of
kernel times) and the kernel count, for dense, a DCP backend and the finalized ("ideal") network.
Wall time well above busy time means the step waits on the host (launches, Python), not on kernels.

    python benchmarks/profile_step.py resnet50-imagenet-b128 --ratio 0.5 --dtype bf16 --variants dense torch ideal
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
import bench_step  # noqa: E402
from conftest import allow_compiling_every_variant  # noqa: E402


def measure(name: str, ratio: float, variant: str, device: torch.device, dtype: torch.dtype, top: int,
            train_steps: int, compile: bool) -> None:
    _, batch, size = bench_step.ALL_NETWORKS[name]
    amp_dtype, channels_last = bench_step._precision(dtype)
    model, _ = bench_step._variant_model(name, ratio, variant, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # Warm-up on changing batches: the selection moves as in training, so caches keyed on kept
    # widths (cuDNN's execution plans, autotuners) see as many widths as after train_steps steps.
    for seed in range(train_steps):
        bench_step._sgd_step(model, *bench_step._batch(batch, size, device, 100 + seed, channels_last),
                             amp_dtype, compile)()
    step = bench_step._sgd_step(model, *bench_step._batch(batch, size, device, 4, channels_last), amp_dtype, compile)
    for _ in range(2):
        step()
    sync()
    steps = 10
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = (time.perf_counter() - start) / steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in events) / 3 / 1e3
    host = sum(e.self_cpu_time_total for e in prof.key_averages()) / 3 / 1e3
    print(f"{name} prune {ratio} {variant:9s} after {train_steps} steps{' compiled' if compile else ''}: "
          f"wall {wall:7.2f} ms/step  gpu busy {busy:7.2f} ms/step  kernels {len(events) / 3:6.0f}/step  "
          f"host (profiler self CPU) {host:7.2f} ms/step", flush=True)
    if top:
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if events else "self_cpu_time_total",
                                          row_limit=top, max_name_column_width=60)
        print(table, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("network", choices=sorted(bench_step.ALL_NETWORKS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--variants", nargs="+", default=["dense", "torch", "ideal"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top", type=int, default=0, help="print the N most expensive ops of each variant")
    parser.add_argument("--train-steps", type=int, default=3,
                        help="training steps on fresh batches before timing (the selection moves on each)")
    parser.add_argument("--compile", action="store_true", help="the model's forward under torch.compile")
    args = parser.parse_args()
    if args.compile:
        allow_compiling_every_variant()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    for variant in args.variants:
        measure(args.network, args.ratio, variant, torch.device(args.device), dtype, args.top, args.train_steps,
                args.compile)


if __name__ == "__main__":
    main()
