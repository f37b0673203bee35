"""Process-group set-up and the DeviceMesh with named dims (dp, ep) plus node identity."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sparsetrain.rendezvous import loopback_store


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    """'auto' -> cuda:<local_rank> when available, else cpu; 'cuda' without a GPU is an error."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available (use train.device=cpu or auto)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_pref: str = "auto", timeout_s: int = 300) -> DistInfo:
    """Read torchrun-style env (RANK, WORLD_SIZE, ...) and init gloo (CPU) or NCCL (GPU) when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        if (store := loopback_store(rank, world, timeout)) is not None:  # single machine: loopback only
            kw["store"] = store
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **kw)
    return DistInfo(rank, world, local_rank, local_world, device)


def build_mesh(info: DistInfo, ep_size: int = 0):
    """DeviceMesh with dims ('dp', 'ep'): ep groups are contiguous ranks, dp replicates across them."""
    if info.world == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    ep = ep_size or info.world
    if info.world % ep:
        raise ValueError(f"parallel.ep_size={ep} does not divide world size {info.world}")
    return init_device_mesh(info.device.type, (info.world // ep, ep), mesh_dim_names=("dp", "ep"))


def all_reduce_mean(t: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """In-place mean over the group (no-op without a process group), on the group's comm device."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        from sparsetrain.parallel.comm import to_comm

        c = to_comm(t, group)
        dist.all_reduce(c, group=group)
        if c is not t:
            t.copy_(c)
        t /= dist.get_world_size(group)
    return t
