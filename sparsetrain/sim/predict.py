"""Predict one training step: compute per rank, each collective, overlap, latency; memory per rank; bytes per link.

Placement decisions come from the runtime itself: `parallel.planners` (the configured planner, on the
loads the runtime's tracker would hold), `placement.initial_owners`, and the dispatch rule of
`parallel.routing` (own rank > own node > remote, split evenly). Formulas: docs/simulator.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sparsetrain.parallel.copy_cost import (
    CopyCost,
    attention_flops_per_token,
    copies_can_pay,
    expert_flops_per_slot,
    gate_copies,
    overlap_budget_from_model,
)
from sparsetrain.parallel.placement import LayerPlacement, initial_owners
from sparsetrain.parallel.planners import get_planner
from sparsetrain.parallel.topology import Topology
from sparsetrain.sim.cluster import Cluster
from sparsetrain.sim.shape import SimSetup
from sparsetrain.sim.traffic import Traffic, dispatch_matrix, ring_time, spag_matrix

MAX_WORLD = 8192  # GPUs one prediction may simulate (memory of its [world, world] matrices)
STATE_BYTES = 16  # per owned parameter: fp32 param + fp32 grad + Adam m, v
ATTN_ACT_VALUES = 16  # saved activation values per token per block, in units of d_model (estimate)


@dataclass
class Prediction:
    """One simulated step; times in seconds, bytes per step."""

    world: int
    strategy: str
    step_time_s: float
    compute_s: float  # the step's critical-path compute (slowest rank per layer)
    a2a_s: float
    spag_s: float  # forward gathers + backward re-gathers (total, before overlap)
    sprs_s: float
    dense_comm_s: float  # FSDP all-gathers / reduce-scatters or DDP all-reduce (before overlap)
    exposed_comm_s: float  # what overlap could not hide (spAG/spRS/dense)
    latency_s: float  # latency terms inside the collective times
    optimizer_s: float
    tokens_per_s: float
    mfu: float
    token_imbalance: float  # max/mean routed slots per rank, mean over layers
    mem_per_rank_gib: float  # the fullest rank
    intra_bytes_per_rank: float  # the busiest rank's bytes sent inside its node, per step
    inter_bytes_per_rank: float  # ... and across nodes
    overlap_budget: int

    def row(self) -> dict[str, float]:
        """A flat dict for tables and JSON."""
        return asdict(self)


def topology(world: int, c: Cluster) -> Topology:
    """World ranks on nodes of the cluster's GPUs per node (one node when world is smaller)."""
    rpn = min(world, c.gpus_per_node)
    if world % rpn:
        raise ValueError(f"{world} GPUs do not fill nodes of {c.gpus_per_node} ({c.name}); use a multiple")
    return Topology(world, rpn)


def ep_group_size(s: SimSetup, world: int) -> int:
    """Expert-parallel group: the configured ep_size, else the largest divisor of world dividing num_experts."""
    if s.ep_size:
        return s.ep_size
    return max(d for d in range(1, world + 1) if world % d == 0 and s.num_experts % d == 0)


def placements(s: SimSetup, world: int, topo: Topology, loads: torch.Tensor, budget: int,
               cost: CopyCost | None = None) -> list[LayerPlacement]:
    """Per MoE layer, the runtime's placement for token counts `loads` [L, E] on fresh owners: the planner's
    proposal, kept only where the copy cost gate (`copy_cost`, with `cost`) says the copies pay, as FSSDP does."""
    if s.strategy == "ep":
        ep = ep_group_size(s, world)
        return [LayerPlacement.from_owners(initial_owners(s.num_experts, ep))] * s.n_moe
    planner = get_planner(s.planner)
    owners = initial_owners(s.num_experts, world)
    memo: dict[tuple[float, ...], LayerPlacement] = {}  # planners are pure: equal loads, equal placement
    for li in range(s.n_moe):
        key = tuple(loads[li].tolist())
        if key in memo:
            continue
        if cost is not None and not copies_can_pay(loads[li], tuple(owners), topo, cost):
            memo[key] = LayerPlacement.from_owners(owners)  # the runtime skips planning here
            continue
        p = planner(loads[li], owners, topo, s.slots_per_rank, budget)
        memo[key] = gate_copies(loads[li], p, topo, cost) if cost is not None else p
    return [memo[tuple(loads[li].tolist())] for li in range(s.n_moe)]


def gate_numbers(s: SimSetup, c: Cluster, topo: Topology) -> tuple[float, float]:
    """(bytes/s, FLOP/s) FSSDP's overlap budget and copy cost gate hold at set-up, as `fssdp_machine.set_machine_numbers`
    picks them: the configured numbers, the device defaults when 0, what it would measure (this cluster's link
    when link_GBps is -1, its achievable FLOP/s when expert_TFLOPs is -1); the placement then follows the runtime's decision, right or wrong for the cluster."""
    from sparsetrain.parallel.copy_cost import DEVICE_DEFAULTS

    intra, inter, tflops = DEVICE_DEFAULTS[c.device]
    if s.link_GBps < 0:
        bw = c.inter_node_Bps if topo.num_nodes > 1 else c.intra_node_Bps
    else:
        bw = 1e9 * (s.link_GBps or (inter if topo.num_nodes > 1 else intra))
    flops = c.achievable_flops if s.expert_TFLOPs < 0 else 1e12 * (s.expert_TFLOPs or tflops)
    return bw, flops


