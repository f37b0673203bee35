"""Compare logged losses of runs step by step (multi-GPU vs 1-GPU parity): a table and the largest gap.

    python benchmarks/compare_runs.py runs/val/ref runs/val/dp runs/val/ep runs/val/fssdp --rtol 2e-3

The first directory is the reference; exits 1 when any other run's logged `loss_last` (the step's own
loss; `loss` in older runs) differs from it by more than --rtol (relative) at a step both logged.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def losses(run: Path) -> dict[int, float]:
    """step -> that step's training loss from <run>/metrics.jsonl."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out[int(r["step"])] = float(r.get("loss_last", r["loss"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run dirs (train.out_dir); the first is the reference")
    ap.add_argument("--rtol", type=float, default=2e-3)
    a = ap.parse_args()
    if len(a.runs) < 2:
        sys.exit("error: give a reference run and at least one run to compare")
    for r in a.runs:
        if not (r / "metrics.jsonl").exists():
            sys.exit(f"error: {r}/metrics.jsonl not found")
    curves = [losses(r) for r in a.runs]
    steps = sorted(set(curves[0]).intersection(*curves[1:]))
    if not steps:
        sys.exit("error: the runs logged no common step (use the same train.log_every)")
    print("| step | " + " | ".join(str(r) for r in a.runs) + " |")
    print("|---" * (len(a.runs) + 1) + "|")
    worst = 0.0
    for s in steps:
        ref = curves[0][s]
        gaps = [abs(c[s] - ref) / max(abs(ref), 1e-12) for c in curves[1:]]
        worst = max(worst, *gaps)
        print(f"| {s} | {ref:.5f} | " + " | ".join(f"{c[s]:.5f} ({g:.1e})" for c, g in zip(curves[1:], gaps)) + " |")
    verdict = "ok" if worst <= a.rtol else "FAIL"
    print(f"largest relative loss gap vs {a.runs[0]}: {worst:.2e} (rtol {a.rtol:g}): {verdict}")
    sys.exit(0 if verdict == "ok" else 1)


if __name__ == "__main__":
    main()
