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
                         ({"grid": {"train.lr": [1e-3]}, "timeout_s": -5}, "timeout_s must be a finite number"),
                         ({"grid": {"train.lr": [1e-3]}, "timeout_s": "abc"}, "timeout_s must be a finite number"),
                         ({"grid": {"train.lr": [1e-3]}, "timeout_s": float("inf")}, "timeout_s must be a finite"),
                         ({"grid": {"train.lr": [1e-3]}, "timeout_s": True}, "timeout_s must be a finite number"),
                         # a key set by two axes: labelled with one value, run with the other
                         ({"grid": {"model.d_model": [16], "size": {"a": {"model.d_model": 32}}}},
                          "grid axes 'model.d_model' and 'size' both set model.d_model"),
                         # what `sparsetrain train` checks before start is checked for every point up front
                         ({"points": [{"train.lr": 1e-3}, {"data.corpus": "/nonexistent/c"}]},
                          r"point 1 .*data.corpus: directory not found"),
                         ({"grid": {"model.d_model": [64, 65536]}}, r"point 1 .*does not fit"),
                         ({"points": [{"train.lr": 1e-3}, {"train.lr": 1e-3}]}, "points 0 and 1 are the same")):
        with pytest.raises(LaunchError, match=message):
            load_sweep(_write(tmp_path, **bad))
    (tmp_path / "afile").write_text("")
    with pytest.raises(LaunchError, match="cannot be a directory: .*afile is a file"):
        load_sweep(_write(tmp_path, grid={"train.lr": [1e-3]}, out_dir=str(tmp_path / "afile" / "sub")))
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
    bad = "/proc/sweep-ckpt"  # fails at run time, inside the point's process (its checkpoint dir cannot be made)
    path = _write(tmp_path, grid={"train.lr": [0.001, 0.003]}, points=[{"checkpoint.dir": bad}])
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
    assert "2/3 points ok" in text and "cannot be used" in text
    lines = [json.loads(ln) for ln in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["point"] for r in lines] == [0, 1, 2]  # the finished point was not rerun
    assert [r["status"] for r in lines] == ["ok", "ok", "failed"]
    assert lines[2]["error"].startswith(f"output directory {bad} cannot be used")
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


def _fake_runs(monkeypatch) -> list[dict]:
    """run_point stand-in: records the point, makes its directory, returns an ok row (no training)."""
    import sparsetrain.launcher.sweep as sweep_mod

    ran: list[dict] = []

    def fake(sweep, p, point_dir):
        point_dir.mkdir(parents=True)
        ran.append(p.overrides)
        return {"point": p.index, "id": p.point_id, "keys": p.keys, "overrides": p.overrides, "dir": str(point_dir),
                "status": "ok", "final_loss": float(p.overrides.get("model.d_model", 1))}

    monkeypatch.setattr(sweep_mod, "run_point", fake)
    return ran


@pytest.mark.unit
def test_edited_grid_keeps_finished_points_and_renumbers_them(tmp_path, monkeypatch):
    """A value inserted before finished points: only it runs, no finished directory is reused or deleted, and
    sweep.csv and the report number the points by the current grid."""
    from sparsetrain.launcher.sweep import run_sweep

    from sparsetrain.report.sweep_report import current_rows

    ran = _fake_runs(monkeypatch)
    first = run_sweep(load_sweep(_write(tmp_path, grid={"model.d_model": [16, 32]})), progress=False)
    dirs = {r["keys"]["model.d_model"]: r["dir"] for r in first}
    rows = run_sweep(load_sweep(_write(tmp_path, grid={"model.d_model": [8, 16, 32]})), progress=False)
    assert [o["model.d_model"] for o in ran] == [16, 32, 8]  # only the new value ran
    assert [(r["point"], r["keys"]["model.d_model"]) for r in rows] == [(0, 8), (1, 16), (2, 32)]
    assert rows[1]["dir"] == dirs[16] and rows[2]["dir"] == dirs[32] and len({r["dir"] for r in rows}) == 3
    assert all(Path(r["dir"]).is_dir() for r in rows)
    with (tmp_path / "out" / "sweep.csv").open() as f:
        assert [(r["point"], r["model.d_model"]) for r in csv.DictReader(f)] == [("0", "8"), ("1", "16"), ("2", "32")]
    assert [(r["point"], r["final_loss"]) for r in current_rows(tmp_path / "out")] == [(0, 8.0), (1, 16.0), (2, 32.0)]


@pytest.mark.unit
def test_changed_base_is_a_new_point(tmp_path, monkeypatch):
    ran = _fake_runs(monkeypatch)
    from sparsetrain.launcher.sweep import run_sweep

    run_sweep(load_sweep(_write(tmp_path, grid={"model.d_model": [16]})), progress=False)
    other = tmp_path / "tiny-copy.yaml"  # the same settings under another preset name: another base
    other.write_text((ROOT / "configs" / "tiny.yaml").read_text())
    sw = load_sweep(_write(tmp_path, grid={"model.d_model": [16]}, base=str(other)))
    run_sweep(sw, progress=False)
    assert len(ran) == 2  # not "already ok": the finished point was of another preset


@pytest.mark.unit
def test_second_sweep_into_the_same_out_dir_is_refused(tmp_path, monkeypatch):
    """One sweep owns its out_dir: the second would delete the first one's running points."""
    from sparsetrain.launcher.sweep import run_sweep

    from sparsetrain.train.run_lock import run_lock

    ran = _fake_runs(monkeypatch)
    sw = load_sweep(_write(tmp_path, grid={"model.d_model": [16]}))
    # the first sweep, still running, holds the lock
    with run_lock(sw.out_dir, log=lambda m: None), pytest.raises(LaunchError, match="in use by another sparsetrain"):
        run_sweep(sw, progress=False)
    assert ran == []
    assert [r["status"] for r in run_sweep(sw, progress=False)] == ["ok"]  # after it ends
