"""Report for a sweep directory: each summary metric against the swept keys, plus the table of points."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

from sparsetrain.report.plots import pyplot, read_jsonl, save

METRICS = ("tokens_per_s", "final_loss", "val_loss", "elapsed_s", "step_time_s", "mfu", "expert_load_max_mean",
           "rank_tokens_max_mean", "step_ms", "tflops_per_rank", "peak_memory_mib_max")


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v))


def _metric_plot(rows: list[dict[str, Any]], keys: list[str], metric: str, out: Path) -> Path | None:
    """`metric` vs the first swept key; one line per combination of the other keys."""
    pts = [r for r in rows if isinstance(r.get(metric), (int, float))]
    if not pts or not keys:
        return None
    x_key, rest = keys[0], keys[1:]
    groups: dict[str, list[tuple[Any, float]]] = defaultdict(list)
    for r in pts:
        if x_key not in r["keys"]:
            continue  # a listed point without the first key
        label = ", ".join(f"{k}={r['keys'].get(k, '-')}" for k in rest) or metric
        groups[label].append((r["keys"][x_key], r[metric]))
    if not groups:
        return None
    xs = sorted({x for g in groups.values() for x, _ in g}, key=_sort_key)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, g in sorted(groups.items()):
        g = sorted(g, key=lambda p: _sort_key(p[0]))
        ax.plot([xs.index(x) for x, _ in g], [y for _, y in g], marker="o", label=label)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, out / f"{metric}.png")


def current_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """The sweep's points as they stand, in the current grid's order: sweep.jsonl appends a row per run, so a
    point re-run (a retried failure) has several and the last one per directory (one per configuration) is
    what it holds. sweep.csv, rewritten by the runner for the current grid, says which points are in it and
    their numbers now (an edited grid renumbers finished points); without it, every directory's last row."""
    latest: dict[str, dict[str, Any]] = {}
    for r in read_jsonl(sweep_dir / "sweep.jsonl"):
        latest[str(r.get("dir", r["point"]))] = r
    csv_path = sweep_dir / "sweep.csv"
    if not csv_path.exists():
        return sorted(latest.values(), key=lambda r: int(r["point"]))
    with csv_path.open(newline="") as f:
        current = [(int(row["point"]), row.get("dir", "")) for row in csv.DictReader(f)
                   if row.get("point", "").isdigit()]
    return [{**latest[d], "point": i} for i, d in sorted(current) if d in latest]


def sweep_report(sweep_dir: Path, out: Path) -> Path:
    """Write one PNG per recorded metric and report.md (all points, failed ones with their error)."""
    rows = current_rows(sweep_dir)
    if not rows:
        raise ValueError(f"{sweep_dir / 'sweep.jsonl'} has no points")
    keys = list(dict.fromkeys(k for r in rows for k in r["keys"]))
    ok = [r for r in rows if r.get("status") == "ok"]
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# Sweep report: `{sweep_dir}`", "", f"{len(ok)} of {len(rows)} points finished; swept: "
          + ", ".join(f"`{k}`" for k in keys), ""]
    shown = [m for m in METRICS if any(m in r for r in ok)]
    head = ["point", *keys, "status", *shown]
    md += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        vals = [f"{r[m]:.4g}" if isinstance(r.get(m), (int, float)) else "" for m in shown]
        status = r.get("status", "") if r.get("status") == "ok" else f"failed: {r.get('error', '')}"
        cells = [str(r["point"]), *(str(r["keys"].get(k, "")) for k in keys), status, *vals]
        md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    md.append("")
    for m in shown:
        png = _metric_plot(ok, keys, m, out)
        if png:
            md += [f"## {m} vs {keys[0]}", "", f"![{m}]({png.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
