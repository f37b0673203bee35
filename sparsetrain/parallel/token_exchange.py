"""Token dispatch/combine across ranks shared by EP and FSSDP: slots -> (rank, expert) -> back."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from sparsetrain.kernels import compute_dtype
from sparsetrain.model.moe import capacity_keep, capacity_weights, combine_slots, expert_capacity
from sparsetrain.model.router import RouterOutput
from sparsetrain.parallel.a2a_overlap import a2a_start, a2a_wait
from sparsetrain.parallel.all_to_all import all_to_all_uneven
from sparsetrain.parallel.comm import to_comm
from sparsetrain.telemetry.timers import span

ExpertFn = Callable[[torch.Tensor, list[int]], torch.Tensor]


def _start_count_exchange(c: torch.Tensor, group: dist.ProcessGroup | None,
                          route_counts: torch.Tensor | None = None) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
    """Post c [world, E] slots this rank sends per (dest, expert); the returned wait gives ([world, E] slots
    received per (src, expert), `route_counts` [E] summed over the group or None). The route counts ride in the
    same all_to_all (every peer gets this rank's [E]), as Megatron-Core's dispatcher all-gathers its per-expert
    counts: the sum over the group is then known everywhere without a separate count reduction."""
    world, e = c.shape
    send = c if route_counts is None else torch.cat([c, route_counts.to(c).expand(world, e)], 1)  # [world, E|2E]
    send = to_comm(send, group).contiguous()
    out = torch.empty_like(send)
    work = dist.all_to_all_single(out.view(-1), send.view(-1), group=group, async_op=True)  # E (or 2E) per peer

    def wait() -> tuple[torch.Tensor, torch.Tensor | None]:
        work.wait()
        got = out.to(c.device)
        return got[:, :e], (got[:, e:].sum(0) if route_counts is not None else None)
    return wait


def _chunks_in_order(x: torch.Tensor, sizes: list[int], order: list[int]) -> torch.Tensor:
    """Rows of x [N, d] cut into consecutive chunks of `sizes`, re-concatenated in chunk `order` (autograd: the
    backward is the same cut and re-concatenation; memcpy of whole chunks, no per-row gather or scatter-add)."""
    parts = torch.split(x, sizes)
    return torch.cat([parts[i] for i in order]) if order else x[:0]


def _keep_in_graph(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """No expert rows here (R = 0): keep the combine all-to-all in the graph so its backward collective runs on
    this rank too, like on every other rank."""
    return y + x * 0 if x.requires_grad and not y.requires_grad else y


def exchange_and_compute(x: torch.Tensor, route: RouterOutput, slot_rank: torch.Tensor, num_experts: int,
                         local_ids: list[int], expert_fn: ExpertFn, group: dist.ProcessGroup | None,
                         capacity_factor: float = 0.0,
                         capacity_renorm: bool = True,
                         capacity_priority: str = "score",
                         sum_route_counts: bool = False,
                         overlap: bool = True) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Send each slot to `slot_rank`, run local experts grouped by expert, return combined [T, d].

    Capacity mode (capacity_factor > 0) drops over-capacity slots before they leave this rank, in GShard
    priority order over this rank's tokens (`capacity_keep`; `capacity_priority` score or token order within
    a choice rank), and renormalizes the survivors' weights.

    `sum_route_counts`: the router's counts (`route.tokens_per_expert`) travel in the count exchange, and their
    sum over `group` lands in `route.global_tokens_per_expert` (callers whose group spans every data-parallel
    rank: the model then skips its own count reduction).

    `overlap` (parallel.a2a_overlap): the slots this rank routes to itself never travel; they are computed
    while the dispatch all-to-all is in flight, and their backward while the dispatch's reverse exchange is,
    as FasterMoE and Tutel overlap local experts with the exchange. (One extra expert call per layer; with
    `GroupedExperts.bind` both calls share the weights' per-expert views, so backward still builds each weight's
    gradient once.)

    Returns (output [T, d], dropped slots, tokens computed per local expert [len(local_ids)]).
    """
    world = dist.get_world_size(group)
    t, k = route.expert_ids.shape
    d = x.shape[-1]
    flat_e = route.expert_ids.reshape(-1)  # [T*k]
    dropped = 0
    weights = route.weights
    wire = compute_dtype(x)  # tokens travel in the GEMMs' dtype: bf16 on the wire under bf16 autocast
    with span("dispatch"):
        key = slot_rank * num_experts + flat_e  # [T*k] grouped by destination rank, then expert
        order = torch.argsort(key, stable=True)
        kept_key = key
        if capacity_factor > 0:  # GShard-style local capacity per expert on this rank's tokens
            cap = expert_capacity(capacity_factor, t, k, num_experts)
            scores = route.gate_scores() if capacity_priority == "score" else None
            keep = capacity_keep(route.expert_ids, scores, num_experts, cap)  # [T*k]
            dropped = int((~keep).sum())
            weights = capacity_weights(weights, keep, capacity_renorm)
            order = order[keep[order]]
            kept_key = key[order]
        sent = torch.bincount(kept_key, minlength=world * num_experts).view(world, num_experts)  # [world, E]
        counts_wait = _start_count_exchange(sent, group, route.tokens_per_expert if sum_route_counts else None)
        sent_host = sent.cpu()  # [world(dest), E]
        send_splits = sent_host.sum(1).tolist()
        me = dist.get_rank(group)
        overlap = overlap and world > 1
        if overlap:  # this rank's own slots (a contiguous run of `order`) stay here
            lo, hi = sum(send_splits[:me]), sum(send_splits[:me + 1])
            order_own, order = order[lo:hi], torch.cat([order[:lo], order[hi:]])
            send_splits[me] = 0
        x_send = x[order // k].to(wire)  # [S, d] gathered while the counts travel
        recv, summed = counts_wait()
        if summed is not None:
            route.global_tokens_per_expert = summed  # [E] the group's routed slots per expert (before drops)
        recv_host = recv.cpu()  # [world(src), E]: the one host copy the splits need
        per_expert = recv_host.sum(0)  # [E]
        stray = per_expert.clone()
        stray[local_ids] = 0
        if int(stray.sum()):
            raise RuntimeError(f"received tokens for experts {stray.nonzero().flatten().tolist()} "
                               f"not held on this rank (holds {local_ids})")
        counts_local = per_expert[local_ids].tolist()  # [L] in local_ids order
        counts_recv = counts_local  # [L] rows that arrive through the exchange, per local expert
        if overlap:
            own_e = recv_host[me].tolist()  # [E] own slots per expert (never sent)
            recv_host[me] = 0
            counts_recv = [c - own_e[e] for c, e in zip(counts_local, local_ids)]
        recv_splits = recv_host.sum(1).tolist()
        if overlap:
            buf, ticket = a2a_start(x_send, send_splits, recv_splits, group)
            by_own = torch.split(order_own, own_e)  # own slots per global expert id
            slots_own = torch.cat([by_own[e] for e in local_ids] or [order_own[:0]])  # [A] by expert, local_ids order
            with span("experts"):
                y_own = expert_fn(x[slots_own // k].to(wire), [own_e[e] for e in local_ids])  # [A, d]
            x_recv = a2a_wait(buf, ticket)  # [R, d] in (src, expert) chunks
        else:
            x_recv = all_to_all_uneven(x_send, send_splits, recv_splits, group)  # [R, d] in (src, expert) chunks
        # (src, e) chunks -> (e, src) chunks: rows grouped by local expert, in local_ids order
        chunk_rows = recv_host.reshape(-1).tolist()  # [world * E] chunk sizes, src-major
        by_expert = [src * num_experts + e for e in local_ids for src in range(world)]
        x_grouped = _chunks_in_order(x_recv, chunk_rows, by_expert)  # [R, d]
    with span("experts"):
        y_grouped = _keep_in_graph(expert_fn(x_grouped, counts_recv), x_grouped)  # [R, d]
    with span("combine"):
        grouped_rows = [chunk_rows[i] for i in by_expert]  # chunk sizes in (e, src) order
        back = sorted(range(len(by_expert)), key=by_expert.__getitem__)  # (e, src) chunks -> (src, e)
        y_recv = _chunks_in_order(y_grouped, grouped_rows, back)  # [R, d] back to the received layout
        if overlap:
            y_rows = torch.cat([all_to_all_uneven(y_recv, recv_splits, send_splits, group), y_own])  # [S + A, d]
            slots = torch.cat([order, slots_own])  # [S + A] slot of each row
        else:
            y_rows, slots = all_to_all_uneven(y_recv, recv_splits, send_splits, group), order  # [S, d]
        full = y_rows.shape[0] == t * k  # nothing dropped: every slot row is written below
        y_slots = (y_rows.new_empty if full else y_rows.new_zeros)(t * k, d).index_copy(0, slots, y_rows)
        return combine_slots(y_slots, weights), dropped, torch.tensor(counts_local, dtype=torch.long)
