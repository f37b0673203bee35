"""Peak memory of this process: CUDA `max_memory_allocated`, or on CPU the RSS high-water above a baseline.

CPU: the baseline is the resident set when `reset()` runs (after imports, before the trainer allocates, after
glibc has handed its free heap blocks back with `malloc_trim`, so blocks freed earlier in the process are
not reused invisibly);
`reset()` also writes 5 to /proc/self/clear_refs, which sets the kernel's high-water mark (VmHWM) back
to the current RSS, so an import-time transient does not count. Where that is not permitted the
high-water still includes it (`hwm_reset` is False then) and the peak can read high.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path

import torch

__all__ = ["PeakMemory", "gather_peak_mib", "return_freed_memory", "rss_bytes", "warm_imports"]

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    """A `Vm*` field of /proc/self/status in KiB, or None where there is no procfs."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process in bytes."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return _hwm_bytes()  # no procfs (macOS): best available is the high-water


def _hwm_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Peak bytes held since `reset()`: device allocations on CUDA, RSS high-water above the baseline on CPU."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.baseline = 0
        self.hwm_reset = False
        self.reset()

    def reset(self) -> None:
        """Start measuring from now (baseline = what the process holds at this point)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = 0  # max_memory_allocated counts the run's tensors from zero
            return
        _malloc_trim()  # freed heap blocks back to the OS: the baseline is what the process holds, not its free list
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.baseline = rss_bytes()

    def peak_bytes(self) -> int:
        """Highest memory held since `reset()`, in bytes."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, _hwm_bytes() - self.baseline)

    def peak_mib(self) -> float:
        """`peak_bytes()` in MiB."""
        return self.peak_bytes() / 2**20


def warm_imports() -> None:
    """Import what a training step imports lazily (AdamW's first step pulls in torch._dynamo, ~100 MiB of
    modules on CPU), so a baseline taken afterwards is the post-import one."""
    import torch.distributed.fsdp  # FSDP2, imported by the strategies
    import tqdm  # noqa: F401

    from sparsetrain.config_checks import OPTIMIZER_IMPLS

    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.zeros(1)
    for kwargs in OPTIMIZER_IMPLS.values():  # each kernel's own lazy imports
        torch.optim.AdamW([p], **kwargs).step()


def gather_peak_mib(mem: PeakMemory) -> list[float]:
    """Every rank's peak (MiB) in rank order: one all_gather on the backend's device (CUDA for NCCL)."""
    from sparsetrain.parallel.comm import all_gather_host

    return [float(x) for x in all_gather_host([mem.peak_mib()]).flatten().tolist()]


def _malloc_trim() -> bool:
    """glibc: return the heap's free memory to the OS (once, cheap); False off glibc."""
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name:
        return False
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):
        return False


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 128 << 10  # tensors of the tiny preset's activations (256 KiB) included


def return_freed_memory() -> bool:
    """CPU (glibc): allocate blocks >= 128 KiB with mmap so freeing a tensor returns its pages to the OS.

    glibc's default raises its mmap threshold up to 32 MiB as blocks are freed, after which freed
    activations stay in a fragmented heap: measured here, a 3-step run of the tiny preset with 32 experts
    and d_ffn 1024 (one process) climbed to 1784 MiB RSS for 823 MiB of live tensors, and with a fixed
    1 MiB threshold peaked at 1025 MiB; the 4-rank tiny preset (activations of 256 KiB) peaked at 115-130
    MiB per rank with 1 MiB and 94-103 MiB with 128 KiB. RSS then follows the live tensors (what
    `sparsetrain plan` counts). Returns whether the setting took effect (False off glibc).
    """
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
