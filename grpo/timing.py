"""Wall time per part of a step, added to a metrics dict as ``time/<part>``."""

from __future__ import annotations

import time


class PhaseTimer:
    """Context manager factory that adds the wall time of each phase to ``metrics["time/<phase>"]``."""

    def __init__(self, metrics: dict[str, float]) -> None:
        self.metrics = metrics

    def __call__(self, phase: str) -> PhaseTimer._Span:
        return PhaseTimer._Span(self.metrics, phase)

    class _Span:
        def __init__(self, metrics: dict[str, float], phase: str) -> None:
            self.metrics, self.key = metrics, f"time/{phase}"

        def __enter__(self) -> None:
            self.start = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            self.metrics[self.key] = self.metrics.get(self.key, 0.0) + time.perf_counter() - self.start
