"""NCCL's device rule, enforced on a CPU (gloo) run: no collective may get a host-side tensor.

On a GPU cluster every collective runs on NCCL, which takes tensors on the rank's CUDA device only.
On CPU every tensor is a CPU tensor, so a tensor built for the host (`torch.tensor([...])` without a
device, `.cpu()`) reaches gloo without complaint and the bug shows only on the first multi-GPU run.

`audit_collectives()` tracks, per tensor, whether it is *host-side* in the sense it would have on a
GPU run, and makes every torch.distributed collective raise when handed one:
  - a tensor made by a factory without an explicit `device` (torch.tensor, zeros, arange, ...) or
    by `.cpu()` is host-side;
  - `.to(device)` with an explicit device (`self.info.device`, `comm_device(group)`, `x.device`)
    gives a device-side tensor;
  - other ops give a host-side result iff every tensor input is host-side (the device propagation of
    real CUDA ops); in-place ops keep their target's side.
Tensors the audit never saw (parameters, autograd's gradients) count as device-side. Each
collective also checks `t.device == comm_device(group)`, which on a real NCCL run is the rule
itself. Use it in tests, or set `SPARSETRAIN_AUDIT_COMM=1` for a run.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from sparsetrain.parallel.comm import comm_device

__all__ = ["COLLECTIVES", "CommDeviceError", "audit_collectives"]

_TAG = "_sparsetrain_host_origin"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base",
               "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base", "all_to_all", "all_to_all_single", "broadcast",
               "reduce", "gather", "scatter", "send", "recv", "batch_isend_irecv")
# isend/irecv stay unwrapped: P2POp checks their identity; their tensors are checked in batch_isend_irecv
_OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list")
_local = threading.local()


class CommDeviceError(RuntimeError):
    """A collective got a tensor on the wrong device (a host tensor that NCCL would refuse)."""


def _origin() -> str:
    """file:line of the first caller frame outside torch and this module."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "/torch/" not in name and not name.endswith("comm_audit.py"):
            return f"{name}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _tag(t: Any, origin: str | None) -> None:
    if isinstance(t, torch.Tensor):
        with contextlib.suppress(AttributeError, RuntimeError):
            setattr(t, _TAG, origin)


def _host(t: Any) -> str | None:
    return getattr(t, _TAG, None) if isinstance(t, torch.Tensor) else None


def _explicit_device(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a `.to(...)` call names a target device (or a tensor whose device it takes)."""
    if kwargs.get("device") is not None:
        return True
    for a in args[1:]:
        if isinstance(a, (torch.device, str, int)) and not isinstance(a, bool):
            return True
    return False


class _HostTracker(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if name in ("cpu", "to", "cuda") and tensors:
            if name == "cpu":
                origin = _origin()
            elif name == "cuda" or len(tensors) > 1:  # .to(other) takes other's device
                origin = _host(tensors[1]) if name == "to" else None
            elif _explicit_device(func, args, kwargs):
                origin = None
            else:  # dtype-only conversion stays where it was
                origin = _host(tensors[0])
            if out is args[0] and origin != _host(out):
                out = out.view_as(out)  # a moved tensor is a new tensor on a GPU run: keep the source's side
        elif args and isinstance(args[0], torch.Tensor) and out is args[0]:
            return out  # in place: the target keeps its side
        elif not tensors:
            origin = None if kwargs.get("device") is not None else _origin()
        else:
            origins = [_host(t) for t in tensors]
            origin = origins[0] if all(origins) else None
        for t in tree_flatten(out)[0]:
            if origin is not None or _host(t) is not None:
                _tag(t, origin)
        return out


def _check(name: str, args: tuple, kwargs: dict) -> None:
    if getattr(_local, "inside_object_collective", False):
        return
    group = kwargs.get("group")
    leaves = tree_flatten((args, kwargs))[0]
    tensors = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
        elif isinstance(leaf, dist.P2POp):
            tensors.append(leaf.tensor)
            group = leaf.group
        elif isinstance(leaf, dist.ProcessGroup) and group is None:
            group = leaf
    want = comm_device(group)
    for t in tensors:
        origin = _host(t)
        if origin:
            raise CommDeviceError(f"{name} got a host tensor made at {origin}; NCCL refuses it: build it on "
                                  f"comm_device(group) or move it with sparsetrain.parallel.comm.to_comm")
        if t.device.type != want.type:
            raise CommDeviceError(f"{name} got a tensor on {t.device}; this group communicates on {want}")


def _checked(name: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check(name, args, kwargs)
        return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def _trusted(fn: Any) -> Any:
    """torch's object collectives build their own tensors on the right device: not ours to check."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _local.inside_object_collective = True
        try:
            return fn(*args, **kwargs)
        finally:
            _local.inside_object_collective = False

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


@contextlib.contextmanager
def audit_collectives() -> Iterator[None]:
    """Track host-side tensors and make every torch.distributed collective refuse them (this process)."""
    import torch.distributed.distributed_c10d as c10d

    saved: list[tuple[Any, str, Any]] = []
    for mod in (dist, c10d):
        for name in COLLECTIVES + _OBJECT_COLLECTIVES:
            fn = getattr(mod, name, None)
            if fn is None:
                continue
            saved.append((mod, name, fn))
            setattr(mod, name, _trusted(fn) if name in _OBJECT_COLLECTIVES else _checked(name, fn))
    try:
        with _HostTracker():
            yield
    finally:
        for mod, name, fn in reversed(saved):
            setattr(mod, name, fn)
