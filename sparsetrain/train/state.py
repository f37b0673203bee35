"""Placement-independent flat state: per-expert keys for weights and optimizer state.

Expert weights live in stacked tensors whose rows are the experts a rank holds
(`GroupedExperts.expert_ids`); the flat view splits them into one entry per
expert (`layers.3.ffn.experts.7.w1`), so checkpoints and re-sharding never
depend on placement or world size.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsetrain.model.experts import EXPERT_WEIGHTS, GroupedExperts, expert_ids_of
from sparsetrain.parallel.dense import reshard_fsdp
from sparsetrain.parallel.optim_state import OPT_KEYS, ensure_optimizer_state, step_device

__all__ = ["OPT_KEYS", "ensure_optimizer_state", "expert_ids_of", "expert_rows", "flat_state", "full_model_state",
           "set_optimizer_step"]


def expert_rows(mod: GroupedExperts, stacked: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """[(global expert id, view of this rank's row)] of a stacked [E_here, out, in] expert tensor.

    A DTensor (parallel.strategy=dp with FSDP2 shards the stacked experts on dim 0) gives the rows of its
    local shard, as views: indexing the DTensor itself would all-gather into a temporary, and a load into
    that temporary would leave the parameter untouched.
    """
    ids = expert_ids_of(mod)
    if not hasattr(stacked, "to_local"):
        return list(zip(ids, stacked.unbind(0)))
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(isinstance(pl, Shard) and pl.dim != 0 for pl in stacked.placements):
        raise ValueError(f"stacked experts sharded as {stacked.placements}; only dim 0 (experts) is supported")
    shape, offset = compute_local_shape_and_global_offset(stacked.shape, stacked.device_mesh, stacked.placements)
    local = stacked.to_local()[:shape[0]]  # [E_local, out, in]; drop FSDP2 padding rows if any
    return list(zip(ids[offset[0]:offset[0] + shape[0]], local.unbind(0)))


def _expert_param_names(model: nn.Module) -> dict[str, tuple[str, GroupedExperts]]:
    out = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            for w in EXPERT_WEIGHTS:
                out[f"{mname}.{w}"] = (mname, mod)
    return out


def flat_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """{key: tensor view} for params, persistent buffers and Adam state; experts split per expert. FSDP2
    modules are resharded first (their parameters are then the optimizer's); a trainable parameter without
    optimizer state is refused rather than left out of a checkpoint."""
    reshard_fsdp(model)
    experts = _expert_param_names(model)
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key in experts:
            continue
        out[f"model.{key}"] = t
    for key, (mname, mod) in experts.items():
        w = key.rsplit(".", 1)[-1]
        for gid, row in expert_rows(mod, getattr(mod, w).data):
            out[f"model.{mname}.{gid}.{w}"] = row
    if optimizer is None:
        return out
    ensure_optimizer_state(optimizer)
    held = {p for g in optimizer.param_groups for p in g["params"]}
    stateless = [n for n, p in params.items() if p.requires_grad and p not in held]
    if stateless:
        raise RuntimeError(f"the optimizer holds no state for {len(stateless)} trainable parameter(s), e.g. "
                           f"{stateless[0]}: a checkpoint now would lose their Adam state")
    step = None
    for name, p in params.items():
        st = optimizer.state.get(p)
        if not st:
            continue
        step = st["step"]
        if name in experts:
            mname, mod = experts[name]
            w = name.rsplit(".", 1)[-1]
            for k in OPT_KEYS:
                for gid, row in expert_rows(mod, st[k]):
                    out[f"optim.{mname}.{gid}.{w}.{k}"] = row
        else:
            for k in OPT_KEYS:
                out[f"optim.{name}.{k}"] = st[k]
    if step is not None:
        out["optim.step"] = step.detach().clone().reshape(())
    return out


def set_optimizer_step(optimizer: torch.optim.Optimizer, step: torch.Tensor) -> None:
    """After loading, every param's Adam step counter takes the saved value."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if optimizer.state.get(p):
                optimizer.state[p]["step"] = step.detach().reshape(()).to(step_device(group, p), torch.float32,
                                                                           copy=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every model entry as a full CPU tensor on every rank (DTensors gathered, experts from their holders)."""
    import torch.distributed as dist

    local = {}
    for k, v in flat_state(model, None).items():
        local[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
    if not (dist.is_available() and dist.is_initialized()):
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict[str, torch.Tensor] = {}
    for p in parts:
        for k, v in p.items():
            merged.setdefault(k, v)
    return merged
