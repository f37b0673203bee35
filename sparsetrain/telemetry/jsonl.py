"""Reading the JSONL logs runs write (metrics.jsonl, expert_loads.jsonl, placements.jsonl, sweep.jsonl)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records (JSON objects) of a JSONL file ([] when it is missing); a torn line (a run writing or killed
    mid-line) and lines that hold no object are skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out
