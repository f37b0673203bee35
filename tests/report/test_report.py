"""`sparsetrain report` writes PNGs and Markdown for a run dir and for a sweep dir."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparsetrain.report import write_report

pytestmark = pytest.mark.unit
pytest.importorskip("matplotlib")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_run(d):
    d.mkdir()
    recs = []
    for step in (1, 3, 5):
        r = {"step": step, "loss": 5.0 - step / 2, "lr": 1e-3, "tokens_per_s": 1000.0 + step, "mfu": 0.01 * step,
             "peak_memory_mib": [100.0 + step, 90.0],
             "ranks": {k: [1.0 + step, 2.0] for k in ("attention_ms", "experts_ms", "dispatch_ms", "combine_ms",
                                                      "attention_cpu_ms", "experts_cpu_ms")}}
        if step == 5:
            r["val_loss"] = 3.0
        recs.append(r)
    _jsonl(d / "metrics.jsonl", recs)
    _jsonl(d / "expert_loads.jsonl", [{"step": s, "counts": [[s, 2, 3, 4], [4, 3, 2, 1]]} for s in range(6)])
    _jsonl(d / "placements.jsonl", [{"step": s, "layers": [{"owners": [0, 0, 1, 1], "copies": [[0, 1], [0], [1], [1]]}] * 2}
                                    for s in (1, 5)])
    (d / "summary.json").write_text(json.dumps({"steps": 6, "final_loss": 2.5, "strategy": "fssdp"}))


def test_run_report_writes_every_picture(tmp_path):
    _fake_run(tmp_path / "run")
    md = write_report(tmp_path / "run")
    names = {p.name for p in md.parent.glob("*.png")}
    assert names == {"loss.png", "throughput.png", "expert_load.png", "placement.png", "rank_busy.png", "memory.png"}
    text = md.read_text()
    for n in names:
        assert f"]({n})" in text
    assert "| final_loss | 2.5 |" in text and "val 3.0000" in text


def test_sweep_report_and_cli(tmp_path):
    d = tmp_path / "sweep"
    d.mkdir()
    rows = []
    for i, (strategy, skew) in enumerate([(s, k) for s in ("ep", "fssdp") for k in (0.0, 1.2)]):
        rows.append({"point": i, "keys": {"moe.router_skew": skew, "parallel.strategy": strategy}, "status": "ok",
                     "tokens_per_s": 100.0 + i, "final_loss": 4.0})
    rows.append({"point": 4, "keys": {"moe.router_skew": 2.0, "parallel.strategy": "ep"}, "status": "failed",
                 "error": "rank 1 failed: boom"})
    _jsonl(d / "sweep.jsonl", rows)
    proc = subprocess.run([sys.executable, "-m", "sparsetrain.cli", "report", str(d)], check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 PNGs" in proc.stdout
    text = (d / "report" / "report.md").read_text()
    assert "4 of 5 points finished" in text and "failed: rank 1 failed: boom" in text
    assert (d / "report" / "tokens_per_s.png").stat().st_size > 1000


def test_report_of_nothing_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparsetrain.cli", "report", str(tmp_path)], check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "neither metrics.jsonl" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("worlds", [(4, 2), (2, 4)])
def test_run_report_of_a_run_resumed_on_another_world_size(tmp_path, worlds):
    """Per-rank lists change length where a run resumed on fewer or more ranks (checkpoints reshard)."""
    d = tmp_path / "run"
    d.mkdir()
    recs = []
    for step, world in ((1, worlds[0]), (3, worlds[0]), (5, worlds[1]), (7, worlds[1])):
        recs.append({"step": step, "loss": 5.0 - step / 4, "peak_memory_mib": [100.0 + r for r in range(world)],
                     "ranks": {k: [1.0 + r for r in range(world)] for k in (
                         "attention_ms", "experts_ms", "dispatch_ms", "combine_ms", "attention_cpu_ms",
                         "experts_cpu_ms")}})
    _jsonl(d / "metrics.jsonl", recs)
    md = write_report(d)
    assert {"rank_busy.png", "memory.png"} <= {p.name for p in md.parent.glob("*.png")}


def test_sweep_report_shows_each_point_once_as_it_stands(tmp_path):
    """sweep.jsonl appends a row per run: a retried point appears several times (one directory per
    configuration); the report shows the last row per directory of the current grid (sweep.csv), numbered by it."""
    d = tmp_path / "sweep"
    d.mkdir()
    rows = [{"point": i, "id": f"old{i}", "keys": {"parallel.strategy": s}, "status": "failed", "error": "timeout",
             "dir": f"points/00{i}-old{i}"} for i, s in enumerate(("ep", "fssdp", "dp"))]  # the first grid, timed out
    rows += [{"point": i, "id": f"new{i}", "keys": {"parallel.strategy": s}, "status": "ok", "tokens_per_s": 10.0 + i,
              "dir": f"points/00{i}-new{i}"} for i, s in enumerate(("ep", "fssdp"))]  # the edited grid: both ran
    rows.append({**rows[2], "status": "ok", "tokens_per_s": 7.0})  # "dp" retried and finished, since renumbered 2
    _jsonl(d / "sweep.jsonl", rows)
    (d / "sweep.csv").write_text("point,parallel.strategy,status,error,tokens_per_s,dir\n"
                                 "0,ep,ok,,10.0,points/000-new0\n1,fssdp,ok,,11.0,points/001-new1\n"
                                 "2,dp,ok,,7.0,points/002-old2\n")
    text = write_report(d).read_text()
    assert "3 of 3 points finished" in text and "timeout" not in text
    assert sum(line.startswith("| 0 |") for line in text.splitlines()) == 1
    assert sum(line.startswith("| 2 |") for line in text.splitlines()) == 1


def test_sweep_report_of_failed_points_is_a_well_formed_table(tmp_path):
    """Every point failed (no metric columns): header, delimiter and rows have the same cell count; a '|' in an
    error does not split its cell."""
    d = tmp_path / "sweep"
    d.mkdir()
    _jsonl(d / "sweep.jsonl", [{"point": i, "id": f"p{i}", "keys": {"moe.top_k": i + 1}, "status": "failed",
                                "error": "timed out | killed"} for i in range(2)])
    lines = [ln for ln in write_report(d).read_text().splitlines() if ln.startswith("|")]
    cells = {len(ln.replace("\\|", "").split("|")) for ln in lines}
    assert len(lines) == 4 and len(cells) == 1, lines


def test_run_report_skips_lines_that_are_no_training_record(tmp_path):
    d = tmp_path / "run"
    _fake_run(d)
    with (d / "metrics.jsonl").open("a") as f:
        f.write('[1, 2]\n{"step": 7}\n{"step": 9, "lo')
    assert write_report(d).exists()
