"""Heartbeat watcher: ends a worker group that has stopped moving, naming the rank that stalled.

The ranks beat at each phase of a step (sparsetrain.train.heartbeat). When no rank has beaten for
`launch.timeout_s` (and none is evaluating or writing a checkpoint), the watcher names the rank furthest
behind (the others wait for it in a collective), calls `stop()` to tear the group down, and the launcher
raises a LaunchError naming that rank, so `launch.max_failures` restarts the group. This also catches stalls
no collective times out on: a 1-rank run, or every rank stuck outside collectives.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from sparsetrain.launcher.errors import LaunchError

from sparsetrain.train import heartbeat

POLL_S = 1.0


class HeartbeatWatch:
    """A daemon thread polling `<out_dir>/.heartbeat`; `stalled` holds the LaunchError once it fired."""

    def __init__(self, out_dir: str | Path, timeout_s: float, stop: Callable[[], None], poll_s: float = POLL_S) -> None:
        self.out_dir, self.timeout_s, self._stop_group, self.poll_s = str(out_dir), float(timeout_s), stop, poll_s
        self.stalled: LaunchError | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat-watch", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def check(self, now: float | None = None) -> LaunchError | None:
        """The stall error when the group has not moved for timeout_s, else None (pure; the thread calls it)."""
        found = heartbeat.beats(self.out_dir)
        if not found or any(b.phase in heartbeat.LONG_PHASES for b in found.values()):
            return None
        now = time.time() if now is None else now
        if now - max(b.time for b in found.values()) < self.timeout_s:
            return None
        rank, what = heartbeat.stall_report(found, now)
        msg = f"no progress for launch.timeout_s={self.timeout_s:g}s: {what}; stopping the group"
        return LaunchError(msg if rank is None else f"rank {rank} stalled: {msg}", rank=rank)

    def _run(self) -> None:
        while not self._done.wait(self.poll_s):
            err = self.check()
            if err is not None:
                self.stalled = err
                print(f"heartbeat watcher: {err}", file=sys.stderr, flush=True)
                self._stop_group()
                return
