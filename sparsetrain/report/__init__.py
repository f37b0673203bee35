"""`sparsetrain report`: PNG plots and a Markdown page for a run directory or a sweep directory.

matplotlib is imported only when a report is drawn (the `viz` extra).
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["write_report"]


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write PNGs + report.md for a run dir (metrics.jsonl) or a sweep dir (sweep.jsonl); returns the .md path."""
    src = Path(path)
    if (src / "sweep.jsonl").exists():
        from sparsetrain.report.sweep_report import sweep_report

        return sweep_report(src, Path(out) if out else src / "report")
    if (src / "metrics.jsonl").exists():
        from sparsetrain.report.run_report import run_report

        return run_report(src, Path(out) if out else src / "report")
    raise FileNotFoundError(f"{src} holds neither metrics.jsonl (a run) nor sweep.jsonl (a sweep)")
