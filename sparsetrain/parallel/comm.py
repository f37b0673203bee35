"""The one place that knows on which device each process group communicates.

NCCL takes CUDA tensors only (on the rank's current device); gloo takes CPU tensors (its CUDA support
is partial). Every collective in the package either hands over tensors that already live on the
training device of an NCCL run (activations, gradients, parameters) or builds / moves its tensors
with `comm_device(group)` / `to_comm(t, group)`. Small host-side numbers (timers, byte counters,
counts kept on the host) go through `all_reduce_host` / `all_gather_host`, which move them to the
comm device and back.

`COMM_DEVICES` maps a backend name to a function giving its device; a custom backend registers
itself there (tests register a gloo wrapper that enforces NCCL's device rule on CPU).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["COMM_DEVICES", "all_gather_host", "all_reduce_host", "comm_device", "is_dist", "to_comm"]


def _cuda_current() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


COMM_DEVICES: dict[str, Callable[[], torch.device]] = {
    "nccl": _cuda_current,
    "gloo": lambda: torch.device("cpu"),
    "mpi": lambda: torch.device("cpu"),
    "fake": lambda: torch.device("cpu"),
}


def is_dist() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device whose tensors the group's backend takes (CUDA for NCCL, CPU for gloo)."""
    if not is_dist():
        return torch.device("cpu")
    backend = str(dist.get_backend(group))
    # a combined backend string ("cpu:gloo,cuda:nccl") communicates on CUDA when it can
    names = [b.split(":")[-1] for b in backend.split(",")]
    for name in (n for n in names if n == "nccl"):
        return COMM_DEVICES[name]()
    for name in names:
        if name in COMM_DEVICES:
            return COMM_DEVICES[name]()
    raise ValueError(f"process-group backend {backend!r} has no communication device; "
                     f"register one in sparsetrain.parallel.comm.COMM_DEVICES (known: {', '.join(COMM_DEVICES)})")


def to_comm(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """t on the group's communication device (no copy when it is already there)."""
    return t.to(comm_device(group), non_blocking=False)


def all_reduce_host(values: torch.Tensor | list[float], group: dist.ProcessGroup | None = None,
                    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """All-reduce host numbers (a list or a tensor on any device) as one collective; returns a CPU tensor."""
    t = torch.as_tensor(values, dtype=dtype).to(comm_device(group))
    if is_dist() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t.cpu()


def all_gather_host(values: torch.Tensor | list[float], group: dist.ProcessGroup | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Gather every rank's vector of host numbers in one collective: [n] -> CPU tensor [world, n]."""
    t = torch.as_tensor(values, dtype=dtype).reshape(-1).to(comm_device(group))
    world = dist.get_world_size(group) if is_dist() else 1
    if world == 1:
        return t.cpu().unsqueeze(0)
    out = t.new_empty(world * t.numel())  # [world * n], rank-major
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)
    return out.view(world, -1).cpu()  # [world, n]
