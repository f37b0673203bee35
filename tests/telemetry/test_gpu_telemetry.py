"""GPU telemetry: silent without a GPU; with a fake NVML the sampler reports interval means."""
from __future__ import annotations

import sys
import types

import pytest

from sparsetrain.telemetry import gpu

pytestmark = pytest.mark.unit


def test_no_gpu_is_silent(monkeypatch):
    monkeypatch.setattr(gpu, "_nvml", lambda: None)
    s = gpu.GPUSampler(0.01).start()
    assert not s.active and s.metrics() == {}
    s.stop()
    gpu.start_sampler(0.01)
    assert gpu.gpu_metrics() == {}
    gpu.stop_sampler()
    assert gpu.gpu_metrics() == {} and gpu.nvlink_matrix() is None


def test_real_nvml_without_gpu_does_not_raise():
    s = gpu.GPUSampler(0.01).start()  # real pynvml (nvml extra) or none: either way no exception
    s.sample_once()
    assert isinstance(s.metrics(), dict)
    s.stop()


def _fake_nvml(util: list[int]) -> types.ModuleType:
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    readings = iter(util)
    m.NVMLError = NVMLError
    m.NVML_TEMPERATURE_GPU, m.NVML_CLOCK_SM = 0, 1
    m.nvmlInit = lambda: None
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=next(readings))
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=2 * 2**30)
    m.nvmlDeviceGetPowerUsage = lambda h: 300_000

    def not_supported(*a):
        raise NVMLError("not supported")

    m.nvmlDeviceGetTemperature = not_supported
    m.nvmlDeviceGetClockInfo = lambda h, c: 1980
    return m


def test_fake_gpu_interval_means(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([50, 70, 90]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    s = gpu.GPUSampler(interval_s=3600)  # no background samples during the test
    assert s.active and s.handle == "gpu3"
    s.sample_once()
    s.sample_once()
    m = s.metrics()
    assert m == {"gpu_util_pct": 60.0, "gpu_mem_used_gib": 2.0, "gpu_power_w": 300.0, "gpu_sm_clock_mhz": 1980.0}
    assert "gpu_temp_c" not in m and s.metrics() == {}  # unsupported field left out; means reset
    s.stop()


def _fake_nvlink(pairs: list[tuple[int, int]], n: int) -> types.ModuleType:
    """A fake NVML whose GPUs i, j share one NVLink for each (i, j) in `pairs`."""
    m = _fake_nvml([])
    m.nvmlDeviceGetCount = lambda: n
    m.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=f"pci-{h}".encode())
    peers = {i: [b for a, b in pairs if a == i] + [a for a, b in pairs if b == i] for i in range(n)}

    def state(h, link):
        if link >= len(peers[int(h[3:])]):
            raise m.NVMLError("no such link")
        return 1

    m.nvmlDeviceGetNvLinkState = state
    m.nvmlDeviceGetNvLinkRemotePciInfo_v2 = lambda h, link: types.SimpleNamespace(
        busId=f"pci-gpu{peers[int(h[3:])][link]}")
    return m


def test_nvlink_islands_feed_the_node_map(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvlink([(0, 1), (2, 3)], 4))  # NVLink pairs, PCIe between
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    links = gpu.nvlink_matrix()
    assert links == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    assert gpu.nvlink_islands(links) == [[0, 1], [2, 3]]
    assert gpu.link_domain(4) == 2  # two fast domains of 2 ranks on this node
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2,0,3")
    assert gpu.link_domain(4) == 4  # islands not on consecutive local ranks: keep the node
    assert gpu.link_domain(4, [[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]]) == 4  # all linked
    assert gpu.link_domain(4, [[0] * 4] * 4) == 4  # no NVLink (PCIe only): the node stays the domain
    monkeypatch.setattr(gpu, "_nvml", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu.nvlink_matrix() is None and gpu.link_domain(8) == 8  # no GPU: silent, unchanged


def test_fssdp_node_map_takes_the_nvlink_islands(monkeypatch):
    """FSSDP's topology narrows to NVLink pairs on CUDA (single process: the agreement is this rank's own)."""
    from sparsetrain.parallel.fssdp import FSSDP
    from sparsetrain.parallel.topology import Topology

    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvlink([(0, 1), (2, 3)], 4))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    stub = types.SimpleNamespace(info=types.SimpleNamespace(device=types.SimpleNamespace(type="cuda")),
                                 cfg=types.SimpleNamespace(parallel=types.SimpleNamespace(pretend_nodes=0)), group=None)
    assert FSSDP._link_topology(stub, Topology(4, 4)) == Topology(4, 2)
    stub.cfg.parallel.pretend_nodes = 1  # an explicit node map wins
    assert FSSDP._link_topology(stub, Topology(4, 4)) == Topology(4, 4)
    stub.cfg.parallel.pretend_nodes, stub.info.device.type = 0, "cpu"
    assert FSSDP._link_topology(stub, Topology(4, 4)) == Topology(4, 4)


@pytest.mark.parametrize(("visible", "local_rank", "want"), [
    ("4,5,6,7", "2", 6),  # the node's list by local rank (launcher/env.py): local rank 2 computes on cuda:2 = GPU 6
    ("3", "0", 3),  # one GPU per worker
    ("", "1", 1),  # no list: NVML numbering = local rank
    ("GPU-aa,GPU-bb", "1", 1),  # UUIDs: fall back to the local rank
])
def test_sampled_gpu_is_the_one_the_rank_computes_on(monkeypatch, visible, local_rank, want):
    from sparsetrain.telemetry.gpu import _device_index

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert _device_index() == want
