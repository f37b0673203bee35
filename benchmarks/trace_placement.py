"""Offline: how well a periodic re-placement predicts a recorded trace's next steps, by load window.

Replays `benchmarks/traces/<name>.jsonl` (global tokens per expert per step and layer) on `--ranks` ranks:
contiguous expert blocks, or an LPT placement recomputed every `--every` steps from the mean load of the last
w steps. Prints the rank-level load max/mean averaged over the steps in each range and over the layers. No
training and no processes: it shows whether a window predicts the loads that follow.

    python benchmarks/trace_placement.py
    python benchmarks/trace_placement.py --trace aux_off --ranks 4 --windows 1 5 20
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

TRACES = Path(__file__).resolve().parent / "traces"


def lpt(load: torch.Tensor, ranks: int) -> list[int]:
    """Owner per expert: heaviest first onto the least-loaded rank."""
    owner, total = [0] * load.numel(), [0.0] * ranks
    for e in torch.argsort(load, descending=True, stable=True).tolist():
        r = min(range(ranks), key=total.__getitem__)
        owner[e], total[r] = r, total[r] + float(load[e])
    return owner


def imbalance(load: torch.Tensor, owner: list[int], ranks: int) -> float:
    """Rank-level max/mean of load [E] under owner."""
    per = torch.zeros(ranks, dtype=torch.float64).index_add_(0, torch.tensor(owner), load)
    return float(per.max() / per.mean())


def replay(loads: torch.Tensor, ranks: int, every: int, window: int | None, lo: int, hi: int) -> float:
    """Mean over layers and steps lo..hi-1 of the imbalance; window None = contiguous blocks, never moved."""
    _, layers, experts = loads.shape  # [steps, L, E]
    vals = []
    for li in range(layers):
        owner = [e * ranks // experts for e in range(experts)]
        for s in range(hi):
            if s >= lo:
                vals.append(imbalance(loads[s, li], owner, ranks))
            if window is not None and (s + 1) % every == 0:
                owner = lpt(loads[max(0, s + 1 - window):s + 1, li].mean(0), ranks)
    return sum(vals) / len(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="aux_on", help="a name under benchmarks/traces")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--every", type=int, default=5, help="steps between re-placements (reshard_every)")
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 3, 5, 10])
    ap.add_argument("--ranges", nargs="+", default=["5-19", "5-99"], help="step ranges, inclusive")
    args = ap.parse_args()
    rows = [json.loads(line)["counts"] for line in (TRACES / f"{args.trace}.jsonl").read_text().splitlines() if line]
    loads = torch.tensor(rows, dtype=torch.float64)  # [steps, L, E]
    print(f"# {args.trace}: {loads.shape[0]} steps, {loads.shape[1]} layers, {loads.shape[2]} experts; "
          f"{args.ranks} ranks, re-placed every {args.every} steps; rank-level load max/mean")
    print("| steps | contiguous | " + " | ".join(f"w={w}" for w in args.windows) + " |")
    print("|---|---|" + "---|" * len(args.windows))
    for rng in args.ranges:
        lo, hi = (int(x) for x in rng.split("-"))
        hi = min(hi + 1, loads.shape[0])
        vals = [replay(loads, args.ranks, args.every, w, lo, hi) for w in [None, *args.windows]]
        print(f"| {lo}-{hi - 1} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")


if __name__ == "__main__":
    main()
