"""Wall time per phase of a run (load, vision tower, importance pass, scale search, solve, export...).

Users choose a tool by the hours it costs; a total alone does not say which phase to make cheaper, so
every run's report breaks its time down by phase (``QuantizeReport.phases``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseClock:
    """Seconds per named phase, summed over every entry (a per-layer phase adds up over the layers)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync_gpu()  # GPU kernels run asynchronously: charge them to the phase that launched them
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def _sync_gpu() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
