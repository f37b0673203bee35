"""Re-sharding FSSDP ownership: whole expert chunks move with their Adam state; the optimizer is rebuilt.

A re-shard is proposed when new owners balance the owned load (`reshard_balances`); with the cost gate on it
also has to pay for its moves (`copy_cost.reshard_pays`, bytes per moved expert from `moved_bytes_per_expert`)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sparsetrain.model.experts import EXPERT_WEIGHTS, GroupedExperts, expert_shapes
from sparsetrain.parallel.optim_state import OPT_KEYS, ensure_optimizer_state, rebuild_optimizer
from sparsetrain.parallel.placement import LayerPlacement, owned_load
from sparsetrain.parallel.sparse_collectives import spag

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


def _pack_rows(mod: GroupedExperts, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """[n_owned, 3C]: each owned expert's params, exp_avg and exp_avg_sq, flattened side by side."""
    n, per = mod.w1.shape[0], mod.d_model * mod.d_ffn
    cols = [getattr(mod, w).detach().reshape(n, per) for w in EXPERT_WEIGHTS]
    for k in OPT_KEYS:
        cols += [optimizer.state[getattr(mod, w)][k].reshape(n, per) for w in EXPERT_WEIGHTS]
    return torch.cat(cols, dim=1)


def moved_bytes_per_expert(mod: GroupedExperts) -> int:
    """Bytes `move_ownership` sends per moved expert: its params and each Adam moment (`_pack_rows`' width)."""
    return (1 + len(OPT_KEYS)) * len(EXPERT_WEIGHTS) * mod.d_model * mod.d_ffn * mod.w1.element_size()


def move_ownership(experts: list[GroupedExperts], optimizer: torch.optim.Optimizer, old_owners: list[list[int]],
                   new_owners: list[list[int]], rank: int, group: dist.ProcessGroup | None
                   ) -> tuple[torch.optim.Optimizer, set[nn.Parameter]]:
    """Send every chunk whose owner changes (params + optimizer state) from its old to its new owner, one
    spAG per layer; returns the rebuilt optimizer (same class and settings) and the new expert params."""
    ensure_optimizer_state(optimizer)
    step = next(iter(optimizer.state.values()))["step"].clone()
    replace: dict[nn.Parameter, nn.Parameter] = {}
    moved: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
    for mod, old, new in zip(experts, old_owners, new_owners):
        transfer = LayerPlacement.from_lists(old, [[o, n] for o, n in zip(old, new)])
        owners, copies = list(transfer.owners), [list(c) for c in transfer.copies]
        with torch.no_grad():
            rows, ids = spag(_pack_rows(mod, optimizer), mod.expert_ids, owners, copies, group)  # [n_mat, 3C]
        keep = [e for e in range(len(new)) if new[e] == rank]
        sel = torch.tensor([ids.index(e) for e in keep], dtype=torch.long, device=rows.device)
        rows = rows.index_select(0, sel)  # [n_new, 3C]
        n, width = len(keep), rows.shape[1] // 3
        parts = rows.split(width, dim=1)  # params, exp_avg, exp_avg_sq: each [n_new, C]
        sizes = [mod.d_ffn * mod.d_model] * len(EXPERT_WEIGHTS)
        shapes = expert_shapes(mod.d_model, mod.d_ffn)
        splits = [p.split(sizes, dim=1) for p in parts]
        for wi, w in enumerate(EXPERT_WEIGHTS):
            param = nn.Parameter(splits[0][wi].reshape(n, *shapes[w]).clone())
            replace[getattr(mod, w)] = param
            setattr(mod, w, param)
            moved[param] = {"step": step.clone(), **{k: splits[1 + ki][wi].reshape(n, *shapes[w]).clone()
                                                      for ki, k in enumerate(OPT_KEYS)}}
        mod.expert_ids = keep
    return rebuild_optimizer(optimizer, replace, moved), set(moved)
