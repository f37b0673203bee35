"""Reusable host byte buffers for offloaded activations (pinned on CUDA: pinning is expensive)."""
from __future__ import annotations

import threading
from collections import defaultdict

import torch

_MIN_GRANULE = 512
BEST_FIT_SLACK = 1.5  # a miss takes an idle buffer up to this many times its size class before allocating


def size_class(nbytes: int) -> int:
    """Round up to a size class (<= 12.5% padding) so near-equal sizes share buffers across steps."""
    granule = max(_MIN_GRANULE, 1 << max(0, nbytes.bit_length() - 4))
    return -(-nbytes // granule) * granule


class HostBufferPool:
    """Free lists of 1-D uint8 host buffers keyed by size class; thread-safe (backward runs on other threads).

    `max_bytes` > 0 bounds the bytes the pool owns (free + in use): a request that does not fit, even after
    dropping idle buffers of other size classes, gets None and the caller keeps the tensor where it is.

    Routing changes expert activation sizes every step, so exact size classes alone would leave a trail of idle
    buffers (capacity grew 380 -> 577 MB over 150 steps for a 145 MB peak): a miss first takes the smallest
    idle buffer up to BEST_FIT_SLACK x its class, and `end_step()` drops idle buffers beyond the most of each
    class that were in use at once during this step or the one before.
    """

    def __init__(self, pin_memory: bool = False, max_bytes: int = 0) -> None:
        if max_bytes < 0:
            raise ValueError(f"HostBufferPool max_bytes must be >= 0 (0 = unbounded), got {max_bytes}")
        self.pin_memory, self.max_bytes = pin_memory, max_bytes
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.RLock()  # re-entrant: a GC'd handle may release while we hold it
        self.capacity_bytes = 0  # all buffers ever allocated and still owned by the pool
        self.in_use_bytes = 0  # buffers holding offloaded data right now
        self.peak_in_use_bytes = 0
        self.allocations = 0  # new buffers created (pool misses)
        self.reuses = 0  # buffers handed out again (pool hits)
        self.refusals = 0  # requests that did not fit under max_bytes
        self.trimmed_bytes = 0  # idle bytes dropped by end_step (since the last reset_counters)
        self._out: dict[int, int] = defaultdict(int)  # buffers of each size in use now
        self._peak: dict[int, int] = defaultdict(int)  # ... most at once during this step
        self._peak_before: dict[int, int] = {}  # ... and during the step before

    def acquire(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 buffer of at least `nbytes` bytes, reused when one of its size class is free; None when the
        bounded pool cannot hold it."""
        cls = size_class(nbytes)
        with self._lock:
            buf = self._take_free(cls)
            if buf is not None:
                self.reuses += 1
                cls = buf.numel()
            else:
                if self.max_bytes and self.capacity_bytes + cls > self.max_bytes:
                    self._trim(self.capacity_bytes + cls - self.max_bytes)
                    if self.capacity_bytes + cls > self.max_bytes:
                        self.refusals += 1
                        return None
                self.allocations += 1
                self.capacity_bytes += cls
            self.in_use_bytes += cls
            self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
            self._out[cls] += 1
            self._peak[cls] = max(self._peak[cls], self._out[cls])
        if buf is None:  # allocate outside the lock: pinning can take milliseconds
            buf = torch.empty(cls, dtype=torch.uint8, pin_memory=self.pin_memory)
        return buf

    def release(self, buf: torch.Tensor) -> None:
        """Give a buffer back; callers order any in-flight copies on one stream before the next use."""
        cls = buf.numel()
        with self._lock:
            self.in_use_bytes -= cls
            self._out[cls] -= 1
            self._free[cls].append(buf)

    def _take_free(self, cls: int) -> torch.Tensor | None:
        """An idle buffer of size class `cls`, else the smallest idle one up to BEST_FIT_SLACK x cls, else None."""
        free = self._free.get(cls)
        if free:
            return free.pop()
        fits = [c for c, bufs in self._free.items() if bufs and cls < c <= cls * BEST_FIT_SLACK]
        return self._free[min(fits)].pop() if fits else None

    def end_step(self) -> None:
        """Drop idle buffers beyond the most of their size in use at once during this step or the one before
        (call once per step, after backward); the per-size peaks restart from what is in use now."""
        with self._lock:
            for cls, bufs in self._free.items():
                keep = max(self._peak.get(cls, 0), self._peak_before.get(cls, 0))
                extra = min(len(bufs), self._out.get(cls, 0) + len(bufs) - keep)
                for _ in range(max(0, extra)):
                    bufs.pop()
                    self.capacity_bytes -= cls
                    self.trimmed_bytes += cls
            self._peak_before = dict(self._peak)
            self._peak = defaultdict(int, {c: n for c, n in self._out.items() if n})

    def _trim(self, need: int) -> None:
        """Drop idle buffers, largest size class first, until `need` bytes are freed or none is idle."""
        for cls in sorted(self._free, reverse=True):
            bufs = self._free[cls]
            while bufs and need > 0:
                bufs.pop()
                self.capacity_bytes -= cls
                need -= cls

    def reset_counters(self) -> None:
        """Restart peak tracking from the bytes in use now and zero the hit/miss/refusal counters."""
        with self._lock:
            self.peak_in_use_bytes = self.in_use_bytes
            self.allocations = self.reuses = self.refusals = self.trimmed_bytes = 0

    def clear(self) -> None:
        """Drop all free buffers (buffers still in use return to the pool later and are kept)."""
        with self._lock:
            for bufs in self._free.values():
                self.capacity_bytes -= sum(b.numel() for b in bufs)
            self._free.clear()
