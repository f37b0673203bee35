"""`make gpu-check` flow: without CUDA it still writes its table; --cpu-flow runs the training rows on gloo."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.unit
def test_without_cuda_every_row_says_skipped(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has a GPU: `make gpu-check` runs for real")
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, check=False,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    report = (tmp_path / "REPORT.md").read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    # device, dp/ep/fssdp/megatron_moe and the fp32 pair ep/megatron_moe, tests/gpu, two benchmarks
    assert len(rows) == 1 + 6 + 1 + 2
    assert all("skipped" in r for r in rows), report


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_flow_trains_every_strategy_with_a_process_group(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--cpu-flow", "--only", "train"],
                       capture_output=True, text=True, timeout=1200, cwd=ROOT, check=False)
    report = (tmp_path / "REPORT.md").read_text()
    assert p.returncode == 0, report + p.stderr[-2000:]
    for s in ("dp", "ep", "fssdp"):
        row = next(ln for ln in report.splitlines() if ln.startswith(f"| train {s} "))
        assert "| pass |" in row and "gloo" in row and "vs plan" in row, row
