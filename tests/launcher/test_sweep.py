"""Sweeps: grid + list expansion and validation, error capture, resumption after a kill (tiny fast sweep)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sparsetrain.launcher.errors import LaunchError
from sparsetrain.launcher.sweep import load_sweep, one_line_error, read_rows

ROOT = Path(__file__).resolve().parents[2]
FAST = {"launch.workers": 1, "launch.backend": "inline", "parallel.strategy": "none", "train.steps": 2,
        "train.log_every": 1, "train.eval_every": 0, "train.warmup_steps": 1, "train.trackers": [],
        "checkpoint.save_final": False, "checkpoint.resume": False, "model.d_model": 32, "model.n_layers": 1,
        "model.n_heads": 2, "model.seq_len": 16, "moe.d_ffn": 32, "moe.num_experts": 2, "data.batch_size": 2,
        "data.eval_batches": 1}


def _write(tmp_path: Path, **extra) -> Path:
    spec = {"base": "tiny", "out_dir": str(tmp_path / "out"), "set": FAST, **extra}
    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.unit
def test_grid_named_axes_points_and_validation(tmp_path):
    sw = load_sweep(_write(tmp_path, grid={"train.lr": [0.001, 0.003], "size": {"s": {"model.d_model": 16},
                                                                              "m": {"model.d_model": 32}}},
                           points=[{"train.steps": 3}]))
    assert [p.keys for p in sw.points] == [{"train.lr": 0.001, "size": "s"}, {"train.lr": 0.001, "size": "m"},
                                           {"train.lr": 0.003, "size": "s"}, {"train.lr": 0.003, "size": "m"},
                                           {"train.steps": 3}]
    assert sw.points[1].overrides["model.d_model"] == 32 and sw.points[4].overrides["train.steps"] == 3
    assert len({p.point_id for p in sw.points}) == 5
    assert "train.trackers=[]" in sw.points[0].set_args()
    with pytest.raises(LaunchError, match=r"point 1 .*moe.top_k=3 must be in \[1, moe.num_experts=2\]"):
        load_sweep(_write(tmp_path, grid={"moe.top_k": [1, 3]}))
    with pytest.raises(LaunchError, match="unknown sweep key"):
        load_sweep(_write(tmp_path, grids={}))
    for bad, message in (({"grid": [1, 2]}, "'grid' must be a mapping"), ({"set": "abc"}, "'set' must be a mapping"),
                         ({"grid": {"train.lr": [1e-3]}, "timeout_s": -5}, "timeout_s must be a number of seconds"),
                         ({"grid": {"train.lr": [1e-3]}, "timeout_s": "abc"}, "timeout_s must be a number"),
                         ({"points": [{"train.lr": 1e-3}, {"train.lr": 1e-3}]}, "points 0 and 1 are the same")):
        with pytest.raises(LaunchError, match=message):
            load_sweep(_write(tmp_path, **bad))
    (tmp_path / "broken.yaml").write_text("grid: [")
    with pytest.raises(LaunchError, match="not a readable sweep YAML"):
        load_sweep(tmp_path / "broken.yaml")
    assert one_line_error("Traceback...\nerror: rank 1 failed: boom\n", 1) == "rank 1 failed: boom"
    assert one_line_error("", 3) == "exit code 3"


def _sweep_proc(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sparsetrain.cli", "sweep", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_sweep_records_errors_and_resumes_after_kill(tmp_path):
    bad = "/nonexistent/sweep-corpus"  # fails at run time, inside the point's process
    path = _write(tmp_path, grid={"train.lr": [0.001, 0.003]}, points=[{"data.corpus": bad}])
    out = tmp_path / "out"
    proc = _sweep_proc(path)
    deadline = time.time() + 300
    while not read_rows(out / "sweep.jsonl") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the point it is running
    proc.wait()
    first = read_rows(out / "sweep.jsonl")
    assert len(first) == 1 and next(iter(first.values()))["keys"] == {"train.lr": 0.001}, first
    proc = _sweep_proc(path)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, text  # one point failed
    assert "2/3 points ok" in text and "directory not found" in text
    lines = [json.loads(ln) for ln in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["point"] for r in lines] == [0, 1, 2]  # the finished point was not rerun
    assert [r["status"] for r in lines] == ["ok", "ok", "failed"]
    assert lines[2]["error"].startswith(f"data.corpus: directory not found: {bad}")
    assert "\n" not in lines[2]["error"]
    for r in lines[:2]:
        assert r["final_loss"] > 0 and r["step_time_s"] > 0 and (Path(r["dir"]) / "metrics.jsonl").exists()
    with (out / "sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["train.lr"] for r in table] == ["0.001", "0.003", ""]
    assert [r["status"] for r in table] == ["ok", "ok", "failed"] and table[0]["final_loss"]


@pytest.mark.unit
def test_duplicate_key_in_a_sweep_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("base: tiny\ngrid:\n  train.lr: [0.001]\n  train.lr: [0.003]\n", encoding="utf-8")
    with pytest.raises(LaunchError, match=rf"^{path}: duplicate key 'train.lr' \(line 4\)$"):
        load_sweep(path)
