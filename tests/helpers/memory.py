"""Peak tensor memory of a piece of work on CPU, from the PyTorch profiler's allocation events."""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_allocated(work: Callable[[], object]) -> int:
    """Bytes allocated at the peak of ``work()`` above what was allocated when it started.

    The profiler records every allocation and free (``self_cpu_memory_usage`` of each op, without its children);
    their running sum in time order is the live memory ``work`` added.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak
