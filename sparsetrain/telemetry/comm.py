"""Byte counters for collectives: one process-global `COMM` that every collective adds to.

Names in use: 'spag', 'sprs' (sparse all-gather / reduce-scatter of expert chunks),
'reshard' (FSSDP ownership moves: params + optimizer state, sent by spAG under `COMM.relabel`),
'all_to_all' (expert-parallel token exchange), 'fsdp_allgather', 'fsdp_reduce_scatter'.
Counts are bytes *sent by this rank* to other ranks; summing over ranks gives the traffic.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["COMM", "CommStats"]


class CommStats:
    """Per-name byte and call counters: cumulative totals and totals since the last step boundary."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # autograd may run backward on a device thread
        self._total: dict[str, int] = defaultdict(int)
        self._step: dict[str, int] = defaultdict(int)
        self._calls: dict[str, int] = defaultdict(int)
        self._alias = threading.local()  # per thread: name -> name counted instead (relabel)

    @contextmanager
    def relabel(self, name: str, as_name: str) -> Iterator[None]:
        """Within the block, this thread's adds under `name` count under `as_name` (e.g. spAG used to move
        ownership counts as 'reshard', not as expert-copy traffic)."""
        aliases = getattr(self._alias, "map", {})
        self._alias.map = {**aliases, name: as_name}
        try:
            yield
        finally:
            self._alias.map = aliases

    def add(self, name: str, nbytes: int) -> None:
        """Count `nbytes` sent under `name` (one call)."""
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"CommStats.add({name!r}, {nbytes}): byte count must be >= 0")
        name = getattr(self._alias, "map", {}).get(name, name)
        with self._lock:
            self._total[name] += nbytes
            self._step[name] += nbytes
            self._calls[name] += 1

    def snapshot(self) -> dict[str, int]:
        """Cumulative bytes per name since the last reset()."""
        with self._lock:
            return dict(self._total)

    def calls(self) -> dict[str, int]:
        """Cumulative number of add() calls per name since the last reset()."""
        with self._lock:
            return dict(self._calls)

    def step_totals(self) -> dict[str, int]:
        """Bytes per name since the previous step_totals() call (or reset), then start a new step."""
        with self._lock:
            out = dict(self._step)
            self._step.clear()
            return out

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            self._total.clear()
            self._step.clear()
            self._calls.clear()

    def __repr__(self) -> str:
        return f"CommStats({self.snapshot()})"


COMM = CommStats()
