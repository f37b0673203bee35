"""The host buffer pool stays near its peak use when routing changes tensor sizes every step."""
from __future__ import annotations

import random

from sparsetrain.offload.pool import HostBufferPool, size_class


def _step(pool: HostBufferPool, sizes: list[int]) -> None:
    """One step's offload: every tensor taken during forward, all given back during backward."""
    bufs = [pool.acquire(n) for n in sizes]
    for b in reversed(bufs):
        assert b is not None
        pool.release(b)
    pool.end_step()


def test_capacity_bounded_under_changing_sizes() -> None:
    """Expert activations change size with routing: 300 steps of 24 tensors drawn around fixed means keep the
    pool within 1.3x one step's bytes (exact size classes alone: 3.8x and growing; best fit without end_step's
    trim: 1.9x) while a miss stays rare (trim without best fit allocates for a third of the requests)."""
    rng, pool = random.Random(0), HostBufferPool()
    means = [rng.randrange(1 << 16, 1 << 20) for _ in range(24)]
    peak = 0
    for _ in range(300):
        sizes = [int(m * rng.uniform(0.5, 1.5)) for m in means]
        peak = max(peak, sum(size_class(n) for n in sizes))
        _step(pool, sizes)
    assert pool.in_use_bytes == 0
    assert pool.capacity_bytes <= 1.3 * peak, (pool.capacity_bytes, peak)
    assert pool.allocations < 0.15 * (pool.allocations + pool.reuses)  # still a pool: idle buffers serve most


def test_same_sizes_never_trimmed_or_reallocated() -> None:
    """A step repeating the last one's sizes reuses every buffer: nothing allocated, nothing dropped."""
    pool, sizes = HostBufferPool(), [4096, 4096, 100_000, 7_000_000]
    _step(pool, sizes)
    cap = pool.capacity_bytes
    pool.reset_counters()
    for _ in range(5):
        _step(pool, sizes)
    assert (pool.allocations, pool.trimmed_bytes, pool.capacity_bytes) == (0, 0, cap)


def test_best_fit_takes_a_larger_idle_buffer() -> None:
    """A miss takes an idle buffer up to 1.5x its class instead of allocating; never a far larger one."""
    pool = HostBufferPool()
    big = pool.acquire(1_000_000)
    assert big is not None
    pool.release(big)
    again = pool.acquire(800_000)
    assert again is not None and again.numel() == big.numel() and pool.allocations == 1
    pool.release(again)
    small = pool.acquire(100_000)
    assert small is not None and small.numel() == size_class(100_000) and pool.allocations == 2


def test_buffers_in_use_survive_end_step() -> None:
    """end_step between a forward and its backward (or a forward never followed by one) drops only idle buffers."""
    pool = HostBufferPool()
    held = [pool.acquire(50_000) for _ in range(3)]
    pool.end_step()
    pool.end_step()
    assert pool.capacity_bytes == 3 * size_class(50_000)
    for b in held:
        assert b is not None
        pool.release(b)
    pool.end_step()
    assert pool.capacity_bytes == 3 * size_class(50_000)  # the peak of this step: kept for the next
    pool.end_step()
    pool.end_step()
    assert pool.capacity_bytes == 0  # two steps without a use: gone
