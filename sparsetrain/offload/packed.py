"""One offloaded saved tensor: device -> host buffer on pack, host -> device on fetch (CUDA: on a side stream)."""
from __future__ import annotations

import threading

import torch

from sparsetrain.offload.pool import HostBufferPool


def dense_strides(t: torch.Tensor) -> tuple[int, ...] | None:
    """t's strides when its elements exactly fill a block of memory (any dim order), else None."""
    if t.is_contiguous():
        return t.stride()
    expected = 1
    for d in sorted(range(t.dim()), key=lambda d: t.stride(d)):
        if t.size(d) == 1:
            continue
        if t.stride(d) != expected:
            return None
        expected *= t.size(d)
    return t.stride()


def contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    """Row-major strides for `shape`."""
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


class PackedTensor:
    """What autograd holds instead of an offloaded activation; the host buffer goes back to the pool once fetched."""

    __slots__ = (
        "__weakref__",
        "block",
        "buf",
        "dev",
        "device",
        "dtype",
        "host",
        "lock",
        "nbytes",
        "pool",
        "prefetched",
        "ready",
        "shape",
        "side",
        "src_ptr",
        "streams",
        "stride",
    )

    def __init__(self, t: torch.Tensor, pool: HostBufferPool, buf: torch.Tensor, side: torch.cuda.Stream | None,
                 lock: threading.RLock, block: int, src_ptr: int) -> None:
        self.pool, self.side, self.lock, self.block, self.src_ptr = pool, side, lock, block, src_ptr
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.nbytes = t.numel() * t.element_size()
        self.stride = dense_strides(t) or contiguous_strides(t.shape)  # keep the layout: kernels see the same strides
        self.dev: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None  # h2d copy done (CUDA)
        self.streams: set[int] = set()  # consumer streams already recorded on self.dev
        self.prefetched = False
        self.buf: torch.Tensor | None = buf  # from pool.acquire(nbytes); goes back to the pool once fetched
        self.host = self.buf[:self.nbytes].view(self.dtype).as_strided(self.shape, self.stride)
        src = t.detach()
        with torch.no_grad():
            if side is None:
                self.host.copy_(src)
            else:
                side.wait_stream(torch.cuda.current_stream(t.device))  # src is fully written
                with torch.cuda.stream(side):
                    self.host.copy_(src, non_blocking=True)
                src.record_stream(side)  # the allocator keeps src's memory until the d2h copy ends

    def fetch(self, prefetch: bool = False) -> None:
        """Start (CUDA) or do (CPU) the copy back to the device; idempotent."""
        with self.lock:
            if self.dev is not None or self.buf is None:
                return
            with torch.no_grad():
                if self.side is None:
                    dev = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
                    dev.copy_(self.host)
                else:
                    with torch.cuda.stream(self.side):  # stream-ordered after this tensor's d2h copy
                        dev = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
                        dev.copy_(self.host, non_blocking=True)
                        self.ready = torch.cuda.Event()
                        self.ready.record(self.side)
            self.dev, self.prefetched = dev, prefetch
            buf, self.buf, self.host = self.buf, None, None
        # Safe to reuse at once: every read/write of a pool buffer is queued on this device's side stream.
        self.pool.release(buf)

    def get(self) -> torch.Tensor:
        """The device tensor for backward (waits for the copy back on the consumer stream)."""
        self.fetch()
        dev = self.dev
        assert dev is not None
        if self.ready is not None:
            cur = torch.cuda.current_stream(self.device)
            if cur.cuda_stream != self.side.cuda_stream:
                cur.wait_event(self.ready)
                with self.lock:
                    if cur.cuda_stream not in self.streams:
                        dev.record_stream(cur)  # allocated on the side stream, used on this one
                        self.streams.add(cur.cuda_stream)
        return dev

    def __del__(self) -> None:
        buf = getattr(self, "buf", None)
        if buf is not None:
            self.buf = self.host = None
            self.pool.release(buf)  # never fetched (forward without backward); copies into it are stream-ordered
