"""Re-sharding FSSDP ownership: whole expert chunks move with their Adam state; the optimizer is rebuilt.

A re-shard is proposed when new owners balance the owned load (`reshard_balances`); with the cost gate on it
also has to pay for its moves (`copy_cost.reshard_pays`, bytes per moved expert from `moved_bytes_per_expert`)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sparsetrain.model.experts import EXPERT_WEIGHTS, GroupedExperts, expert_shapes
from sparsetrain.parallel.optim_state import OPT_KEYS, ensure_optimizer_state, rebuild_optimizer
from sparsetrain.parallel.placement import owned_load
from sparsetrain.parallel.sparse_collectives import spag
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


def _pack_rows(mod: GroupedExperts, optimizer: torch.optim.Optimizer, rows: list[int]) -> torch.Tensor:
    """[len(rows), 3C]: the given local rows' params, exp_avg and exp_avg_sq, flattened side by side."""
    idx = torch.tensor(rows, dtype=torch.long, device=mod.w1.device)
    n, per = len(rows), mod.d_model * mod.d_ffn
    cols = [getattr(mod, w).detach().index_select(0, idx).reshape(n, per) for w in EXPERT_WEIGHTS]
    for k in OPT_KEYS:
        cols += [optimizer.state[getattr(mod, w)][k].index_select(0, idx).reshape(n, per) for w in EXPERT_WEIGHTS]
    return torch.cat(cols, dim=1)


def moved_bytes_per_expert(mod: GroupedExperts) -> int:
    """Bytes `move_ownership` sends per moved expert: its params and each Adam moment (`_pack_rows`' width)."""
    return (1 + len(OPT_KEYS)) * len(EXPERT_WEIGHTS) * mod.d_model * mod.d_ffn * mod.w1.element_size()


def move_ownership(experts: list[GroupedExperts], optimizer: torch.optim.Optimizer, old_owners: list[list[int]],
                   new_owners: list[list[int]], rank: int, group: dist.ProcessGroup | None
                   ) -> tuple[torch.optim.Optimizer, set[nn.Parameter]]:
    """Send every chunk whose owner changes (params + optimizer state) from its old to its new owner, one
    spAG per layer with moves; returns the rebuilt optimizer (same class and settings) and the expert params.

    Only the moving chunks are packed and sent (the spAG runs on the moving experts alone); each new stacked
    tensor is one concatenation of the rows that stay and the rows received. A layer without moves keeps its
    Parameters and their state."""
    ensure_optimizer_state(optimizer)
    step = next(iter(optimizer.state.values()))["step"].clone()
    replace: dict[nn.Parameter, nn.Parameter] = {}
    moved: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
    for mod, old, new in zip(experts, old_owners, new_owners):
        moving = [e for e in range(len(old)) if old[e] != new[e]]
        if not moving:
            continue
        local = {e: i for i, e in enumerate(mod.expert_ids)}  # expert -> its row here
        leaving = [i for i, e in enumerate(moving) if old[e] == rank]  # indices into `moving`
        with torch.no_grad(), COMM.relabel("spag", "reshard"):  # only moving chunks, re-indexed 0..n-1
            rows, ids = spag(_pack_rows(mod, optimizer, [local[moving[i]] for i in leaving]), leaving,
                             [old[e] for e in moving], [sorted({old[e], new[e]}) for e in moving], group)
        received = {moving[i]: j for j, i in enumerate(ids) if new[moving[i]] == rank}  # expert -> row of `rows`
        keep = [e for e in range(len(new)) if new[e] == rank]
        parts = rows.split(rows.shape[1] // (1 + len(OPT_KEYS)), dim=1)  # params, exp_avg, exp_avg_sq: [n, C]
        per, shapes = mod.d_model * mod.d_ffn, expert_shapes(mod.d_model, mod.d_ffn)
        for wi, w in enumerate(EXPERT_WEIGHTS):
            olds = [getattr(mod, w).detach()] + [optimizer.state[getattr(mod, w)][k] for k in OPT_KEYS]
            fresh = []
            for t, part in zip(olds, parts):  # [n_new, out, in]: rows that stay, rows received, in expert order
                segs = [t[local[e]:local[e] + 1] if e not in received else
                        part[received[e]:received[e] + 1, wi * per:(wi + 1) * per].reshape(1, *shapes[w]) for e in keep]
                fresh.append(torch.cat(segs) if segs else t.new_empty(0, *shapes[w]))
            param = nn.Parameter(fresh[0])
            replace[getattr(mod, w)] = param
            setattr(mod, w, param)
            moved[param] = {"step": step.clone(), **dict(zip(OPT_KEYS, fresh[1:]))}
        mod.expert_ids = keep
    params = {getattr(mod, w) for mod in experts for w in EXPERT_WEIGHTS}
    return rebuild_optimizer(optimizer, replace, moved), params
