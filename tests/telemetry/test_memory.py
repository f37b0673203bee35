"""Peak memory on CPU: the RSS high-water above the baseline taken at reset()."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.telemetry.memory import PeakMemory, gather_peak_mib, return_freed_memory

pytestmark = [pytest.mark.unit]


def test_cpu_peak_sees_a_freed_tensor_and_resets():
    return_freed_memory()
    gather_peak_mib(PeakMemory("cpu"))  # its lazy imports grow RSS once: not inside the measured window
    mem = PeakMemory("cpu")
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written (resident)
    del x
    peak = mem.peak_mib()
    assert 60 <= peak <= 100, peak
    mem.reset()
    if mem.hwm_reset:  # /proc/self/clear_refs permitted: the old high-water no longer counts
        assert mem.peak_mib() < 30
    assert gather_peak_mib(mem) == [pytest.approx(mem.peak_mib(), abs=1.0)]  # no process group: this rank


def test_freed_blocks_go_back_to_the_os():
    if not return_freed_memory():
        pytest.skip("not glibc")
    from sparsetrain.telemetry.memory import rss_bytes

    before = rss_bytes()
    xs = [torch.ones(2**20) for _ in range(32)]  # 32 x 4 MiB
    del xs
    assert rss_bytes() - before < 32 * 2**20
