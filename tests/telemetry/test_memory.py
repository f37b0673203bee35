"""Peak memory on CPU: the RSS high-water above the baseline taken at reset().

RSS is the whole process's: each check runs in a fresh interpreter, so threads and caches that earlier tests
left in the pytest process (a worker of `pytest -n` runs many files) cannot move it inside the measured window.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsetrain.telemetry.memory import PeakMemory, gather_peak_mib, return_freed_memory

pytestmark = [pytest.mark.unit]
ROOT = Path(__file__).resolve().parents[2]


def _in_fresh_process(name: str) -> None:
    """Run this module's function `name` in a new interpreter; fail with its output when it fails."""
    r = subprocess.run([sys.executable, "-c", f"from tests.telemetry.test_memory import {name}; {name}()"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def cpu_peak_check() -> None:
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


def freed_blocks_check() -> None:
    if not return_freed_memory():
        print("not glibc")
        sys.exit(3)
    from sparsetrain.telemetry.memory import rss_bytes

    before = rss_bytes()
    xs = [torch.ones(2**20) for _ in range(32)]  # 32 x 4 MiB
    del xs
    grown = rss_bytes() - before
    assert grown < 32 * 2**20, grown


def test_cpu_peak_sees_a_freed_tensor_and_resets():
    _in_fresh_process("cpu_peak_check")


def test_freed_blocks_go_back_to_the_os():
    _in_fresh_process("freed_blocks_check")
