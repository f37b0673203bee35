"""Re-sharding FSSDP ownership: whole expert chunks move with their Adam state; the optimizer is rebuilt.

A re-shard is proposed when new owners balance the owned load (`reshard_balances`); with the cost gate on it
also has to pay for its moves (`copy_cost.reshard_pays`, bytes per moved expert from `moved_bytes_per_expert`)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sparsetrain.model.experts import EXPERT_WEIGHTS, GroupedExperts
from sparsetrain.parallel.comm import comm_device
from sparsetrain.parallel.optim_state import OPT_KEYS, ensure_optimizer_state, rebuild_optimizer
from sparsetrain.parallel.placement import owned_load
from sparsetrain.parallel.sparse_collectives import ensure_p2p_ready, global_peer
from sparsetrain.telemetry.comm import COMM

RESHARD_GAIN = 0.02  # re-shard only when owned-load max/mean improves by at least this fraction


def _imbalance(loads: torch.Tensor, owners: list[list[int]], world: int, replicas: list | None) -> float:
    """Mean over layers of max/mean owned load per rank (each layer's expert compute is synchronous)."""
    per_layer = [owned_load(loads[li:li + 1], owners[li:li + 1], world, replicas[li:li + 1] if replicas else None)
                 for li in range(len(owners))]
    return sum(float(r.max() / r.mean().clamp_min(1e-12)) for r in per_layer) / max(len(per_layer), 1)


def reshard_balances(loads: torch.Tensor, old: list[list[int]], new: list[list[int]], world: int,
                     replicas: list | None) -> bool:
    """Whether new owners lower the owned-load imbalance (loads [L, E]; replicated experts count load / copies)
    by at least RESHARD_GAIN."""
    return new != old and _imbalance(loads, new, world, replicas) < (1 - RESHARD_GAIN) * _imbalance(
        loads, old, world, replicas)


def moved_bytes_per_expert(mod: GroupedExperts) -> int:
    """Bytes `move_ownership` sends per moved expert: its params and each Adam moment."""
    return (1 + len(OPT_KEYS)) * len(EXPERT_WEIGHTS) * mod.d_model * mod.d_ffn * mod.w1.element_size()


def _post_moves(experts: list[GroupedExperts], optimizer: torch.optim.Optimizer, old_owners: list[list[int]],
                new_owners: list[list[int]], rank: int, group: dist.ProcessGroup | None
                ) -> tuple[dict[int, tuple[list[int], dict[str, list[torch.Tensor]]]], list[dist.Work],
                           list[tuple[torch.Tensor, ...]], int]:
    """Allocate each moving layer's new stacked tensors, post one send / receive per (moving expert, weight,
    tensor) straight from and into their rows, and copy the staying rows while they travel.

    -> (layer -> (its experts here after the move, weight -> [param, exp_avg, exp_avg_sq] new [n_new, out, in]),
    works, (staged recv, dst) pairs to copy once the works finish: only when the group communicates on another
    device than the experts', bytes this rank posted to send)."""
    dev = comm_device(group)
    fresh: dict[int, tuple[list[int], dict[str, list[torch.Tensor]]]] = {}
    ops: list[dist.P2POp] = []
    sent = 0
    staged: list[tuple[torch.Tensor, ...]] = []
    tag = 0  # the same running index on every rank: a (sender, receiver) pair matches its messages in order
    for li, (mod, old, new) in enumerate(zip(experts, old_owners, new_owners)):
        moving = [e for e in range(len(old)) if old[e] != new[e]]
        if not moving:
            continue
        local = {e: i for i, e in enumerate(mod.expert_ids)}  # expert -> its row here
        keep = [e for e in range(len(new)) if new[e] == rank]
        pos = {e: j for j, e in enumerate(keep)}  # expert -> its row in the new tensors
        fresh[li] = (keep, {})
        for w in EXPERT_WEIGHTS:
            p = getattr(mod, w)
            olds = [p.detach()] + [optimizer.state[p][k] for k in OPT_KEYS]
            fresh[li][1][w] = news = [t.new_empty((len(keep), *t.shape[1:])) for t in olds]  # [n_new, out, in]
            for e in moving:
                for t_old, t_new in zip(olds, news):
                    if old[e] == rank:  # rows are contiguous views: sent without packing
                        row = t_old[local[e]].to(dev)
                        ops.append(dist.P2POp(dist.isend, row, global_peer(group, new[e]), group, tag))
                        sent += row.numel() * row.element_size()
                    elif new[e] == rank:
                        dst = t_new[pos[e]]
                        buf = dst if dst.device == dev else torch.empty_like(dst, device=dev)
                        ops.append(dist.P2POp(dist.irecv, buf, global_peer(group, old[e]), group, tag))
                        if buf is not dst:
                            staged.append((buf, dst))
                    tag += 1
            for t_old, t_new in zip(olds, news):  # rows that stay, copied while the moves travel
                for e in keep:
                    if old[e] == rank:
                        t_new[pos[e]].copy_(t_old[local[e]])
    ensure_p2p_ready(group)  # every rank, also one without moves: on NCCL it may be the group's first P2P
    return fresh, (list(dist.batch_isend_irecv(ops)) if ops else []), staged, sent


def move_ownership(experts: list[GroupedExperts], optimizer: torch.optim.Optimizer, old_owners: list[list[int]],
                   new_owners: list[list[int]], rank: int, group: dist.ProcessGroup | None
                   ) -> tuple[torch.optim.Optimizer, set[nn.Parameter]]:
    """Send every chunk whose owner changes (params + optimizer state) from its old to its new owner; returns
    the rebuilt optimizer (same class and settings) and the expert params.

    One batch of point-to-point messages for all layers, each a row of a stacked tensor sent as it lies and
    received into its row of the new tensor: no packing and no re-assembly; a staging buffer only where the
    group communicates on another device than the experts' (gloo with CUDA experts). The packed
    spAG it replaces measured 3.6-7.2x slower moving 4-8 experts per layer each way on gloo,
    `benchmarks/reshard_move.py` in benchmarks/RESULTS.md. A layer without moves keeps its Parameters and
    their state."""
    ensure_optimizer_state(optimizer)
    step = next(iter(optimizer.state.values()))["step"].clone()
    fresh, works, staged, sent = _post_moves(experts, optimizer, old_owners, new_owners, rank, group)
    for work in works:
        work.wait()
    for buf, dst in staged:
        dst.copy_(buf)
    COMM.add("reshard", sent)
    replace: dict[nn.Parameter, nn.Parameter] = {}
    moved: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
    for li, (keep, weights) in fresh.items():
        mod = experts[li]
        for w, news in weights.items():
            param = nn.Parameter(news[0])
            replace[getattr(mod, w)] = param
            setattr(mod, w, param)
            moved[param] = {"step": step.clone(), **dict(zip(OPT_KEYS, news[1:]))}
        mod.expert_ids = keep
    params = {getattr(mod, w) for mod in experts for w in EXPERT_WEIGHTS}
    return rebuild_optimizer(optimizer, replace, moved), params
