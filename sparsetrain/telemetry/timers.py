"""Named spans per step (attention / dispatch / experts / combine / optimizer): wall and thread-CPU time.

On CUDA a span's wall time is read from CUDA events recorded on the current stream (its work between the span's
two points, waits on other streams included) and resolved when the spans are popped, on log steps: no span
synchronizes the device, so the overlaps the spans sit in (prefetched spAG, all-to-all) keep overlapping.
The trainer enables the timers on the steps it logs only."""
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
        self.cuda_events = False  # wall time from CUDA events (resolved in `pop`) instead of the host clock
        self.totals: dict[str, float] = defaultdict(float)
        self.cpu_totals: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Time the body under `name` (wall and this thread's CPU time)."""
        if not self.enabled:
            yield
            return
        start = end = None
        if self.cuda_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            if end is not None:
                end.record()
                self._pending.append((name, start, end))
            else:
                self.totals[name] += time.perf_counter() - t0
            self.cpu_totals[name] += time.thread_time() - c0

    def pop(self) -> tuple[dict[str, float], dict[str, float]]:
        """Return and clear (wall seconds, thread-CPU seconds) per span; waits for the spans' CUDA events."""
        for name, start, end in self._pending:
            end.synchronize()
            self.totals[name] += start.elapsed_time(end) / 1000
        self._pending.clear()
        out = dict(self.totals), dict(self.cpu_totals)
        self.totals.clear()
        self.cpu_totals.clear()
        return out


TIMERS = StepTimers()
span = TIMERS.span
