"""Expert placement data, load tracking and ownership re-sharding (pure functions, same result on every rank).

A placement for one MoE layer maps expert (chunk) -> ranks holding a copy this step (P1); the owners (P0)
hold the one persistent copy. See docs/placement.md. Planners (P0 + loads -> P1) live in `planners.py`, with
their registry `PLANNERS` / `get_planner`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sparsetrain.parallel.topology import Topology

__all__ = ["LayerPlacement", "LoadTracker", "balanced_owners", "initial_owners", "owned_load", "reshard_owners",
           "reshard_owners_min_moves"]


@dataclass(frozen=True)
class LayerPlacement:
    """One layer's ownership (P0: `owners[e]`) and materialization (P1: sorted `copies[e]`, owner included)."""

    owners: tuple[int, ...]
    copies: tuple[tuple[int, ...], ...]

    @classmethod
    def from_owners(cls, owners: Sequence[int]) -> LayerPlacement:
        """P1 = P0: every expert only on its owner."""
        return cls(tuple(int(o) for o in owners), tuple((int(o),) for o in owners))

    @classmethod
    def from_lists(cls, owners: Sequence[int], copies: Sequence[Sequence[int]]) -> LayerPlacement:
        """Build from lists; copies are sorted and de-duplicated, the owner is added if missing."""
        norm = tuple(tuple(sorted({int(r) for r in c} | {int(o)})) for o, c in zip(owners, copies))
        return cls(tuple(int(o) for o in owners), norm)

    @property
    def num_experts(self) -> int:
        """Number of experts (chunks) in the layer."""
        return len(self.owners)

    def materialized_on(self, rank: int) -> list[int]:
        """Experts whose copies include `rank`, ascending."""
        return [e for e, c in enumerate(self.copies) if rank in c]

    def owned_by(self, rank: int) -> list[int]:
        """Experts owned by `rank`, ascending."""
        return [e for e, o in enumerate(self.owners) if o == rank]

    def extra_copies(self, expert: int) -> list[int]:
        """Ranks holding a non-owner copy of `expert` (P1 \\ P0), ascending."""
        owner = self.owners[expert]
        return [r for r in self.copies[expert] if r != owner]

    def extra_count(self, world: int) -> list[int]:
        """Per rank, the number of non-owner copies it materializes."""
        counts = [0] * world
        for e in range(self.num_experts):
            for r in self.extra_copies(e):
                counts[r] += 1
        return counts

    def spag_bytes(self, chunk_bytes: int) -> int:
        """Bytes spAG moves: sum over chunks of |P1(c) \\ P0(c)| * chunk_bytes (spRS moves the same)."""
        return sum(len(c) - 1 for c in self.copies) * int(chunk_bytes)

    def validate(self, world: int | None = None) -> None:
        """Raise ValueError unless every owner is in its copies, copies are sorted/unique and ranks in range."""
        if len(self.owners) != len(self.copies):
            raise ValueError(f"owners has {len(self.owners)} experts but copies has {len(self.copies)}")
        for e, (o, c) in enumerate(zip(self.owners, self.copies)):
            if o not in c:
                raise ValueError(f"expert {e}: owner rank {o} not in copies {c}")
            if list(c) != sorted(set(c)):
                raise ValueError(f"expert {e}: copies {c} must be sorted without duplicates")
            lo = 0
            hi = world - 1 if world is not None else None
            for r in c:
                if r < lo or (hi is not None and r > hi):
                    raise ValueError(f"expert {e}: rank {r} out of range; allowed 0..{hi if hi is not None else 'inf'}")


