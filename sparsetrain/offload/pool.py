"""Reusable host byte buffers for offloaded activations (pinned on CUDA: pinning is expensive)."""
from __future__ import annotations

import threading
from collections import defaultdict

import torch

_MIN_GRANULE = 512


def size_class(nbytes: int) -> int:
    """Round up to a size class (<= 12.5% padding) so near-equal sizes share buffers across steps."""
    granule = max(_MIN_GRANULE, 1 << max(0, nbytes.bit_length() - 4))
    return -(-nbytes // granule) * granule


class HostBufferPool:
    """Free lists of 1-D uint8 host buffers keyed by size class; thread-safe (backward runs on other threads)."""

    def __init__(self, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.RLock()  # re-entrant: a GC'd handle may release while we hold it
        self.capacity_bytes = 0  # all buffers ever allocated and still owned by the pool
        self.in_use_bytes = 0  # buffers holding offloaded data right now
        self.peak_in_use_bytes = 0
        self.allocations = 0  # new buffers created (pool misses)
        self.reuses = 0  # buffers handed out again (pool hits)

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least `nbytes` bytes, reused when one of its size class is free."""
        cls = size_class(nbytes)
        with self._lock:
            free = self._free.get(cls)
            buf = free.pop() if free else None
            if buf is not None:
                self.reuses += 1
            else:
                self.allocations += 1
                self.capacity_bytes += cls
            self.in_use_bytes += cls
            self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
        if buf is None:  # allocate outside the lock: pinning can take milliseconds
            buf = torch.empty(cls, dtype=torch.uint8, pin_memory=self.pin_memory)
        return buf

    def release(self, buf: torch.Tensor) -> None:
        """Give a buffer back; callers order any in-flight copies on one stream before the next use."""
        cls = buf.numel()
        with self._lock:
            self.in_use_bytes -= cls
            self._free[cls].append(buf)

    def reset_counters(self) -> None:
        """Restart peak tracking from the bytes in use now and zero the hit/miss counters."""
        with self._lock:
            self.peak_in_use_bytes = self.in_use_bytes
            self.allocations = self.reuses = 0

    def clear(self) -> None:
        """Drop all free buffers (buffers still in use return to the pool later and are kept)."""
        with self._lock:
            for bufs in self._free.values():
                self.capacity_bytes -= sum(b.numel() for b in bufs)
            self._free.clear()
