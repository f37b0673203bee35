"""Acceptance: the CLI on 4 Ray workers writes the same per-step losses as on 1 worker (tiny preset)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def _train(out: Path, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "sparsetrain.cli", "train", "--config", "configs/tiny.yaml",
           "--set", f"train.out_dir={out}", "--set", "train.log_every=1", "--set", "train.eval_every=0",
           "--set", "checkpoint.save_final=false", "--set", "train.progress=false"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy,steps", [("fssdp", 10), ("ep", 5)])
def test_four_workers_match_one(tmp_path, strategy, steps):
    one = _train(tmp_path / "one", "launch.workers=1", f"parallel.strategy={strategy}", f"train.steps={steps}")
    four = _train(tmp_path / "four", "launch.workers=4", f"parallel.strategy={strategy}", f"train.steps={steps}")
    assert [r["step"] for r in one] == list(range(steps)) == [r["step"] for r in four]
    for a, b in zip(one, four):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert "tokens_per_s" in b
