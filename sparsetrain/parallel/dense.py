"""Dense-parameter data parallelism: FSDP2 (`fully_shard`) or an averaged coalesced all-reduce."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from sparsetrain.parallel.comm import to_comm
from sparsetrain.parallel.mesh import DistInfo

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_dtype(precision: str) -> torch.dtype | None:
    """Low-precision compute / wire dtype for train.precision (None: fp32 everywhere)."""
    return torch.bfloat16 if precision == "bf16" else None


def mixed_precision_policy(precision: str, grad_reduce_dtype: str = "fp32") -> object | None:
    """FSDP2 policy: under train.precision=bf16, bf16 params in compute and all-gathers over fp32 sharded master
    params; gradients reduced in `grad_reduce_dtype` (fp32 by default) in either precision (FSDP2's reduce_dtype
    applies to fp32 params too, as torchtitan's `mixed_precision_reduce`); None when nothing is cast."""
    if precision != "bf16" and grad_reduce_dtype == "fp32":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=compute_dtype(precision), reduce_dtype=DTYPES[grad_reduce_dtype])


RESHARD_POLICIES = ("default", "always", "never")


def apply_dense_sharding(model: nn.Module, info: DistInfo, ignored: set[nn.Parameter],
                         mp_policy: object | None = None, reshard: str = "default") -> nn.Module:
    """FSDP2 per transformer block and at the root; `ignored` params (experts) stay unsharded.

    `reshard` (parallel.fsdp_reshard_after_forward), torchtitan's policy: `default` frees every block's
    unsharded parameters after its forward except the last block's and the root's (backward needs those
    first, so freeing them would only re-gather them at once); `always` frees all; `never` keeps all
    until backward (no re-gather, more memory)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if reshard not in RESHARD_POLICIES:
        raise ValueError(f"parallel.fsdp_reshard_after_forward={reshard!r}: expected one of {RESHARD_POLICIES}")
    mesh = init_device_mesh(info.device.type, (info.world,), mesh_dim_names=("fsdp",))
    kw = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        block_ignored = {p for p in block.parameters() if p in ignored}
        free = reshard == "always" or (reshard == "default" and i < last)
        fully_shard(block, mesh=mesh, reshard_after_forward=free, ignored_params=block_ignored or None, **kw)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard == "always", ignored_params=set(ignored) or None,
                **kw)
    return model


def reshard_fsdp(model: nn.Module) -> None:
    """Free every FSDP2 module's unsharded parameters, so the model's parameters are the sharded ones the
    optimizer holds. A forward without backward (evaluation) leaves the modules kept after forward (the root and
    last block under `default`) unsharded: their parameters are then full views the optimizer has no state for,
    and a checkpoint written then lost their Adam state."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported: no module can be an FSDP2 one
    for m in model.modules() if fsdp is not None else ():
        if isinstance(m, fsdp.FSDPModule):
            m.reshard()


def all_reduce_grads(params: list[nn.Parameter], world: int, group: dist.ProcessGroup | None = None,
                     dtype: torch.dtype | None = None) -> None:
    """Sum the gradients over `group` (default: all ranks) in one flat buffer, then divide by `world`; the
    buffer travels in `dtype` (train.grad_reduce_dtype=bf16: half the bytes) or the gradients' own dtype."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    if dist.get_world_size(group) == 1:  # e.g. EP's expert replica group of one: no collective, only the mean
        torch._foreach_div_(grads, world)
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # [sum numel]
    flat = to_comm(flat if dtype is None else flat.to(dtype), group)
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