def initial_owners(num_experts: int, world: int) -> list[int]:
    """Contiguous expert-parallel blocks: expert e -> rank e * world // num_experts."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    return [e * world // num_experts for e in range(num_experts)]


def balanced_owners(loads: torch.Tensor, world: int) -> list[list[int]]:
    """Best static expert-parallel placement for known mean loads [L, E]: E/world experts per rank per layer,
    longest-processing-time first, then the pair moves/swaps of `reshard_owners_min_moves` until none
    lowers a layer's most-loaded rank. Deterministic."""
    if loads.dim() != 2 or loads.shape[1] % world:
        raise ValueError(f"loads must be [layers, experts] with experts divisible by world={world}, "
                         f"got {tuple(loads.shape)}")
    per_rank = loads.shape[1] // world
    owners = []
    for row in loads.to(torch.float64).tolist():
        here, count, own = [0.0] * world, [0] * world, [0] * len(row)
        for e in sorted(range(len(row)), key=lambda e: (-row[e], e)):
            r = min((r for r in range(world) if count[r] < per_rank), key=lambda r: (here[r], r))
            own[e], here[r], count[r] = r, here[r] + row[e], count[r] + 1
        owners.append(own)
    return reshard_owners_min_moves(loads, owners, Topology(world, world), min_gain=1e-9)


def check_plan_inputs(loads: torch.Tensor, owners: Sequence[int], topo: Topology, slots_per_rank: int) -> list[float]:
    """Validate planner inputs; return the loads as Python floats (deterministic arithmetic)."""
    if loads.dim() != 1:
        raise ValueError(f"loads must be a 1-D tensor [num_experts], got shape {tuple(loads.shape)}")
    if loads.numel() != len(owners):
        raise ValueError(f"loads has {loads.numel()} experts but owners has {len(owners)}")
    for e, o in enumerate(owners):
        if not 0 <= o < topo.world:
            raise ValueError(f"owners[{e}]={o} out of range; allowed 0..{topo.world - 1}")
    if slots_per_rank < 0:
        raise ValueError(f"slots_per_rank must be >= 0, got {slots_per_rank}")
    vals = [float(x) for x in loads.detach().to(torch.float64).cpu().tolist()]
    if any(not math.isfinite(x) or x < 0 for x in vals):
        raise ValueError(f"loads must be finite and >= 0, got {vals}")
    return vals


