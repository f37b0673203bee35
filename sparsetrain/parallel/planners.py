"""Placement planners: predicted loads + owners (P0) -> materialization (P1) for one MoE layer.

Every planner has the signature `plan(loads, owners, topo, slots_per_rank, overlap_budget) -> LayerPlacement`,
keeps each owner in its expert's copies, gives no rank more than `slots_per_rank` extra copies, and is a
deterministic function of its inputs (ties broken by index), so all ranks compute the same plan.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from sparsetrain.parallel.placement import LayerPlacement, check_plan_inputs
from sparsetrain.parallel.topology import Topology

Planner = Callable[[torch.Tensor, Sequence[int], Topology, int, int], LayerPlacement]

SPILL_THRESHOLD = 1.1  # lpt_spill acts only when max/mean rank load exceeds this


def _by_load_desc(vals: Sequence[float], experts: Sequence[int]) -> list[int]:
    """Experts sorted hottest first, ties by index."""
    return sorted(experts, key=lambda e: (-vals[e], e))


class _Builder:
    """Mutable copies + per-rank extra-slot accounting shared by the planners."""

    def __init__(self, owners: Sequence[int], topo: Topology, slots_per_rank: int) -> None:
        self.owners = [int(o) for o in owners]
        self.topo = topo
        self.m = slots_per_rank
        self.copies: list[set[int]] = [{o} for o in self.owners]
        self.extra = [0] * topo.world

    def can_add(self, e: int, r: int) -> bool:
        return r not in self.copies[e] and self.extra[r] < self.m

    def add(self, e: int, r: int) -> None:
        self.copies[e].add(r)
        self.extra[r] += 1

    def build(self) -> LayerPlacement:
        return LayerPlacement(tuple(self.owners), tuple(tuple(sorted(c)) for c in self.copies))


def plan_none(loads: torch.Tensor, owners: Sequence[int], topo: Topology, slots_per_rank: int,
              overlap_budget: int) -> LayerPlacement:
    """P1 = P0: plain sharded experts (expert-parallel layout)."""
    check_plan_inputs(loads, owners, topo, slots_per_rank)
    return LayerPlacement.from_owners(owners)


def _largest_remainder(vals: Sequence[float], total: int, caps: Sequence[int]) -> list[int]:
    """Split `total` integer units in proportion to `vals` (largest remainder), never above `caps`."""
    alloc = [0] * len(vals)
    active = [e for e in range(len(vals)) if caps[e] > 0 and vals[e] > 0]
    left = total
    while left > 0 and active:
        weight = sum(vals[e] for e in active)
        quota = {e: left * vals[e] / weight for e in active}
        give = {e: min(int(quota[e]), caps[e] - alloc[e]) for e in active}
        rest = left - sum(give.values())
        # hand the remainder to the largest fractional parts (ties: hotter, then lower index)
        order = sorted(active, key=lambda e: (-(quota[e] - int(quota[e])), -vals[e], e))
        for e in order:
            if rest == 0:
                break
            if alloc[e] + give[e] < caps[e]:
                give[e] += 1
                rest -= 1
        for e in active:
            alloc[e] += give[e]
        left = total - sum(alloc)
        active = [e for e in active if alloc[e] < caps[e]]
        if sum(give.values()) == 0:
            break
    return alloc


def _first_min(ok: np.ndarray, *keys: np.ndarray) -> int:
    """Lowest index among `ok` [world] minimizing `keys` [world] lexicographically (Python's `min` on tuples
    (key..., r), vectorized over ranks with numpy: planning 4096 ranks takes seconds, not minutes)."""
    for k in keys:
        ok = ok & (k == k[ok].min())
    return int(ok.argmax())


def _place_spread(b: _Builder, order: Sequence[int], want: Sequence[int], share: Sequence[float],
                  rank_load: list[float]) -> None:
    """Place `want[e]` extra copies per expert: fewest copies on the node first, then least-loaded rank."""
    topo = b.topo
    node = np.arange(topo.world) // topo.ranks_per_node  # [world] node of each rank
    load = np.array(rank_load, dtype=np.float64)  # same float64 sums as the lists had
    extra = np.array(b.extra)
    for e in order:
        held = np.zeros(topo.world, dtype=bool)
        held[list(b.copies[e])] = True
        per_node = np.bincount(node[held], minlength=topo.num_nodes)  # [nodes] copies of e per node
        for _ in range(want[e]):
            ok = ~held & (extra < b.m)  # b.can_add(e, r) for every r
            if not ok.any():
                break
            r = _first_min(ok, per_node[node], load)
            b.add(e, r)
            held[r], extra[r] = True, extra[r] + 1
            per_node[node[r]] += 1
            load[r] += share[e]
    rank_load[:] = load.tolist()


def plan_hecate(loads: torch.Tensor, owners: Sequence[int], topo: Topology, slots_per_rank: int,
                overlap_budget: int) -> LayerPlacement:
    """Hecate/FSSDP: t <= m -> top-t experts everywhere; else world*m slots to hot experts by load share."""
    vals = check_plan_inputs(loads, owners, topo, slots_per_rank)
    num_experts, world, m, t = len(vals), topo.world, slots_per_rank, overlap_budget
    b = _Builder(owners, topo, m)
    ranked = _by_load_desc(vals, range(num_experts))
    if t <= m:
        for e in ranked[: max(t, 0)]:
            for r in range(world):
                if r not in b.copies[e]:
                    b.add(e, r)
        return b.build()
    if sum(vals) <= 0:
        vals = [1.0] * num_experts
    want = _largest_remainder(vals, world * m, [world - 1] * num_experts)
    share = [vals[e] / (1 + want[e]) for e in range(num_experts)]  # predicted load per copy
    rank_load = [0.0] * world
    for e, o in enumerate(b.owners):
        rank_load[o] += share[e]
    _place_spread(b, [e for e in ranked if want[e] > 0], want, share, rank_load)
    return b.build()


def plan_eplb(loads: torch.Tensor, owners: Sequence[int], topo: Topology, slots_per_rank: int,
              overlap_budget: int) -> LayerPlacement:
    """DeepSeek-V3 hierarchical balancer on fixed owners: replicate hot experts within their owner's node."""
    vals = check_plan_inputs(loads, owners, topo, slots_per_rank)
    b = _Builder(owners, topo, slots_per_rank)
    rpn = topo.ranks_per_node
    for node in range(topo.num_nodes):
        ranks = topo.ranks_of_node(node)
        homed = [e for e, o in enumerate(b.owners) if topo.node_of(o) == node and vals[e] > 0]
        ncopies = {e: 1 for e in homed}
        # replicate: one more copy to the expert with the highest load per copy, until the node's slots run out
        for _ in range(rpn * slots_per_rank):
            room = [e for e in homed if ncopies[e] < rpn]
            if not room:
                break
            e = min(room, key=lambda e: (-vals[e] / ncopies[e], e))
            ncopies[e] += 1
        # pack: heaviest replica first onto the least-loaded rank of the node that has a free slot
        first = ranks[0]
        load = np.zeros(rpn, dtype=np.float64)  # [rpn] load of the node's ranks
        for e in homed:
            load[b.owners[e] - first] += vals[e] / ncopies[e]
        extra = np.array(b.extra[first:first + rpn])
        for e in sorted(homed, key=lambda e: (-vals[e] / ncopies[e], e)):
            held = np.zeros(rpn, dtype=bool)
            held[[r - first for r in b.copies[e]]] = True  # homed here: every copy is on this node
            for _ in range(ncopies[e] - 1):
                ok = ~held & (extra < slots_per_rank)  # b.can_add(e, r) for the node's ranks
                if not ok.any():
                    break
                i = _first_min(ok, load)
                b.add(e, first + i)
                held[i], extra[i] = True, extra[i] + 1
                load[i] += vals[e] / ncopies[e]
    return b.build()


