"""Dense-parameter data parallelism: FSDP2 (`fully_shard`) or an averaged coalesced all-reduce."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sparsetrain.parallel.mesh import DistInfo


def apply_dense_sharding(model: nn.Module, info: DistInfo, ignored: set[nn.Parameter]) -> nn.Module:
    """FSDP2 per transformer block and at the root; `ignored` params (experts) stay unsharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,), mesh_dim_names=("fsdp",))
    for block in model.layers:
        block_ignored = {p for p in block.parameters() if p in ignored}
        fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params=block_ignored or None)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, ignored_params=set(ignored) or None)
    return model


def all_reduce_grads(params: list[nn.Parameter], world: int, group: dist.ProcessGroup | None = None) -> None:
    """Sum the gradients over `group` (default: all ranks) in one flat buffer, then divide by `world`."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # [sum numel]
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
