"""Peak memory of one call, for the step benchmarks (measured once, outside the timed rounds)."""
from __future__ import annotations

import ctypes
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc_heap_in_use() -> Callable[[], int] | None:
    """A function returning the bytes malloc has handed out and not yet freed (all arenas, and the
    chunks it mmapped): glibc's ``mallinfo2``, which torch's CPU allocator goes through. None where
    there is no glibc >= 2.33 (macOS, musl, older Linux)."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class _HeapPeak(TorchDispatchMode):
    """The highest heap level seen after any aten op, above the level at entry."""

    def __init__(self, in_use: Callable[[], int]):
        super().__init__()
        self.in_use = in_use
        self.base = in_use()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use() - self.base)
        return out


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch keeps no such counter, so
    * on glibc >= 2.33 (Linux): the heap in use (``mallinfo2``) is read after every aten op and the
      highest level kept. Deterministic (the same step measures the same bytes every time); it counts
      everything malloc'ed meanwhile, torch's tensors above all;
    * elsewhere: the allocation and free events recorded by ``torch.profiler``
      (``profile_memory=True``) are replayed in time order and the running total's maximum is taken
      (repeated measurements of one step vary: up to 20% on a VGG-16 step).
    Both at op granularity: a temporary allocated and freed inside one op is not seen.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    in_use = _glibc_heap_in_use()
    if in_use is not None:
        with _HeapPeak(in_use) as probe:
            fn()
        return probe.peak
    return _profiler_peak_bytes(fn)


def _profiler_peak_bytes(fn: Callable[[], object]) -> int:
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
