"""Named wall-clock spans per step (attention / dispatch / experts / combine / optimizer)."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class StepTimers:
    """Accumulates seconds per named span; cheap no-op when disabled."""

    def __init__(self) -> None:
        self.enabled = False
        self.sync_cuda = False
        self.totals: dict[str, float] = defaultdict(float)
        self.cpu_totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Time the body under `name` (wall and this thread's CPU time)."""
        if not self.enabled:
            yield
            return
        if self.sync_cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            if self.sync_cuda:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - t0
            self.cpu_totals[name] += time.thread_time() - c0

    def pop(self) -> tuple[dict[str, float], dict[str, float]]:
        """Return and clear (wall seconds, thread-CPU seconds) per span."""
        out = dict(self.totals), dict(self.cpu_totals)
        self.totals.clear()
        self.cpu_totals.clear()
        return out


TIMERS = StepTimers()
span = TIMERS.span
