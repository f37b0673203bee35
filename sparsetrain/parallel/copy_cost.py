"""Copy cost gate: keep a layer's expert copies only when the compute they save beats the bytes they move.

A planner proposes P1 from predicted loads; copies balance the expert compute but every copy costs a
gather (spAG), a backward re-gather (unless `keep_materialized`) and a gradient reduce-scatter (spRS).
Per layer, with rank loads predicted by the dispatch rule (`routing.rank_loads`):

    gain_s = mean_t (max_r load_P0[t, r] - max_r load_P1[t, r]) * flops_per_slot / flops_per_s
    cost_s = (max(0, n - t) + (passes - 1) * n) * chunk_bytes / bytes_per_s

where n is the busiest rank's chunk transfers (copies it receives, or sends as an owner, whichever is
larger), t the overlap budget (forward gathers hidden under attention) and `passes` the transfers per
copy per step. When gain_s <= cost_s the layer keeps P1 = P0: no spAG, no spRS, EP's work. The gain is
judged on each of the tracker's recent steps (t), not on their mean: every step waits for its own busiest
rank, so loads that move from step to step around a balanced mean (aux loss on) gain far less from copies
than their mean's imbalance promises.

Re-sharding ownership (`fssdp.reshard_every`) is gated the same way (`reshard_pays`): the expert time the
new owners save per step (each layer's busiest-rank load on each recent step, plus its copies' transfers,
under the placement the planner then produces) times the steps until the next re-shard must beat the seconds its moves take (the
busiest rank's moved experts over all layers, params + Adam state, over the same link).

The machine numbers are fixed per run (config, or a device default, or one measurement at set-up), never
re-timed during training, so the placement is a deterministic function of the seed and config.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparsetrain.model.experts import EXPERT_WEIGHTS, GroupedExperts
from sparsetrain.parallel.placement import LayerPlacement
from sparsetrain.parallel.routing import rank_loads
from sparsetrain.parallel.topology import Topology

__all__ = ["DEVICE_DEFAULTS", "CopyCost", "attention_flops_per_token", "copies_can_pay", "expert_flops_per_slot",
           "gate_copies", "measure_expert_flops", "overlap_budget_from_model", "placement_time_s", "reshard_cost_s",
           "reshard_net_s", "reshard_pays"]

# (link GB/s per rank within a node, across nodes, expert TFLOP/s per rank). CPU: the 2-core dev machine (gloo
# loopback, one thread per rank) as `benchmarks/calibrate_copy_cost.py` measures it at the benchmark shape
# (0.417 GB/s spAG, 0.110 TFLOP/s expert forward + backward; benchmarks/RESULTS.md "Copies without the owner's
# chunks"). In training, copies cost 0.38-0.78 GB/s effective and experts ran at ~0.10 TFLOP/s (same section):
# the probe sits inside that range. (Before copies left the owner's chunks alone, each copied layer also copied
# every owned chunk several times, and the fit was the all-to-all link of the simulator's calibration, 0.137
# GB/s and 0.049 TFLOP/s.) CUDA: an H100-class node (NVLink within, 400 Gb/s NICs across), as in
# sparsetrain.sim.costmodel.
DEVICE_DEFAULTS: dict[str, tuple[float, float, float]] = {
    "cpu": (0.42, 0.42, 0.11),
    "cuda": (300.0, 50.0, 400.0),
}


def expert_flops_per_slot(d_model: int, d_ffn: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one routed slot in one SwiGLU expert."""
    return 3.0 * 2.0 * 3 * d_model * d_ffn


