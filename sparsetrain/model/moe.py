"""MoE FFN layer: router -> Dispatcher (dispatch, local experts, combine)."""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from sparsetrain.model.experts import GroupedExperts
from sparsetrain.model.router import RouterOutput, TopKRouter
from sparsetrain.offload.saved import recomputing
from sparsetrain.telemetry.timers import span


class Dispatcher(Protocol):
    """Moves routed token slots to experts and back; strategies swap it, never the model."""

    def __call__(self, experts: GroupedExperts, x: torch.Tensor, route: RouterOutput) -> tuple[torch.Tensor, int]:
        """x [T, d] + routing -> (combined output [T, d], dropped slot count)."""
        ...


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat slot order grouping slots by expert (stable) and slots per expert [E]."""
    flat = expert_ids.flatten()  # [T*k]
    order = torch.argsort(flat, stable=True)  # [T*k]
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    return order, counts


def combine_slots(y_slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y_slots [T*k, d] in slot order, weights [T, k] -> [T, d] (same summation order everywhere)."""
    t, k = weights.shape
    return (y_slots.view(t, k, -1) * weights.unsqueeze(-1)).sum(dim=1)  # [T, k, d] -> [T, d]


def capacity_keep(expert_ids: torch.Tensor, scores: torch.Tensor | None, num_experts: int,
                  capacity: int) -> torch.Tensor:
    """Bool mask [T*k]: every first choice before any second choice (GShard/DeepSpeed); within a choice rank
    the higher gate score first (`scores` [T, k], the gate probabilities; ties: token order) or, with
    `scores=None`, token order (GShard's and DeepSpeed's `top2gating`); an expert keeps its first `capacity` slots.

    expert_ids [T, k] (column j = the token's (j+1)-th choice).
    """
    t, k = expert_ids.shape
    flat = expert_ids.flatten()  # [T*k] slot s = token s // k, choice s % k
    if scores is None:
        by_score = torch.arange(t * k, device=flat.device)  # [T*k] token order
    else:
        by_score = torch.argsort(-scores.detach().flatten().float(), stable=True)  # [T*k] score desc, token order
    choice = torch.arange(k, device=flat.device).repeat(t)  # [T*k]
    priority = by_score[torch.argsort(choice[by_score], stable=True)]  # [T*k] choice rank, then score
    one_hot = torch.nn.functional.one_hot(flat[priority], num_experts)  # [T*k, E] in priority order
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # [T*k] rank of slot within its expert
    keep = torch.empty_like(position, dtype=torch.bool)
    keep[priority] = position < capacity
    return keep


def expert_capacity(capacity_factor: float, tokens: int, top_k: int, num_experts: int) -> int:
    """Slots an expert may take: ceil(capacity_factor * tokens * top_k / num_experts)."""
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def capacity_weights(weights: torch.Tensor, keep: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """Combine weights [T, k] after drops: dropped slots 0; survivors rescaled to sum to 1 when `renormalize`
    (DeepSpeed/GShard top-2; a token with no surviving slot gets 0 everywhere)."""
    kept = keep.view_as(weights)  # [T, k]
    w = weights * kept.to(weights.dtype)
    if renormalize and weights.shape[1] > 1:
        lost = ~kept.all(dim=-1, keepdim=True)  # [T, 1] only tokens that lost a slot change (exact otherwise)
        w = torch.where(lost, w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny), w)
    return w


class LocalDispatcher:
    """Single-device dispatch: sort slots by expert, run each expert on its tokens, unsort, combine."""

    def __init__(self, capacity_factor: float = 0.0, capacity_renorm: bool = True,
                 capacity_priority: str = "score") -> None:
        self.capacity_factor, self.capacity_renorm = capacity_factor, capacity_renorm
        self.capacity_priority = capacity_priority

    def __call__(self, experts: GroupedExperts, x: torch.Tensor, route: RouterOutput) -> tuple[torch.Tensor, int]:
        t, k = route.expert_ids.shape
        ids = route.expert_ids
        dropped = 0
        keep = None
        weights = route.weights
        if self.capacity_factor > 0:
            cap = expert_capacity(self.capacity_factor, t, k, experts.num_experts)
            scores = route.gate_scores() if self.capacity_priority == "score" else None
            keep = capacity_keep(ids, scores, experts.num_experts, cap)  # [T*k]
            dropped = int((~keep).sum())
            weights = capacity_weights(weights, keep, self.capacity_renorm)
        with span("dispatch"):
            order, counts = sort_by_expert(ids, experts.num_experts)
            if keep is not None:
                order = order[keep[order]]  # dropped slots never reach an expert
                counts = torch.bincount(ids.flatten()[order], minlength=experts.num_experts)
            x_sorted = x[order // k]  # [S, d]
        with span("experts"):
            y_sorted = experts(x_sorted, counts.tolist())  # [S, d]
        with span("combine"):
            # the experts' dtype (bf16 from the grouped GEMM under autocast, with fp32 tokens in)
            y_slots = y_sorted.new_zeros(t * k, y_sorted.shape[-1]).index_copy(0, order, y_sorted)  # [T*k, d]
            return combine_slots(y_slots, weights), dropped


class MoELayer(nn.Module):
    """Router + grouped experts; the dispatcher decides where expert compute happens."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, d_ffn: int, **router_kw) -> None:
        super().__init__()
        capacity_factor = router_kw.pop("capacity_factor", 0.0)
        capacity_renorm = router_kw.pop("capacity_renorm", True)
        capacity_priority = router_kw.pop("capacity_priority", "score")
        self.router = TopKRouter(d_model, num_experts, top_k, **router_kw)
        self.router.local_aux = capacity_factor > 0  # aux fractions over the tokens capacity drops over
        self.experts = GroupedExperts(num_experts, d_model, d_ffn)
        self.dispatcher: Dispatcher = LocalDispatcher(capacity_factor, capacity_renorm, capacity_priority)
        self.last_route: RouterOutput | None = None
        self.last_dropped = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, d] -> [B, S, d]."""
        b, s, d = x.shape
        flat = x.reshape(b * s, d)  # [B, S, d] -> [T, d]
        route = self.router(flat, group=s)
        y, dropped = self.dispatcher(self.experts, flat, route)
        # a checkpoint replay keeps its own route out: it would pin the replay graph, whose saved tensors torch keeps
        # (retain_graph support), until the next forward: 36% of a block per layer with full checkpointing
        if not recomputing():
            self.last_route, self.last_dropped = route, dropped
        return y.view(b, s, d)  # [T, d] -> [B, S, d]
