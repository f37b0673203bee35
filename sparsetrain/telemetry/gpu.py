"""GPU telemetry on nvidia-ml-py (module `pynvml`): a background sampler per worker.

Samples utilization, memory, power, temperature and SM clock of this process's GPU every `interval_s`;
`metrics()` returns the means since the previous call. Without a GPU or without nvidia-ml-py the
sampler does nothing and returns no metrics (silent and harmless). `nvlink_matrix()` reports the
NVLink link count between local GPUs when NVML can tell; `link_domain()` turns it into the ranks per fast-link
domain that FSSDP's node map (`Topology`) uses on CUDA.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

FIELDS = ("gpu_util_pct", "gpu_mem_used_gib", "gpu_power_w", "gpu_temp_c", "gpu_sm_clock_mhz")


def _nvml() -> Any | None:
    """The initialized pynvml module, or None without the package or a driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # NVMLError_LibraryNotFound / DriverNotLoaded without a GPU
        return None
    return pynvml


def _device_index() -> int:
    """This worker's GPU as NVML numbers it: the rank computes on cuda:LOCAL_RANK, i.e. entry LOCAL_RANK of
    CUDA_VISIBLE_DEVICES (the launchers give every worker the node's whole list, ordered by local rank);
    a single numeric entry is the worker's own GPU; else LOCAL_RANK itself."""
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    vis = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if len(vis) > local and vis[local].isdigit():
        return int(vis[local])
    if len(vis) == 1 and vis[0].isdigit():
        return int(vis[0])
    return local


def read_sample(nvml: Any, handle: Any) -> dict[str, float]:
    """One reading of every field this GPU supports (unsupported fields are left out)."""
    out: dict[str, float] = {}
    probes = {
        "gpu_util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        "gpu_mem_used_gib": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30,
        "gpu_power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        "gpu_temp_c": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
        "gpu_sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
    }
    for name, probe in probes.items():
        with contextlib.suppress(nvml.NVMLError):  # NVMLError_NotSupported on some boards / MIG slices
            out[name] = float(probe())
    return out


class GPUSampler:
    """Background thread sampling one GPU; a no-op when NVML or a GPU is missing."""

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.nvml = _nvml() if interval_s > 0 else None
        self.handle = None
        if self.nvml is not None:
            try:
                self.handle = self.nvml.nvmlDeviceGetHandleByIndex(_device_index())
            except self.nvml.NVMLError:
                self.nvml = None
        self._sums: dict[str, float] = {}
        self._n = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """True when a GPU is being sampled."""
        return self.handle is not None

    def sample_once(self) -> None:
        """Take one reading into the running means."""
        if not self.active:
            return
        s = read_sample(self.nvml, self.handle)
        with self._lock:
            for k, v in s.items():
                self._sums[k] = self._sums.get(k, 0.0) + v
            self._n += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    def start(self) -> GPUSampler:
        """Start sampling in a daemon thread (nothing happens without a GPU)."""
        if self.active and self._thread is None:
            self.sample_once()
            self._thread = threading.Thread(target=self._loop, name="gpu-telemetry", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and release NVML."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.nvml is not None:
            with contextlib.suppress(self.nvml.NVMLError):
                self.nvml.nvmlShutdown()
            self.nvml, self.handle = None, None

    def metrics(self) -> dict[str, float]:
        """Means of each field since the previous call ({} without a GPU or before any sample)."""
        with self._lock:
            if not self._n:
                return {}
            out = {k: v / self._n for k, v in self._sums.items()}
            self._sums, self._n = {}, 0
        return out


def nvlink_matrix() -> list[list[int]] | None:
    """NVLink links between each pair of local GPUs [n, n], or None when NVML cannot tell."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        n = nvml.nvmlDeviceGetCount()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        pci = [nvml.nvmlDeviceGetPciInfo(h).busId for h in handles]
        pci = [b.decode() if isinstance(b, bytes) else b for b in pci]
        links = [[0] * n for _ in range(n)]
        for i, h in enumerate(handles):
            for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
                try:
                    if not nvml.nvmlDeviceGetNvLinkState(h, link):
                        continue
                    remote = nvml.nvmlDeviceGetNvLinkRemotePciInfo_v2(h, link).busId
                except nvml.NVMLError:
                    break
                remote = remote.decode() if isinstance(remote, bytes) else remote
                if remote in pci:
                    links[i][pci.index(remote)] += 1
        return links
    except nvml.NVMLError:
        return None
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


def nvlink_islands(links: list[list[int]]) -> list[list[int]]:
    """GPUs joined by NVLink (directly or through others), each island sorted, islands by first GPU."""
    n, seen, out = len(links), set(), []
    for g in range(n):
        if g in seen:
            continue
        island, todo = [], [g]
        while todo:
            x = todo.pop()
            if x in seen:
                continue
            seen.add(x)
            island.append(x)
            todo += [y for y in range(n) if links[x][y] > 0 or links[y][x] > 0]
        out.append(sorted(island))
    return out


def local_gpus(local_world: int) -> list[int]:
    """NVML index of each local rank's GPU: CUDA_VISIBLE_DEVICES (numeric) by local rank, else the local rank."""
    vis = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if len(vis) >= local_world and all(v.isdigit() for v in vis[:local_world]):
        return [int(v) for v in vis[:local_world]]
    return list(range(local_world))


def link_domain(local_world: int, links: list[list[int]] | None = None) -> int:
    """Ranks per fast-link domain on this node for the node map (`Topology.ranks_per_node`): the size of the
    NVLink islands when the local ranks' GPUs fall into equal islands of consecutive local ranks smaller than
    the node (e.g. NVLink pairs on a PCIe box); else `local_world` (all GPUs linked, no NVLink, no NVML)."""
    links = nvlink_matrix() if links is None else links
    gpus = local_gpus(local_world)
    if not links or any(g >= len(links) for g in gpus) or not any(any(row) for row in links):
        return local_world
    island_of = {g: i for i, isl in enumerate(nvlink_islands(links)) for g in isl}
    groups: list[list[int]] = []  # consecutive local ranks sharing an island
    for r, g in enumerate(gpus):
        if groups and island_of[gpus[groups[-1][0]]] == island_of[g]:
            groups[-1].append(r)
        else:
            groups.append([r])
    sizes = {len(x) for x in groups}
    if len(groups) != len({island_of[gpus[x[0]]] for x in groups}) or len(sizes) != 1:
        return local_world  # an island split by other islands' ranks, or unequal islands: keep the node
    return sizes.pop()


SAMPLER: GPUSampler | None = None  # the worker's sampler, started by the launcher's worker entry


def start_sampler(interval_s: float) -> GPUSampler:
    """Start (or return) this process's sampler."""
    global SAMPLER
    if SAMPLER is None:
        SAMPLER = GPUSampler(interval_s).start()
    return SAMPLER


def stop_sampler() -> None:
    """Stop this process's sampler if one runs."""
    global SAMPLER
    if SAMPLER is not None:
        SAMPLER.stop()
        SAMPLER = None


def gpu_metrics() -> dict[str, float]:
    """Interval means from this process's sampler ({} when none runs or without a GPU)."""
    return SAMPLER.metrics() if SAMPLER is not None else {}