def measure_expert_flops(experts: GroupedExperts, slots: int, dtype: torch.dtype, reps: int = 3,
                         device: torch.device | None = None) -> float:
    """This rank's expert training throughput (FLOP/s): the best of `reps` timed forward + backward passes of
    its own experts (compute path and weight transform included) over `slots` routed slots split evenly, on
    `device` (default: the experts'; strategies measure before the model leaves the meta device, so they pass
    the rank's device). Runs on constant-filled copies of the weights: draws no random numbers and leaves the
    parameters alone."""
    n = max(1, experts.w1.shape[0])
    device = torch.device(device) if device is not None else experts.w1.device
    if device.type == "meta":
        raise ValueError("measure_expert_flops needs a real device: the experts are on meta, pass the rank's device")
    ws = {w: torch.full((n, *getattr(experts, w).shape[1:]), 0.02, dtype=dtype, device=device, requires_grad=True)
          for w in EXPERT_WEIGHTS}  # [n, out, in] each
    x = torch.full((slots, experts.d_model), 0.1, dtype=dtype, device=device, requires_grad=True)  # [N, d]
    counts = [slots // n + (i < slots % n) for i in range(n)]
    ids = list(range(n))
    best = math.inf
    for i in range(reps + 1):  # the first pass warms up the allocator and kernels
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        experts(x, counts, ids, stacked=ws).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return slots * expert_flops_per_slot(experts.d_model, experts.d_ffn) / max(best, 1e-9)


def attention_flops_per_token(d_model: int, seq_len: int) -> float:
    """Forward FLOPs of one token in one attention block (Q, K, V, O projections + scores)."""
    return 2.0 * 4 * d_model * d_model + 4.0 * seq_len * d_model


def overlap_budget_from_model(attn_flops: float, flops_per_s: float, bytes_per_s: float,
                              chunk_bytes: int, num_experts: int) -> int:
    """Chunks gatherable while a block's attention runs: floor(attention time * bandwidth / chunk bytes)."""
    if flops_per_s <= 0 or bytes_per_s <= 0 or chunk_bytes <= 0:
        raise ValueError(f"flops_per_s, bytes_per_s and chunk_bytes must be > 0, got "
                         f"{flops_per_s}, {bytes_per_s}, {chunk_bytes}")
    return min(num_experts, math.floor(attn_flops / flops_per_s * bytes_per_s / chunk_bytes + 1e-9))


@dataclass(frozen=True)
class CopyCost:
    """The numbers the gate needs; identical on every rank."""

    chunk_bytes: int  # one expert's weights as spAG moves them
    flops_per_slot: float  # training FLOPs of one routed slot in one expert
    flops_per_s: float  # expert GEMM throughput per rank
    bytes_per_s: float  # spAG/spRS bandwidth per rank
    passes: int = 3  # transfers per copy per step: spAG, backward re-gather (unless kept), spRS
    overlap_chunks: int = 0  # forward gathers hidden under attention (the overlap budget t)

    def compute_s(self, loads: torch.Tensor, p: LayerPlacement, topo: Topology) -> float:
        """Seconds of expert compute on the busiest rank under `p`. `loads` [E] (one predicted load), or [n, E]:
        the mean over steps of each step's busiest rank, since every step waits for its own busiest rank."""
        busiest = rank_loads(loads, p, topo).amax(dim=-1)  # [n] or scalar: busiest rank per step
        return float(busiest.mean()) * self.flops_per_slot / self.flops_per_s

    def gain_s(self, loads: torch.Tensor, p0: LayerPlacement, p1: LayerPlacement, topo: Topology) -> float:
        """Seconds of expert compute the copies take off the busiest rank (loads that move from step to step
        around a balanced mean gain far less than their mean's imbalance)."""
        return self.compute_s(loads, p0, topo) - self.compute_s(loads, p1, topo)

    def cost_s(self, p1: LayerPlacement, world: int) -> float:
        """Seconds the busiest rank spends moving the copies' chunks (exposed part of the forward gather)."""
        recv = p1.extra_count(world)
        send = [0] * world
        for e in range(p1.num_experts):
            send[p1.owners[e]] += len(p1.copies[e]) - 1
        n = max(max(a, b) for a, b in zip(recv, send))
        if n == 0:
            return 0.0
        chunks = max(0, n - self.overlap_chunks) + (self.passes - 1) * n
        return chunks * self.chunk_bytes / self.bytes_per_s


def copies_can_pay(loads: torch.Tensor, owners: tuple[int, ...], topo: Topology, cost: CopyCost) -> bool:
    """Cheap bound before planning: copies can at best bring the busiest rank down to the mean, and any
    copy moves at least one chunk `passes` times (less what the overlap hides)."""
    p0 = LayerPlacement.from_owners(owners)
    here = rank_loads(loads, p0, topo)  # [world], or [n, world] for n steps' loads
    best_gain = float((here.amax(dim=-1) - here.mean(dim=-1)).mean()) * cost.flops_per_slot / cost.flops_per_s
    least_cost = (max(0, 1 - cost.overlap_chunks) + cost.passes - 1) * cost.chunk_bytes / cost.bytes_per_s
    return best_gain > least_cost


def gate_copies(loads: torch.Tensor, p1: LayerPlacement, topo: Topology, cost: CopyCost) -> LayerPlacement:
    """P1 when its predicted gain beats its cost, else P0 (owners only)."""
    if all(len(c) == 1 for c in p1.copies):
        return p1
    p0 = LayerPlacement.from_owners(p1.owners)
    return p1 if cost.gain_s(loads, p0, p1, topo) > cost.cost_s(p1, topo.world) else p0


def placement_time_s(loads: torch.Tensor, p: LayerPlacement, topo: Topology, cost: CopyCost) -> float:
    """Predicted seconds of one layer's expert work per step under `p`: the busiest rank's compute (loads [E],
    or [n, E]: the mean over steps of each step's busiest rank) plus the exposed transfers of its copies."""
    return cost.compute_s(loads, p, topo) + cost.cost_s(p, topo.world)


def reshard_cost_s(old_owners: Sequence[Sequence[int]], new_owners: Sequence[Sequence[int]], world: int,
                   move_bytes: int, bytes_per_s: float) -> float:
    """Seconds a re-shard's transfers take: `reshard.move_ownership` posts every layer's moves in one batch, so
    it lasts as long as its busiest rank's moved experts over all layers (sent or received, whichever is more)
    x `move_bytes` (one expert's params + optimizer state)."""
    send, recv = [0] * world, [0] * world
    for old, new in zip(old_owners, new_owners):
        for a, b in zip(old, new):
            if a != b:
                send[a] += 1
                recv[b] += 1
    moves = max((max(s, r) for s, r in zip(send, recv)), default=0)
    return moves * move_bytes / bytes_per_s


def reshard_net_s(loads: torch.Tensor, before: Sequence[LayerPlacement], after: Sequence[LayerPlacement],
                  topo: Topology, cost: CopyCost, move_bytes: int, every: int) -> float:
    """Seconds a re-shard saves net of its moves: the expert time `after` saves over `before` (per layer, the
    placements planned on the old and new owners) in each of the `every` steps until the next re-shard, less
    the time its moves take. `loads`: [L, E], or the recent steps' [n, L, E] (judged step by step, as the
    copy gate: each step waits for its own busiest rank)."""
    gain = every * sum(placement_time_s(loads[..., li, :], b, topo, cost) -
                       placement_time_s(loads[..., li, :], a, topo, cost) for li, (b, a) in enumerate(zip(before, after)))
    return gain - reshard_cost_s([b.owners for b in before], [a.owners for a in after], topo.world, move_bytes,
                                 cost.bytes_per_s)


def reshard_pays(loads: torch.Tensor, before: Sequence[LayerPlacement], after: Sequence[LayerPlacement],
                 topo: Topology, cost: CopyCost, move_bytes: int, every: int) -> bool:
    """Whether the re-shard from `before` to `after` saves more expert time until the next one than its moves take."""
    return reshard_net_s(loads, before, after, topo, cost, move_bytes, every) > 0
