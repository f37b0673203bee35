"""Topology-aware replica choice for token dispatch (pure tensor functions, deterministic).

A routed slot for expert e goes to a copy of e on the source rank if there is one, else to a copy on the
source's node, else to a remote copy. Among the candidates of the best tier, slots are dealt round-robin in
slot order, starting at an offset of `src_rank`, so each candidate gets the same count up to one.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from sparsetrain.parallel.placement import LayerPlacement
from sparsetrain.parallel.topology import Topology

__all__ = ["candidate_table", "candidates", "choose_replicas", "copy_mask", "rank_loads", "share_matrix"]


def candidates(copies: tuple[int, ...], src_rank: int, topo: Topology) -> tuple[int, ...]:
    """Best tier of `copies` for `src_rank`: itself, else same node, else all (sorted); depends on the source
    only through whether it holds a copy and which node it is on (the simulator relies on this)."""
    if src_rank in copies:
        return (src_rank,)
    node = topo.node_of(src_rank)
    local = tuple(r for r in copies if topo.node_of(r) == node)
    return local if local else copies


def candidate_table(placement: LayerPlacement, topo: Topology, src_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table [E, max_candidates] of ranks, padded by repeating; counts [E]) for `src_rank`."""
    table, counts = _candidate_table(placement, topo, src_rank, "cpu")
    return table.clone(), counts.clone()


@lru_cache(maxsize=256)
def _candidate_table(placement: LayerPlacement, topo: Topology, src_rank: int,
                     device: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 <= src_rank < topo.world:
        raise ValueError(f"src_rank={src_rank} out of range; allowed 0..{topo.world - 1}")
    cands = [candidates(c, src_rank, topo) for c in placement.copies]
    width = max((len(c) for c in cands), default=1)
    table = torch.empty(len(cands), width, dtype=torch.long)
    for e, c in enumerate(cands):
        # rotate by src_rank so different sources start at different candidates
        rot = [c[(j + src_rank) % len(c)] for j in range(len(c))]
        table[e] = torch.tensor(rot + [rot[0]] * (width - len(c)), dtype=torch.long)
    counts = torch.tensor([len(c) for c in cands], dtype=torch.long)
    return table.to(device), counts.to(device)


def choose_replicas(expert_ids: torch.Tensor, src_rank: int, placement: LayerPlacement,
                    topo: Topology) -> torch.Tensor:
    """Target rank [S] for each routed slot's expert id [S]: local copy > same node > remote, split evenly."""
    if expert_ids.dim() != 1:
        raise ValueError(f"expert_ids must be 1-D [slots], got shape {tuple(expert_ids.shape)}")
    ids = expert_ids.detach().long()  # stays on its device; tables are cached per device
    num_experts = placement.num_experts
    if ids.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=ids.device)
    if ids.is_cuda:  # checked on the device: reading min/max back would cost two host syncs per layer
        torch._assert_async(((ids >= 0) & (ids < num_experts)).all(), f"expert ids must be in 0..{num_experts - 1}")
    elif int(ids.min()) < 0 or int(ids.max()) >= num_experts:
        raise ValueError(f"expert ids must be in 0..{num_experts - 1}, got range "
                         f"{int(ids.min())}..{int(ids.max())}")
    table, counts = _candidate_table(placement, topo, src_rank, str(ids.device))
    # occurrence index of each slot within its expert, in slot order
    order = torch.argsort(ids, stable=True)  # [S] slots grouped by expert
    per_expert = torch.bincount(ids, minlength=num_experts)  # [E]
    starts = torch.cumsum(per_expert, 0) - per_expert  # [E] first sorted position of each expert
    occ_sorted = torch.arange(ids.numel(), device=ids.device) - starts[ids[order]]  # [S] position within group
    occ = torch.empty_like(occ_sorted)
    occ[order] = occ_sorted
    col = occ % counts[ids]  # [S] round-robin column
    return table[ids, col]


def share_matrix(placement: LayerPlacement, topo: Topology) -> torch.Tensor:
    """M [E, world]: fraction of expert e's tokens landing on each rank when every rank sources 1/world."""
    return _share_matrix(placement, topo).clone()


def copy_mask(placement: LayerPlacement, world: int) -> torch.Tensor:
    """held [E, world] float64: 1 where a rank holds a copy of the expert."""
    held = torch.zeros(placement.num_experts, world, dtype=torch.float64)
    ei = [e for e, c in enumerate(placement.copies) for _ in c]
    held[ei, [r for c in placement.copies for r in c]] = 1.0
    return held


@lru_cache(maxsize=64)
def _share_matrix(placement: LayerPlacement, topo: Topology) -> torch.Tensor:
    # closed form of summing `candidates` over all sources (tests check it against that loop): a holder serves
    # itself; the non-holders of a node with copies split over those; sources on nodes without one over all
    held = copy_mask(placement, topo.world)  # [E, world]
    rpn = topo.ranks_per_node
    per_node = held.view(-1, topo.num_nodes, rpn).sum(2)  # [E, nodes] copies on each node
    local = torch.where(per_node > 0, (rpn - per_node) / per_node.clamp_min(1), torch.zeros_like(per_node))
    without = (per_node == 0).sum(1, keepdim=True).double() * rpn  # [E, 1] sources with no copy on their node
    m = held * (1.0 + local.repeat_interleave(rpn, dim=1) + without / held.sum(1, keepdim=True))
    return m / topo.world


def rank_loads(counts_per_expert: torch.Tensor, placement: LayerPlacement, topo: Topology) -> torch.Tensor:
    """Predicted tokens per rank [world] (float64) if each source holds 1/world of every expert's tokens;
    counts [n, E] (n steps' loads) give [n, world]."""
    if counts_per_expert.dim() not in (1, 2) or counts_per_expert.shape[-1] != placement.num_experts:
        raise ValueError(f"counts_per_expert must have shape [{placement.num_experts}] or "
                         f"[steps, {placement.num_experts}], got {tuple(counts_per_expert.shape)}")
    c = counts_per_expert.detach().to(device="cpu", dtype=torch.float64)
    return c @ _share_matrix(placement, topo)  # [..., E] @ [E, world] -> [..., world]
