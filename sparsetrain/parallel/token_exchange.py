"""Token dispatch/combine across ranks shared by EP and FSSDP: slots -> (rank, expert) -> back."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from sparsetrain.model.moe import capacity_keep, capacity_weights, combine_slots, expert_capacity
from sparsetrain.model.router import RouterOutput
from sparsetrain.parallel.all_to_all import all_to_all_uneven
from sparsetrain.parallel.comm import to_comm
from sparsetrain.telemetry.timers import span

ExpertFn = Callable[[torch.Tensor, list[int]], torch.Tensor]


def _exchange_count_matrix(c: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """c [world, E] slots this rank sends per (dest, expert) -> [world, E] slots received per (src, expert)."""
    send = to_comm(c, group).contiguous()
    out = torch.empty_like(send)
    dist.all_to_all_single(out.view(-1), send.view(-1), group=group)  # E numbers per peer
    return out.to(c.device)


def _wire_dtype(x: torch.Tensor) -> torch.dtype:
    """Tokens travel in the autocast dtype when autocast is on (bf16 runs), else in their own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def exchange_and_compute(x: torch.Tensor, route: RouterOutput, slot_rank: torch.Tensor, num_experts: int,
                         local_ids: list[int], expert_fn: ExpertFn, group: dist.ProcessGroup | None,
                         capacity_factor: float = 0.0,
                         capacity_renorm: bool = True,
                         capacity_priority: str = "score") -> tuple[torch.Tensor, int, torch.Tensor]:
    """Send each slot to `slot_rank`, run local experts grouped by expert, return combined [T, d].

    Capacity mode (capacity_factor > 0) drops over-capacity slots before they leave this rank, in GShard
    priority order over this rank's tokens (`capacity_keep`; `capacity_priority` score or token order within
    a choice rank), and renormalizes the survivors' weights.

    Returns (output [T, d], dropped slots, tokens computed per local expert [len(local_ids)]).
    """
    world = dist.get_world_size(group)
    t, k = route.expert_ids.shape
    d = x.shape[-1]
    flat_e = route.expert_ids.reshape(-1)  # [T*k]
    dropped = 0
    weights = route.weights
    with span("dispatch"):
        key = slot_rank * num_experts + flat_e  # [T*k] grouped by destination rank, then expert
        order = torch.argsort(key, stable=True)
        if capacity_factor > 0:  # GShard-style local capacity per expert on this rank's tokens
            cap = expert_capacity(capacity_factor, t, k, num_experts)
            scores = route.gate_scores() if capacity_priority == "score" else None
            keep = capacity_keep(route.expert_ids, scores, num_experts, cap)  # [T*k]
            dropped = int((~keep).sum())
            weights = capacity_weights(weights, keep, capacity_renorm)
            order = order[keep[order]]
        sent = torch.bincount(key[order], minlength=world * num_experts).view(world, num_experts)  # [world, E]
        recv = _exchange_count_matrix(sent, group)  # [world(src), E]
        x_send = x[order // k].to(_wire_dtype(x))  # [S, d]: bf16 on the wire under bf16 autocast
        x_recv = all_to_all_uneven(x_send, sent.sum(1).tolist(), recv.sum(1).tolist(), group)  # [R, d]
        src_label = torch.repeat_interleave(torch.arange(world), recv.sum(1).cpu())  # [R]
        e_label = torch.repeat_interleave(torch.arange(num_experts).repeat(world), recv.cpu().reshape(-1))  # [R]
        perm = torch.argsort(e_label * world + src_label, stable=True).to(x.device)  # [src][e] -> [e][src]
        per_expert = recv.sum(0).cpu()  # [E]
        stray = per_expert.clone()
        stray[local_ids] = 0
        if int(stray.sum()):
            raise RuntimeError(f"received tokens for experts {stray.nonzero().flatten().tolist()} "
                               f"not held on this rank (holds {local_ids})")
        counts_local = per_expert[local_ids]  # [L]
        x_grouped = x_recv[perm]  # [R, d] grouped by expert
    with span("experts"):
        y_grouped = expert_fn(x_grouped, counts_local.tolist())  # [R, d]
        if x_grouped.requires_grad and not y_grouped.requires_grad:
            # no expert rows here (R = 0): keep the combine all-to-all in the graph so its backward
            # collective runs on this rank too, like on every other rank
            y_grouped = y_grouped + x_grouped * 0
    with span("combine"):
        y_recv = torch.empty_like(y_grouped).index_copy(0, perm, y_grouped)  # back to [src][e] layout
        y_sorted = all_to_all_uneven(y_recv, recv.sum(1).tolist(), sent.sum(1).tolist(), group)  # [S, d]
        y_slots = y_sorted.new_zeros(t * k, d).index_copy(0, order, y_sorted)  # [T*k, d]
        return combine_slots(y_slots, weights), dropped, counts_local
