"""Sweeps: a grid (or list) of config overrides, each point a separate `sparsetrain train` run.

A sweep file (configs/sweeps/NAME.yaml):

    base: tiny                      # preset every point starts from
    out_dir: runs/sweeps/NAME       # sweep.jsonl, sweep.csv and points/NNN-<id>/ (each point's train.out_dir)
    set: {train.steps: 20}          # overrides shared by every point
    grid:                           # cartesian product; an axis without a dot maps names to override sets
      parallel.strategy: [ep, fssdp]
      size: {s: {model.d_model: 64}, m: {model.d_model: 128}}
    points: [{...}, {...}]          # instead of (or after) the grid: explicit override sets
    timeout_s: 1800                 # per point

Every point is validated before any runs (its config and the checks `sparsetrain train` makes before start:
memory fit, data, device); one sweep at a time owns out_dir (a lock). A point runs in a fresh process through the launcher (local
Ray / torchrun / inline per its launch.* keys, or a Ray cluster when launch.address is set). Finished
points are recorded in sweep.jsonl as they end (config keys + summary metrics, or the one-line error of
a failed point) and are not rerun when the sweep is started again; failed and unfinished points are.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sparsetrain.launcher.errors import LaunchError

from sparsetrain.telemetry.jsonl import read_jsonl
from sparsetrain.textio import DuplicateKeyError, load_yaml

SWEEP_KEYS = ("base", "out_dir", "set", "grid", "points", "timeout_s")
SUMMARY_METRICS = ("final_loss", "val_loss", "tokens_per_s", "elapsed_s", "steps_run", "world",
                   "expert_load_max_mean", "expert_busy_max_mean", "rank_tokens_max_mean", "spag_MB", "sprs_MB",
                   "a2a_MB", "mfu", "tflops_per_rank", "step_ms", "peak_memory_mib_max", "params_total",
                   "params_active")


@dataclass
class SweepPoint:
    """One run: its swept keys (for the table) and the full override list."""

    index: int
    keys: dict[str, Any]
    overrides: dict[str, Any]
    base: str = "tiny"

    @property
    def point_id(self) -> str:
        """Stable id from the base preset and the overrides: a resumed sweep matches points by it, not by position,
        and a changed `base` makes new points (an edited preset file does not: give it a new name)."""
        blob = json.dumps({"base": self.base, "overrides": self.overrides}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def dir_name(self) -> str:
        """points/<index>-<id>: one directory per configuration, so an edited grid never reuses a finished one's."""
        return f"{self.index:03d}-{self.point_id}"

    def set_args(self) -> list[str]:
        """`--set key=value` pairs for the CLI (values as YAML flow scalars)."""
        out = []
        for k, v in self.overrides.items():
            out += ["--set", f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"]
        return out


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str
    base: str
    out_dir: Path
    points: list[SweepPoint]
    timeout_s: float = 0.0
    shared: dict[str, Any] = field(default_factory=dict)


def _axis_values(name: str, values: Any, source: str) -> list[tuple[Any, dict[str, Any]]]:
    """(label, overrides) per value of one grid axis."""
    if "." in name:
        if not isinstance(values, list) or not values:
            raise LaunchError(f"{source}: grid.{name} must be a non-empty list of values")
        return [(v, {name: v}) for v in values]
    if not isinstance(values, dict) or not values or not all(isinstance(v, dict) for v in values.values()):
        raise LaunchError(f"{source}: grid.{name} (no dot: a named axis) must map labels to override mappings, "
                          f"e.g. {{small: {{model.d_model: 64}}}}")
    return [(label, dict(ov)) for label, ov in values.items()]


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file; every point's config is checked before anything runs."""
    from sparsetrain.config import ConfigError, load_config
    from sparsetrain.data.errors import DataError
    from sparsetrain.preflight import preflight

    src = Path(path)
    if not src.exists():
        raise LaunchError(f"sweep file not found: {src}")
    try:
        data = load_yaml(src.read_text(encoding="utf-8"), str(src)) or {}
    except DuplicateKeyError as e:
        raise LaunchError(str(e)) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise LaunchError(f"{src}: not a readable sweep YAML ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise LaunchError(f"{src}: a sweep file is a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise LaunchError(f"{src}: unknown sweep key(s) {unknown}; allowed: {', '.join(SWEEP_KEYS)}")
    shared = data.get("set") or {}
    grid = data.get("grid") or {}
    explicit = data.get("points") or []
    for key, value, kind in (("set", shared, dict), ("grid", grid, dict), ("points", explicit, list)):
        if not isinstance(value, kind):
            raise LaunchError(f"{src}: '{key}' must be a {'mapping' if kind is dict else 'list'}, got {value!r}")
    shared = dict(shared)
    if not grid and not explicit:
        raise LaunchError(f"{src}: needs a 'grid' or a 'points' list")
    timeout_s = _timeout(data.get("timeout_s"), src)
    base = str(data.get("base", "tiny"))
    points: list[SweepPoint] = []
    if grid:
        axes = [(name, _axis_values(name, vals, str(src))) for name, vals in grid.items()]
        _check_disjoint_axes(axes, src)
        for combo in itertools.product(*(vals for _, vals in axes)):
            keys = {name: label for (name, _), (label, _) in zip(axes, combo)}
            ov = dict(shared)
            for _, o in combo:
                ov.update(o)
            points.append(SweepPoint(len(points), keys, ov, base))
    for p in explicit:
        if not isinstance(p, dict):
            raise LaunchError(f"{src}: every entry of 'points' must be a mapping of overrides, got {p!r}")
        points.append(SweepPoint(len(points), dict(p), {**shared, **p}, base))
    seen: dict[str, int] = {}
    for p in points:
        if p.point_id in seen:
            raise LaunchError(f"{src}: points {seen[p.point_id]} and {p.index} are the same configuration {p.keys}; "
                              "remove one")
        seen[p.point_id] = p.index
        if "train.out_dir" in p.overrides:
            raise LaunchError(f"{src}: train.out_dir is set by the sweep (out_dir/points/NNN-<id>); remove it")
        try:  # the checks `sparsetrain train` makes before start (memory fit, data, device): all points, up front
            preflight(load_config(base, p.set_args()[1::2]))
        except (ConfigError, DataError) as e:
            raise LaunchError(f"{src}: point {p.index} {p.keys}: {str(e).splitlines()[0]}") from None
    out_dir = Path(data.get("out_dir") or f"runs/sweeps/{src.stem}")
    blocker = next((q for q in (out_dir, *out_dir.parents) if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise LaunchError(f"{src}: out_dir {out_dir} cannot be a directory: {blocker} is a file")
    return Sweep(src.stem, base, out_dir, points, timeout_s, shared)


def _timeout(value: Any, src: Path) -> float:
    """timeout_s: finite seconds >= 0 (0 or absent: none)."""
    t = -1.0
    if value is None:
        t = 0.0
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        t = float(value)
    if not t >= 0:
        raise LaunchError(f"{src}: timeout_s must be a finite number of seconds >= 0 (0 = none), got {value!r}")
    return t


def _check_disjoint_axes(axes: list[tuple[str, list[tuple[Any, dict[str, Any]]]]], src: Path) -> None:
    """Two grid axes setting one key would label a point with one value and run the other: refused."""
    owner: dict[str, str] = {}
    for name, values in axes:
        for key in {k for _, ov in values for k in ov}:
            if key in owner and owner[key] != name:
                raise LaunchError(f"{src}: grid axes '{owner[key]}' and '{name}' both set {key}; a point would run "
                                  "one axis's value under the other's label: set it in one axis only")
            owner[key] = name


def read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Last recorded row per point id of sweep.jsonl ({} if none); a torn last line is ignored."""
    return {row["id"]: row for row in read_jsonl(path) if "id" in row}


def one_line_error(stderr: str, rc: int) -> str:
    """The CLI's `error: ...` line, else the last non-empty line, else the exit code."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln.removeprefix("error:").strip()
    return lines[-1][:300] if lines else f"exit code {rc}"


def run_point(sweep: Sweep, p: SweepPoint, point_dir: Path) -> dict[str, Any]:
    """Run one point in a fresh `sparsetrain train` process; returns its sweep row."""
    if point_dir.exists():
        shutil.rmtree(point_dir)  # an unfinished earlier attempt: start clean
    point_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "sparsetrain.cli", "train", "--config", sweep.base, *p.set_args(),
           "--set", f"train.out_dir={point_dir}", "--set", "train.progress=false"]
    env = dict(os.environ, SPARSETRAIN_PROGRESS="0")
    t0 = time.time()
    with (point_dir / "log.txt").open("w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env=env, check=False,
                                  timeout=sweep.timeout_s or None)
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = -1, f"error: timed out after {sweep.timeout_s:.0f} s\n{e.stderr or ''}"
        log.write(err if isinstance(err, str) else "")
    row: dict[str, Any] = {"point": p.index, "id": p.point_id, "keys": p.keys, "overrides": p.overrides,
                           "dir": str(point_dir), "wall_s": round(time.time() - t0, 2)}
    summary_path = point_dir / "summary.json"
    if rc != 0 or not summary_path.exists():
        return {**row, "status": "failed", "error": one_line_error(err or "", rc)}
    summary = json.loads(summary_path.read_text())
    if isinstance(summary.get("peak_memory_mib"), list) and summary["peak_memory_mib"]:
        summary["peak_memory_mib_max"] = max(summary["peak_memory_mib"])  # the fullest rank
    metrics = {k: summary[k] for k in SUMMARY_METRICS if isinstance(summary.get(k), (int, float))}
    if metrics.get("tokens_per_s"):
        from sparsetrain.config import load_config

        cfg = load_config(sweep.base, p.set_args()[1::2])
        metrics["step_time_s"] = cfg.data.batch_size * cfg.model.seq_len / metrics["tokens_per_s"]
    return {**row, "status": "ok", **metrics}


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """sweep.csv: point, swept keys, status, error, every metric seen (one row per point)."""
    keys = list(dict.fromkeys(k for r in rows for k in r["keys"]))
    metrics = list(dict.fromkeys(k for r in rows for k in r if k in SUMMARY_METRICS or k == "step_time_s"))
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["point", *keys, "status", "error", *metrics, "dir"])
        for r in sorted(rows, key=lambda r: r["point"]):
            w.writerow([r["point"], *(r["keys"].get(k, "") for k in keys), r["status"], r.get("error", ""),
                        *(r.get(m, "") for m in metrics), r["dir"]])
    tmp.replace(path)


def run_sweep(sweep: Sweep, retry_failed: bool = True, progress: bool = True) -> list[dict[str, Any]]:
    """Run every point not yet finished; returns the rows of all points in order."""
    from sparsetrain.train.run_lock import RunLockError, run_lock

    try:  # one sweep owns its out_dir: a second one into it is refused (it would delete the first one's points)
        with run_lock(sweep.out_dir, log=lambda m: print(m, file=sys.stderr)):
            return _run_points(sweep, retry_failed, progress)
    except RunLockError as e:
        raise LaunchError(f"sweep {sweep.name}: {e}".replace("train.out_dir", "the sweep's out_dir")) from None


def _current(sweep: Sweep, done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the current grid's points, in its order and numbered by it (a finished row of an edited
    grid keeps its directory, not its old number)."""
    return [{**done[p.point_id], "point": p.index, "keys": p.keys} for p in sweep.points if p.point_id in done]


def _run_points(sweep: Sweep, retry_failed: bool, progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    jsonl = sweep.out_dir / "sweep.jsonl"
    done = read_rows(jsonl)
    todo = [p for p in sweep.points if p.point_id not in done
            or (retry_failed and done[p.point_id]["status"] != "ok")]
    bar = tqdm(total=len(sweep.points), initial=len(sweep.points) - len(todo), desc=f"sweep {sweep.name}",
               unit="point", disable=not progress, dynamic_ncols=True)
    for p in todo:
        bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in p.keys.items()))
        row = run_point(sweep, p, sweep.out_dir / "points" / p.dir_name())
        with jsonl.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        done[p.point_id] = row
        write_csv(_current(sweep, done), sweep.out_dir / "sweep.csv")
        if row["status"] != "ok":
            tqdm.write(f"point {p.index} {p.keys} failed: {row['error']}")
        bar.update(1)
    bar.close()
    rows = _current(sweep, done)
    write_csv(rows, sweep.out_dir / "sweep.csv")
    return rows