def plan_lpt_spill(loads: torch.Tensor, owners: Sequence[int], topo: Topology, slots_per_rank: int,
                   overlap_budget: int) -> LayerPlacement:
    """Least-Loaded EP: if max/mean rank load > 1.1, spill the hottest rank's experts to least-loaded helpers."""
    vals = check_plan_inputs(loads, owners, topo, slots_per_rank)
    world = topo.world
    b = _Builder(owners, topo, slots_per_rank)
    rank_load = [0.0] * world
    for e, o in enumerate(b.owners):
        rank_load[o] += vals[e]
    mean = sum(rank_load) / world
    if mean <= 0 or max(rank_load) <= SPILL_THRESHOLD * mean:
        return b.build()
    load = np.array(rank_load, dtype=np.float64)  # [world], updated with the same float64 steps
    held = np.zeros((len(vals), world), dtype=bool)  # [E, world] ranks holding a copy
    held[list(range(len(vals))), list(b.owners)] = True
    extra = np.zeros(world, dtype=np.int64)
    everyone = np.ones(world, dtype=bool)
    for _ in range(world * slots_per_rank):
        hot = _first_min(everyone, -load)  # busiest rank, lowest index on ties
        if float(load[hot]) <= SPILL_THRESHOLD * mean:
            break
        mine = [e for e in np.flatnonzero(held[:, hot]).tolist() if vals[e] > 0]
        done = False
        # longest processing time first: the heaviest per-copy item goes to the least-loaded helper
        for e in sorted(mine, key=lambda e: (-vals[e] / len(b.copies[e]), e)):
            helpers = ~held[e] & (extra < slots_per_rank)  # b.can_add(e, r) for every r
            if not helpers.any():
                continue
            h = _first_min(helpers, load)
            n = len(b.copies[e])
            old, new = vals[e] / n, vals[e] / (n + 1)
            if float(load[h]) + new >= float(load[hot]):  # would not lower the peak
                continue
            load[held[e]] += new - old
            b.add(e, h)
            held[e, h], extra[h] = True, extra[h] + 1
            load[h] += new
            done = True
            break
        if not done:
            break
    return b.build()


PLANNERS: dict[str, Planner] = {
    "hecate": plan_hecate,
    "none": plan_none,
    "eplb": plan_eplb,
    "lpt_spill": plan_lpt_spill,
}


def get_planner(name: str) -> Planner:
    """Planner registered under `name`; ValueError lists the known names."""
    try:
        return PLANNERS[name]
    except KeyError:
        raise ValueError(f"unknown placement planner {name!r}; known: {sorted(PLANNERS)}") from None