class LoadTracker:
    """Sliding mean of the last `window` steps' global per-layer, per-expert token counts."""

    def __init__(self, num_layers: int, num_experts: int, window: int = 5) -> None:
        if num_layers < 1 or num_experts < 1:
            raise ValueError(f"num_layers and num_experts must be >= 1, got {num_layers}, {num_experts}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.window = window
        self._buf = torch.zeros(window, num_layers, num_experts, dtype=torch.float64)  # ring of [L, E]
        self._seen = 0  # total updates so far

    def update(self, counts: torch.Tensor) -> None:
        """Record one step's all-reduced counts [num_layers, num_experts]."""
        shape = (self.num_layers, self.num_experts)
        if tuple(counts.shape) != shape:
            raise ValueError(f"counts must have shape {shape}, got {tuple(counts.shape)}")
        c = counts.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(c).all() or (c < 0).any():
            raise ValueError("counts must be finite and >= 0")
        self._buf[self._seen % self.window] = c
        self._seen += 1

    @property
    def steps_seen(self) -> int:
        """Number of updates recorded."""
        return self._seen

    def recent(self) -> torch.Tensor:
        """The last min(steps seen, window) steps' loads [n, num_layers, num_experts] float64, oldest first
        (one row of ones before data)."""
        if self._seen == 0:
            return torch.ones(1, self.num_layers, self.num_experts, dtype=torch.float64)
        n = min(self._seen, self.window)
        # oldest -> newest so the summation order is fixed regardless of the ring position
        return self._buf[[(self._seen - n + i) % self.window for i in range(n)]]

    def predicted(self) -> torch.Tensor:
        """Predicted load [num_layers, num_experts] float64: mean of the last `window` steps (ones before data)."""
        recent = self.recent()
        return recent.sum(dim=0) / recent.shape[0]  # [n, L, E] -> [L, E]

    def state_dict(self) -> dict[str, Any]:
        """State for checkpoints (exact resume)."""
        return {"window": self.window, "seen": self._seen, "buf": self._buf.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` (tensor or nested-list `buf`); the window and shape must match."""
        buf = torch.as_tensor(state["buf"], dtype=torch.float64)
        if int(state["window"]) != self.window or tuple(buf.shape) != tuple(self._buf.shape):
            raise ValueError(
                f"LoadTracker state has window={state['window']} buf={tuple(buf.shape)}, "
                f"expected window={self.window} buf={tuple(self._buf.shape)}"
            )
        self._buf = buf.detach().cpu().clone()
        self._seen = int(state["seen"])


def owned_load(loads: torch.Tensor, owners: Sequence[Sequence[int]], world: int,
               replicas: Sequence[LayerPlacement] | None = None) -> torch.Tensor:
    """Per-rank owned load [world] summed over layers; a replicated expert counts load / copies."""
    vals = loads.detach().to(torch.float64).cpu().tolist()
    out = [0.0] * world
    for layer, row in enumerate(owners):
        for e, o in enumerate(row):
            n = len(replicas[layer].copies[e]) if replicas is not None else 1
            out[o] += vals[layer][e] / n
    return torch.tensor(out, dtype=torch.float64)


def _copy_counts(replicas: Sequence[LayerPlacement] | None, num_layers: int, num_experts: int) -> list[list[int]]:
    """Copies per expert [L][E] (1 each without replicas): an expert's load is shared by its copies."""
    return [[len(replicas[layer].copies[e]) if replicas is not None else 1 for e in range(num_experts)]
            for layer in range(num_layers)]


def _check_reshard_inputs(loads: torch.Tensor, owners: Sequence[Sequence[int]],
                          replicas: Sequence[LayerPlacement] | None, chunk_slack: int) -> tuple[int, int]:
    """Shapes of a re-sharding call agree (loads [L, E], owners [L][E], replicas [L]); returns (L, E)."""
    if loads.dim() != 2:
        raise ValueError(f"loads must be 2-D [num_layers, num_experts], got shape {tuple(loads.shape)}")
    num_layers, num_experts = loads.shape
    if len(owners) != num_layers or any(len(row) != num_experts for row in owners):
        raise ValueError(f"owners must be {num_layers} lists of {num_experts} ranks to match loads")
    if replicas is not None and len(replicas) != num_layers:
        raise ValueError(f"replicas has {len(replicas)} layers, expected {num_layers}")
    if replicas is not None and any(p.num_experts != num_experts for p in replicas):
        raise ValueError(f"every replicas[layer] must cover {num_experts} experts, got "
                         f"{[p.num_experts for p in replicas]}")
    if chunk_slack < 0:
        raise ValueError(f"chunk_slack must be >= 0, got {chunk_slack}")
    return num_layers, num_experts


def reshard_owners(loads: torch.Tensor, owners: Sequence[Sequence[int]], topo: Topology,
                   replicas: Sequence[LayerPlacement] | None = None, chunk_slack: int = 1) -> list[list[int]]:
    """Heterogeneous re-sharding: new owners [L][E] so every rank's owned load summed over layers is even."""
    num_layers, num_experts = _check_reshard_inputs(loads, owners, replicas, chunk_slack)
    world = topo.world
    vals = [check_plan_inputs(loads[layer], owners[layer], topo, 0) for layer in range(num_layers)]
    ncopies = _copy_counts(replicas, num_layers, num_experts)
    layer_cap = math.ceil(num_experts / world) + chunk_slack  # owned chunks per rank per layer
    total_cap = math.ceil(num_layers * num_experts / world) + chunk_slack  # soft: relaxed if it blocks
    rank_load = [0.0] * world
    rank_chunks = [0] * world
    count = [[0] * world for _ in range(num_layers)]
    new = [[int(o) for o in row] for row in owners]
    movable: list[tuple[int, int]] = []
    for layer in range(num_layers):
        for e in range(num_experts):
            if ncopies[layer][e] >= world:  # fully replicated: every rank computes it anyway, it stays put
                o = new[layer][e]
                count[layer][o] += 1
                rank_chunks[o] += 1
                rank_load[o] += vals[layer][e] / ncopies[layer][e]
            else:
                movable.append((layer, e))
    # longest-processing-time first over all layers: heaviest per-copy load first, ties by (layer, expert)
    movable.sort(key=lambda le: (-vals[le[0]][le[1]] / ncopies[le[0]][le[1]], le))
    for layer, e in movable:
        target = _pick_owner(new[layer][e], count[layer], rank_load, rank_chunks, layer_cap, total_cap, topo)
        new[layer][e] = target
        count[layer][target] += 1
        rank_chunks[target] += 1
        rank_load[target] += vals[layer][e] / ncopies[layer][e]
    return new


def _pick_owner(current: int, count: list[int], rank_load: list[float], rank_chunks: list[int],
                layer_cap: int, total_cap: int, topo: Topology) -> int:
    """Least-loaded node, then least-loaded rank in it, among ranks with room; ties keep `current`, then index."""
    for respect_total in (True, False):
        ok = [r for r in range(topo.world)
              if count[r] < layer_cap and (not respect_total or rank_chunks[r] < total_cap)]
        if not ok:
            continue
        nodes = sorted({topo.node_of(r) for r in ok})
        node_load = {n: sum(rank_load[r] for r in topo.ranks_of_node(n)) for n in nodes}
        best_node = min(nodes, key=lambda n: (node_load[n], n != topo.node_of(current), n))
        cand = [r for r in ok if topo.node_of(r) == best_node]
        return min(cand, key=lambda r: (rank_load[r], r != current, r))
    raise AssertionError("no rank has room; layer_cap * world < num_experts cannot happen")


def reshard_owners_min_moves(loads: torch.Tensor, owners: Sequence[Sequence[int]], topo: Topology,
                             replicas: Sequence[LayerPlacement] | None = None, chunk_slack: int = 0,
                             min_gain: float = 0.02) -> list[list[int]]:
    """Re-sharding by few moves: per layer, from the current owners, repeatedly move one expert off the
    most-loaded rank, or swap it with a lighter expert of another rank, choosing the exchange that lowers
    that pair's peak the most; stop when no exchange lowers it by `min_gain` x the layer's mean rank load.

    Each layer's expert compute is synchronous, so per-layer balance decides the step time. An expert's
    load counts `load / |copies|` when `replicas` is given. A rank owns at most ceil(E/world) + chunk_slack
    chunks per layer (chunk_slack=0: persistent memory equals EP's, so only swaps when E % world == 0).
    Ties: fewer chunks moved, then the least-loaded node, then lower indices. Deterministic.
    Rebuilding the assignment from scratch (longest-processing-time first) balanced as well but moved
    about half of the experts at every re-shard on noisy loads; this moves only what pays.
    """
    num_layers, num_experts = _check_reshard_inputs(loads, owners, replicas, chunk_slack)
    world = topo.world
    cap = math.ceil(num_experts / world) + chunk_slack
    ncopies = _copy_counts(replicas, num_layers, num_experts)
    new: list[list[int]] = []
    for layer in range(num_layers):
        vals = check_plan_inputs(loads[layer], owners[layer], topo, 0)
        ncop = ncopies[layer]
        share = [vals[e] / ncop[e] for e in range(num_experts)]
        row = [int(o) for o in owners[layer]]
        movable = [e for e in range(num_experts) if ncop[e] < world]  # copied everywhere: stays put
        here = [0.0] * world
        for e in range(num_experts):
            here[row[e]] += share[e]
        mean = sum(here) / world
        for _ in range(2 * num_experts):  # each exchange strictly lowers a peak: this bound is never the limit
            hot = min(range(world), key=lambda r: (-here[r], r))
            node_load = [sum(here[r] for r in topo.ranks_of_node(n)) for n in range(topo.num_nodes)]
            mine = [e for e in movable if row[e] == hot]
            best: tuple | None = None
            for cold in range(world):
                if cold == hot:
                    continue
                theirs = [e for e in movable if row[e] == cold]
                room = sum(1 for o in row if o == cold) < cap
                for a in mine:
                    options = ([(None, share[a])] if room else []) + \
                              [(b, share[a] - share[b]) for b in theirs if share[b] < share[a]]
                    for b, d in options:
                        peak = max(here[hot] - d, here[cold] + d)
                        key = (peak, b is not None, node_load[topo.node_of(cold)], here[cold], cold, a,
                               -1 if b is None else b)
                        if best is None or key < best[0]:
                            best = (key, cold, a, b, d)
            if best is None or here[hot] - best[0][0] < min_gain * mean:
                break
            _, cold, a, b, d = best
            row[a] = cold
            if b is not None:
                row[b] = hot
            here[hot] -= d
            here[cold] += d
        new.append(row)
    return new
