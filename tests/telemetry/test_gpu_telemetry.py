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
