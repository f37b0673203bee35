"""Offline: how well a periodic re-placement predicts a recorded trace's next steps, by load window.

Replays `benchmarks/traces/<name>.jsonl` (global tokens per expert per step and layer) on `--ranks` ranks:
contiguous expert blocks, or an LPT placement recomputed every `--every` steps from the mean load of the last
w steps. Prints the rank-level load max/mean averaged over the steps in each range and over the layers. No
training and no processes: it shows whether a window predicts the loads that follow.

A second table replays the runtime's own re-shard decisions (`sparsetrain.parallel.fssdp_reshard`: scheduled
every `--every` steps, with and without `reshard_early`) on a stand-in strategy without copies, with the
CPU device defaults as machine numbers and the benchmark's expert shape (d_model 128, d_ffn 2048): the same
imbalance, and how many re-shards each made.

    python benchmarks/trace_placement.py
    python benchmarks/trace_placement.py --trace aux_off --ranks 4 --windows 1 5 20
    python benchmarks/trace_placement.py --check-cost    # host time of the early re-shard check, by scale
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from sparsetrain.parallel import fssdp_reshard
from sparsetrain.parallel.copy_cost import DEVICE_DEFAULTS, CopyCost, expert_flops_per_slot
from sparsetrain.parallel.placement import LayerPlacement, LoadTracker, initial_owners
from sparsetrain.parallel.topology import Topology

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


class ExpertShape:
    """What `reshard.moved_bytes_per_expert` reads of a GroupedExperts: the benchmark's shape, fp32."""

    def __init__(self, d_model: int = 128, d_ffn: int = 2048) -> None:
        self.d_model, self.d_ffn, self.w1 = d_model, d_ffn, torch.zeros(1)


def stand_in_strategy(num_layers: int, num_experts: int, ranks: int, every: int, window: int, gate: bool = True,
                      shape: ExpertShape | None = None, early: bool = False) -> SimpleNamespace:
    """What `fssdp_reshard` reads of an FSSDP strategy: contiguous owners, no copies (planner lpt_spill with its
    copies refused), CPU device-default machine numbers (gate on) or none (gate off)."""
    shape = shape or ExpertShape()
    gbps, _, tflops = DEVICE_DEFAULTS["cpu"]
    cost = CopyCost(chunk_bytes=3 * shape.d_model * shape.d_ffn * 4, bytes_per_s=gbps * 1e9, flops_per_s=tflops * 1e12,
                    flops_per_slot=expert_flops_per_slot(shape.d_model, shape.d_ffn)) if gate else None
    s = SimpleNamespace(fcfg=SimpleNamespace(planner="lpt_spill", reshard_every=every, reshard_early=early), cost=cost,
                        topo=Topology(ranks, ranks), info=SimpleNamespace(world=ranks), num_layers=num_layers,
                        tracker=LoadTracker(num_layers, num_experts, window), reshards_gated=0)
    s._plan = lambda fit, owners, judge: (LayerPlacement.from_owners(owners), False)
    set_owners(s, [initial_owners(num_experts, ranks) for _ in range(num_layers)])
    return s


def set_owners(s: SimpleNamespace, owners: list[list[int]]) -> None:
    """Move the stand-in's ownership (placements without copies follow)."""
    s.owners, s.placements = owners, [LayerPlacement.from_owners(o) for o in owners]


def replay_runtime(loads: torch.Tensor, ranks: int, every: int, window: int, early: bool, lo: int, hi: int
                   ) -> tuple[float, int]:
    """The runtime's re-shard decisions replayed: mean imbalance over layers and steps lo..hi-1, re-shards made."""
    _, layers, experts = loads.shape  # [steps, L, E]
    s, shape = stand_in_strategy(layers, experts, ranks, every, window, early=early), ExpertShape()
    vals, moves = [], 0
    for t in range(hi):
        if t >= lo:
            vals += [imbalance(loads[t, li], s.owners[li], ranks) for li in range(layers)]
        s.tracker.update(loads[t])
        new, _ = fssdp_reshard.target_after_step(s, t, shape)  # as FSSDP.after_step decides
        if new is not None:
            set_owners(s, new)
            moves += 1
    return sum(vals) / len(vals), moves


def early_check_ms(experts: int, ranks: int, layers: int, ranks_per_node: int, moved: bool) -> tuple[float, bool]:
    """Host time of one `early_target` call at a scale (Zipf(1.2) over a random expert order, 8192 slots per
    layer, contiguous owners): the hot set unchanged for two steps (`moved` False: the check runs to the end
    and re-shards) or moved between them (the held-out judgement refuses). Returns (ms, re-sharded)."""
    s = stand_in_strategy(layers, experts, ranks, every=5, window=5)
    s.topo = Topology(ranks, ranks_per_node)
    share = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.2

    def step(seed: int) -> torch.Tensor:  # [L, E]
        g = torch.Generator().manual_seed(seed)
        return torch.stack([(8192 * share / share.sum())[torch.randperm(experts, generator=g)] for _ in range(layers)])

    s.tracker.update(step(1))
    s.tracker.update(step(2 if moved else 1))
    t0 = time.perf_counter()
    new = fssdp_reshard.early_target(s, ExpertShape())
    return 1000 * (time.perf_counter() - t0), new is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="aux_on", help="a name under benchmarks/traces")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--every", type=int, default=5, help="steps between re-placements (reshard_every)")
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 3, 5, 10])
    ap.add_argument("--ranges", nargs="+", default=["5-19", "5-99"], help="step ranges, inclusive")
    ap.add_argument("--check-cost", action="store_true", help="time the early re-shard check at larger scales")
    args = ap.parse_args()
    if args.check_cost:
        print("| experts | ranks | nodes | MoE layers | check ms, hot set kept (re-shards) | check ms, hot set moved |")
        print("|---|---|---|---|---|---|")
        for e, r, layers in ((16, 2, 2), (64, 8, 8), (128, 32, 16), (256, 64, 16)):
            per_node = min(r, 8)
            (kept, fired), (moved, _) = (early_check_ms(e, r, layers, per_node, m) for m in (False, True))
            print(f"| {e} | {r} | {r // per_node} | {layers} | {kept:.1f} ({fired}) | {moved:.1f} |")
        return
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
    print(f"\n# the runtime's re-shard decisions (fssdp_reshard), every {args.every} steps, CPU machine numbers: "
          "imbalance over the range (re-shards from step 0 to its end)")
    print("| steps | " + " | ".join(f"w={w} | w={w} + early" for w in args.windows) + " |")
    print("|---|" + "---|---|" * len(args.windows))
    for rng in args.ranges:
        lo, hi = (int(x) for x in rng.split("-"))
        hi = min(hi + 1, loads.shape[0])
        cells = [replay_runtime(loads, args.ranks, args.every, w, early, lo, hi)
                 for w in args.windows for early in (False, True)]
        print(f"| {lo}-{hi - 1} | " + " | ".join(f"{m:.3f} ({n})" for m, n in cells) + " |")


if __name__ == "__main__":
    main()
