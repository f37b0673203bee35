"""Re-sharding FSSDP ownership: whole expert chunks move with their Adam state; the optimizer is rebuilt."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from sparsetrain.model.experts import EXPERT_WEIGHTS, expert_shapes
from sparsetrain.model.gpt import GPT
from sparsetrain.parallel.placement import LayerPlacement
from sparsetrain.parallel.sparse_collectives import spag
from sparsetrain.train.optim import build_optimizer
from sparsetrain.train.state import OPT_KEYS, ensure_optimizer_state

if TYPE_CHECKING:
    from sparsetrain.parallel.fssdp import FSSDP


def _pack_rows(mod: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """[n_owned, 3C]: each owned expert's params, exp_avg and exp_avg_sq, flattened side by side."""
    n, per = mod.w1.shape[0], mod.d_model * mod.d_ffn
    cols = [getattr(mod, w).detach().reshape(n, per) for w in EXPERT_WEIGHTS]
    for k in OPT_KEYS:
        cols += [optimizer.state[getattr(mod, w)][k].reshape(n, per) for w in EXPERT_WEIGHTS]
    return torch.cat(cols, dim=1)


def move_ownership(s: FSSDP, model: GPT, optimizer: torch.optim.Optimizer,
                   new_owners: list[list[int]]) -> torch.optim.Optimizer:
    """Send every chunk whose owner changes (params + optimizer state) and rebuild the optimizer."""
    ensure_optimizer_state(optimizer)
    step = next(iter(optimizer.state.values()))["step"].clone()
    dense_state = {p: optimizer.state[p] for g in optimizer.param_groups for p in g["params"]
                   if p not in s._expert_params}
    moved: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
    new_expert_params: set[nn.Parameter] = set()
    rank = s.info.rank
    for li, moe in enumerate(model.moe_layers()):
        mod, old, new = moe.experts, s.owners[li], new_owners[li]
        transfer = LayerPlacement.from_lists(old, [[o, n] for o, n in zip(old, new)])
        owners, copies = list(transfer.owners), [list(c) for c in transfer.copies]
        with torch.no_grad():
            rows, ids = spag(_pack_rows(mod, optimizer), mod.expert_ids, owners, copies, s.group)  # [n_mat, 3C]
        keep = [e for e in range(len(new)) if new[e] == rank]
        sel = torch.tensor([ids.index(e) for e in keep], dtype=torch.long)
        rows = rows.index_select(0, sel)  # [n_new, 3C]
        n, width = len(keep), rows.shape[1] // 3
        parts = rows.split(width, dim=1)  # params, exp_avg, exp_avg_sq: each [n_new, C]
        sizes = [mod.d_ffn * mod.d_model] * len(EXPERT_WEIGHTS)
        shapes = expert_shapes(mod.d_model, mod.d_ffn)
        splits = [p.split(sizes, dim=1) for p in parts]
        for wi, w in enumerate(EXPERT_WEIGHTS):
            param = nn.Parameter(splits[0][wi].reshape(n, *shapes[w]).clone())
            setattr(mod, w, param)
            moved[param] = {"step": step.clone(), **{k: splits[1 + ki][wi].reshape(n, *shapes[w]).clone()
                                                      for ki, k in enumerate(OPT_KEYS)}}
            new_expert_params.add(param)
        mod.expert_ids = keep
    s._expert_params = new_expert_params
    new_opt = build_optimizer(s.trainable(model), s.cfg.train)
    for g_new, g_old in zip(new_opt.param_groups, optimizer.param_groups):
        g_new["lr"] = g_old["lr"]
    for g in new_opt.param_groups:
        for p in g["params"]:
            if p in moved:
                new_opt.state[p] = moved[p]
            elif p in dense_state:
                new_opt.state[p] = dense_state[p]
    return new_opt