def predict(s: SimSetup, c: Cluster, world: int, shares: torch.Tensor) -> Prediction:
    """Simulate one step of setup `s` on `world` ranks of cluster `c`; `shares` [n_moe, E] expert token shares."""
    if tuple(shares.shape) != (s.n_moe, s.num_experts):
        raise ValueError(f"shares must be [{s.n_moe}, {s.num_experts}] (MoE layers, experts), got {tuple(shares.shape)}")
    if s.batch_size % world and s.batch_size < world:
        raise ValueError(f"batch_size={s.batch_size} sequences cannot feed {world} ranks")
    if world > MAX_WORLD:
        raise ValueError(f"{world} GPUs: the simulator keeps [world, world] traffic matrices (float64); at most "
                         f"{MAX_WORLD} GPUs ({8 * MAX_WORLD ** 2 / 2**30:.1f} GiB per matrix)")
    if s.strategy == "ep" and s.ep_size and (s.ep_size > world or world % s.ep_size):
        raise ValueError(f"parallel.ep_size={s.ep_size} does not divide {world} GPUs")
    topo = topology(world, c)
    tokens_rank = s.tokens / world
    slots_rank = tokens_rank * s.top_k
    share = c.rank_share(world)  # a CPU host's ranks may share cores
    flops_rate = c.achievable_flops * share  # wall-clock rate
    overhead = c.layer_overhead_s / share
    attn_fwd = tokens_rank * s.attn_fwd_flops() / flops_rate + overhead  # per block
    other_fwd = tokens_rank * s.other_fwd_flops() / flops_rate
    bwd = c.bwd_fwd_ratio
    chunk_bytes = s.expert_params * s.act_bytes  # spAG moves chunks in the compute dtype
    budget = s.overlap_budget
    gate_bw, gate_flops = gate_numbers(s, c, topo)
    if s.strategy == "fssdp" and budget < 0:  # the runtime's set-up rule, with the numbers it would hold
        budget = overlap_budget_from_model(tokens_rank * attention_flops_per_token(s.d_model, s.seq_len),
                                           gate_flops, gate_bw, chunk_bytes, s.num_experts)
    cost = None
    if s.strategy == "fssdp" and s.cost_gate:
        cost = CopyCost(chunk_bytes, expert_flops_per_slot(s.d_model, s.d_ffn), gate_flops, gate_bw,
                        2 if s.keep_materialized else 3, budget)
    # per-layer placement, routed slots per rank and the all-to-all
    if s.strategy == "dp":
        places: list[LayerPlacement] = []
        group, gtopo = 1, Topology(1, 1)
    elif s.strategy == "ep":
        group = ep_group_size(s, world)
        gtopo = Topology(group, min(group, topo.ranks_per_node))
        places = placements(s, world, topo, shares, budget)
    else:
        group, gtopo = world, topo
        places = placements(s, world, topo, shares * slots_rank * world, budget, cost)
    compute = a2a = spag = sprs = latency = exposed = 0.0
    imbalance, intra_b, inter_b = [], torch.zeros(world), torch.zeros(world)
    copies_per_layer = []
    cache: dict = {}
    slot_bytes = s.d_model * s.act_bytes
    for li in range(s.n_moe):
        if s.strategy == "dp":
            rank_slots = torch.full((1,), slots_rank, dtype=torch.float64)
            t_a2a = 0.0
        else:
            key = (places[li], tuple(shares[li].tolist()))
            if key not in cache:  # layers with the same loads and placement route the same way
                flow = dispatch_matrix(slots_rank, shares[li], places[li], gtopo)
                cache[key] = flow.sum(0), Traffic.from_matrix(flow * slot_bytes, gtopo), float(flow.diagonal().min())
            rank_slots, tr, own = cache[key]  # [group] slots computed per rank; the exchange; fewest own slots
            t_one = tr.time(c) + slots_rank * c.dispatch_s_per_slot  # the transfer + sorting the rank's slots
            t_a2a = 4 * t_one  # dispatch + combine, forward + backward
            if s.a2a_overlap:  # own slots run while the dispatch travels, their backward while its reverse does
                own_fwd = own * s.expert_fwd_flops() / flops_rate
                t_a2a -= min(t_one, own_fwd) + min(t_one, bwd * own_fwd)
            counts_lat = (gtopo.ranks_per_node - 1) * c.intra_node_latency_s + \
                (group - gtopo.ranks_per_node) * c.inter_node_latency_s  # the count exchange (E numbers per peer)
            t_a2a += counts_lat
            latency += 4 * tr.latency_part(c) + counts_lat
            reps = world // group
            intra_b += 4 * tr.send_intra.repeat(reps)
            inter_b += 4 * tr.send_inter.repeat(reps)
        imbalance.append(float(rank_slots.max() / rank_slots.mean().clamp_min(1e-12)))
        expert_fwd = float(rank_slots.max()) * s.expert_fwd_flops() / flops_rate + overhead
        compute += (1 + bwd) * expert_fwd
        a2a += t_a2a
        if s.strategy == "fssdp":
            if places[li] not in cache:
                cache[places[li]] = Traffic.from_matrix(spag_matrix(places[li], world, chunk_bytes), topo)
            ag = cache[places[li]]
            rs = ag.reversed().scaled(4 / s.act_bytes)  # fp32 gradients travel home
            t_ag, t_rs = ag.time(c), rs.time(c)
            gathers = 1 if s.keep_materialized else 2
            spag += gathers * t_ag
            sprs += t_rs
            latency += gathers * ag.latency_part(c) + rs.latency_part(c)
            intra_b += gathers * ag.send_intra + rs.send_intra
            inter_b += gathers * ag.send_inter + rs.send_inter
            overlap_bwd = s.sprs_post == "backward" or (s.sprs_post == "auto" and c.device == "cuda")
            exposed += max(0.0, t_ag - attn_fwd)  # prefetched behind the attention before the layer
            bwd_comm = (gathers - 1) * t_ag + t_rs
            exposed += max(0.0, bwd_comm - bwd * attn_fwd) if overlap_bwd else bwd_comm
            copies_per_layer.append(places[li].extra_count(world))
    compute += s.n_layers * (1 + bwd) * attn_fwd + (1 + bwd) * other_fwd
    # dense parameters (and EP replicas' expert grads): overlapped with compute, the excess is exposed
    expert_total = s.n_moe * s.num_experts * s.expert_params
    # dp shards (fsdp2) or replicates (ddp) the experts with the dense parameters, as the runtime's DataParallel
    sharded = s.dense_params + (expert_total if s.strategy == "dp" else 0)
    if s.dense == "ddp":
        dense_comm = 2 * ring_time(sharded * 4, world, topo, c)  # all-reduce = reduce-scatter + all-gather
        params_local = sharded
    else:
        dense_comm = 3 * ring_time(sharded * s.act_bytes, world, topo, c)  # AG fwd, AG bwd, RS
        params_local = sharded / world
    if s.strategy == "ep":
        replicas = world // group
        dense_comm += 2 * ring_time(expert_total / group * 4, replicas, topo, c) if replicas > 1 else 0.0
        params_local += expert_total / group
    elif s.strategy == "fssdp":
        owned = max(initial_owners(s.num_experts, world).count(r) for r in range(world))
        params_local += owned * s.n_moe * s.expert_params
    exposed += max(0.0, dense_comm - compute)
    if c.optimizer_s_per_param > 0:
        optimizer = params_local * c.optimizer_s_per_param / share
    else:
        optimizer = params_local * STATE_BYTES * 2 / c.hbm_Bps if c.hbm_Bps > 0 else 0.0
    step = compute + a2a + exposed + optimizer + c.step_overhead_s
    # memory of the fullest rank
    act = tokens_rank * s.d_model * s.act_bytes * ATTN_ACT_VALUES * s.n_layers
    act += slots_rank * max(imbalance or [1.0]) * s.n_moe * s.act_bytes * (2 * s.d_model + 3 * s.d_ffn)
    copies = 0.0
    if copies_per_layer:
        per_rank = torch.tensor(copies_per_layer, dtype=torch.float64)  # [L, world]
        live = per_rank.sum(0) if s.keep_materialized else (per_rank[:-1] + per_rank[1:]).max(0).values \
            if per_rank.shape[0] > 1 else per_rank[0]
        copies = float(live.max()) * s.expert_params * (s.act_bytes + 4)  # weights + their fp32 grads
    mem = params_local * STATE_BYTES + copies + act
    return Prediction(
        world=world, strategy=s.strategy, step_time_s=step, compute_s=compute, a2a_s=a2a, spag_s=spag, sprs_s=sprs,
        dense_comm_s=dense_comm, exposed_comm_s=exposed, latency_s=latency, optimizer_s=optimizer,
        tokens_per_s=s.tokens / step, mfu=s.model_flops_per_step() / (world * c.peak_flops * step),
        token_imbalance=sum(imbalance) / len(imbalance) if imbalance else 1.0, mem_per_rank_gib=mem / 2**30,
        intra_bytes_per_rank=float(intra_b.max()), inter_bytes_per_rank=float(inter_b.max()),
        overlap_budget=budget if s.strategy == "fssdp" else 0)
