"""Small matplotlib helpers shared by the run and sweep reports (Agg backend, files only)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsetrain.telemetry.jsonl import read_jsonl

__all__ = ["lines", "pyplot", "read_jsonl", "save"]


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a clear error naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("reports need matplotlib: pip install 'sparsetrain[viz]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> Path:
    """Write `fig` as PNG and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def lines(ax: Any, records: list[dict[str, Any]], keys: list[str], ylabel: str) -> bool:
    """Plot each key of `records` against step on `ax`; False when none of the keys has data."""
    drawn = False
    for k in keys:
        pts = [(r["step"] + 1, r[k]) for r in records if isinstance(r.get(k), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=k)
            drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return drawn
