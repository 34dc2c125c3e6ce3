"""Peak memory of one call, for the step benchmarks (measured once, outside the timed rounds)."""
from __future__ import annotations

from typing import Callable

import torch


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by torch while ``fn()`` runs, above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch keeps no such counter, so the
    allocation and free events recorded by ``torch.profiler`` (``profile_memory=True``) are
    replayed in time order and the running total's maximum is taken (at op granularity: a
    temporary allocated and freed inside one op is not seen).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations made inside an op are charged to that op (self memory, at its start); frees
    # that happen outside any op scope arrive as "[memory]" events. Replay both in time order.
    deltas = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
        if e.device_type == DeviceType.CPU
    )
    running = peak = 0
    for _, delta in deltas:
        running += delta
        peak = max(peak, running)
    return peak
