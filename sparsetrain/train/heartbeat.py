"""Per-rank progress files: `<out_dir>/.heartbeat/rank<R>` holds the steps a rank has completed and when.

The launcher reads them after a failure to say at which step the group was and how many steps a restart
redoes (a SIGKILLed rank leaves no traceback, but its last beat).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

DIR = ".heartbeat"


def beat(out_dir: str | Path, rank: int, steps_done: int) -> None:
    """Record that `rank` has completed `steps_done` steps (atomic replace; a few bytes)."""
    d = Path(out_dir) / DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".rank{rank}.tmp"
    tmp.write_text(f"{steps_done} {time.time():.3f}\n")
    os.replace(tmp, d / f"rank{rank}")


def steps_done(out_dir: str | Path) -> dict[int, int]:
    """{rank: completed steps} from the last beats (empty when none were written)."""
    out: dict[int, int] = {}
    for p in (Path(out_dir) / DIR).glob("rank*"):
        try:
            out[int(p.name[4:])] = int(p.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def clear(out_dir: str | Path) -> None:
    """Forget the beats of an earlier attempt."""
    shutil.rmtree(Path(out_dir) / DIR, ignore_errors=True)
