"""Activation offload: saved tensors of selected blocks live in a host buffer pool between forward and backward.

`enable_activation_offload(model, cfg)` hooks every k-th transformer block (the model file is unchanged):
a forward pre-hook pushes this controller as a layer of the saved-tensor hook stack (`offload.saved`; FSSDP's
chunk release is an inner layer of the same stack), an always-called forward hook pops it. Pack copies large
non-parameter saved tensors to host buffers (CUDA: pinned, on a side stream; the pool may be bounded by
`max_host_mib`, past which tensors stay on device); unpack brings them back. With `prefetch`, a grad hook on
block i's output starts the copies back of blocks i and i-1.
"""
from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsetrain.config import OffloadConfig
from sparsetrain.offload.checkpointing import checkpoint_module, uncheckpoint_module
from sparsetrain.offload.packed import PackedTensor
from sparsetrain.offload.pool import HostBufferPool
from sparsetrain.offload.saved import LayerScope

log = logging.getLogger("sparsetrain.offload")

_ENABLED: weakref.WeakKeyDictionary[nn.Module, OffloadController] = weakref.WeakKeyDictionary()


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks in depth order: `model.layers` (or `model.module.layers` for wrappers)."""
    for m in (model, getattr(model, "module", None)):
        layers = getattr(m, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return list(layers)
    raise ValueError(f"activation offload: {type(model).__name__} has no non-empty `layers` ModuleList of blocks")


def _storage_ptr(t: torch.Tensor) -> int | None:
    """Data pointer of t's storage, None for tensors without one (subclasses such as DTensor)."""
    t = getattr(t, "_local_tensor", t)  # DTensor (FSDP2 sharded params): its local shard
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _resident_ptrs(module: nn.Module) -> set[int]:
    """Storage pointers of a module's parameters and buffers (they stay on device anyway)."""
    ptrs = {_storage_ptr(t) for t in [*module.parameters(), *module.buffers()]}
    ptrs.discard(None)
    ptrs.discard(0)
    return ptrs  # type: ignore[return-value]


@dataclass
class _Group:
    """The offloaded tensors of one forward call of one block (weak: autograd owns them)."""

    block: int
    handles: list[weakref.ReferenceType[PackedTensor]] = field(default_factory=list)

    def live(self) -> list[PackedTensor]:
        return [h for h in (r() for r in self.handles) if h is not None]


@dataclass
class _Call:
    """State of one in-flight block forward: its hooks context, group, resident pointers, dedup map."""

    group: _Group
    resident: set[int]
    scope: LayerScope | None = None
    seen: dict[tuple, tuple[weakref.ReferenceType[torch.Tensor], Any]] = field(default_factory=dict)


class _CallLayer:
    """This controller as one layer of the saved-tensor stack for one block call (claims every tensor)."""

    def __init__(self, ctl: OffloadController, call: _Call) -> None:
        self.ctl, self.call = ctl, call

    def pack(self, t: torch.Tensor) -> Any:
        return self.ctl._pack(self.call, t)

    def unpack(self, payload: Any) -> torch.Tensor:
        return self.ctl._unpack(payload)


class OffloadController:
    """Owns the hooks, the host buffer pools and the counters; `remove()` restores the model."""

    def __init__(self, model: nn.Module, cfg: OffloadConfig) -> None:
        if cfg.every_k_layers < 1:
            raise ValueError(f"offload.every_k_layers must be >= 1, got {cfg.every_k_layers}")
        if cfg.min_tensor_bytes < 0:
            raise ValueError(f"offload.min_tensor_bytes must be >= 0, got {cfg.min_tensor_bytes}")
        if cfg.max_host_mib < 0:
            raise ValueError(f"offload.max_host_mib must be >= 0 (0 = unbounded), got {cfg.max_host_mib}")
        if model in _ENABLED:
            raise RuntimeError("activation offload is already enabled on this model; call remove() first")
        self.model, self.cfg = model, cfg
        self.blocks = find_blocks(model)
        k = cfg.every_k_layers
        self.selected = [i for i in range(len(self.blocks)) if i % k == k - 1]
        self._resident = _resident_ptrs(model)
        self._lock = threading.RLock()
        self._pools: dict[torch.device, HostBufferPool] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._live: weakref.WeakSet[PackedTensor] = weakref.WeakSet()
        self._active: list[_Call] = []
        self._last_group: dict[int, _Group] = {}
        self._hooks: list[Any] = []
        self._checkpointed: list[int] = []
        self._warned_full = False
        self.reset_stats()
        for i, block in enumerate(self.blocks):
            if i in self.selected:
                self._hooks.append(block.register_forward_pre_hook(functools.partial(self._enter, i)))
                self._hooks.append(block.register_forward_hook(functools.partial(self._exit, i), always_call=True))
                if cfg.checkpoint_activations and checkpoint_module(block):  # False: already checkpointed
                    self._checkpointed.append(i)
            elif cfg.prefetch and i - 1 in self.selected:  # backward reaching block i prefetches block i-1
                self._hooks.append(block.register_forward_hook(functools.partial(self._link, i)))
        _ENABLED[model] = self

    # ------------------------------------------------------------------ hooks
    def _enter(self, i: int, block: nn.Module, args: tuple) -> None:
        if i == self.selected[0]:
            self._resident = _resident_ptrs(self.model)  # once per forward: params may have been moved or replaced
        call = _Call(_Group(i), self._resident | _resident_ptrs(block))  # block params: FSDP2 swaps in unsharded ones
        call.scope = LayerScope(_CallLayer(self, call))
        self._active.append(call)

    def _exit(self, i: int, block: nn.Module, args: tuple, out: Any) -> None:
        call = self._active.pop()
        call.scope.close()
        call.seen.clear()
        self._last_group[i] = call.group
        self._link(i, block, args, out)

    def _link(self, i: int, block: nn.Module, args: tuple, out: Any) -> None:
        """Register the prefetch trigger on block i's output: its grad arrives when backward reaches block i."""
        if not self.cfg.prefetch or not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        groups = [g for g in (self._last_group.get(i) if i in self.selected else None,
                              self._last_group.get(i - 1)) if g is not None and g.handles]
        if groups:
            out.register_hook(functools.partial(self._on_block_grad, groups))

    def _on_block_grad(self, groups: list[_Group], grad: torch.Tensor) -> None:
        for g in groups:
            for h in g.live():
                h.fetch(prefetch=True)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        with self._lock:
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            return self._streams[device]

    def _pool(self, device: torch.device) -> HostBufferPool:
        with self._lock:
            if device not in self._pools:  # one pool per device: its buffers are only touched on that side stream
                self._pools[device] = HostBufferPool(pin_memory=device.type == "cuda" and self.cfg.pin_memory,
                                                     max_bytes=int(self.cfg.max_host_mib * 2**20))
            return self._pools[device]

    def _pack(self, call: _Call, t: torch.Tensor) -> Any:
        nbytes = t.numel() * t.element_size()
        ptr = _storage_ptr(t) if type(t) is torch.Tensor else None
        if isinstance(t, nn.Parameter) or (ptr is not None and ptr in call.resident):
            self._count("kept_resident", 0)
            return t.detach()  # never the tensor itself: a saved output would form an uncollectable C++ cycle
        if (ptr is None or t.layout != torch.strided or t.device.type not in ("cpu", "cuda") or nbytes == 0
                or nbytes > t.untyped_storage().nbytes()):  # expanded views are cheaper on device than copied
            self._count("kept_other", nbytes)
            return t.detach()
        key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
        hit = call.seen.get(key)
        if hit is not None and hit[0]() is not None:  # same live tensor saved again (e.g. x for wq, wk, wv)
            self._count("dedup", 0)
            return hit[1]
        if nbytes < self.cfg.min_tensor_bytes:
            self._count("kept_small", nbytes)
            kept = t.detach()
            call.seen[key] = (weakref.ref(t), kept)
            return kept
        pool = self._pool(t.device)
        buf = pool.acquire(nbytes)
        if buf is None:  # the bounded pool is full: this tensor stays on device
            self._count("kept_pool_full", nbytes)
            self._warn_full(pool, nbytes)
            kept = t.detach()
            call.seen[key] = (weakref.ref(t), kept)
            return kept
        packed = PackedTensor(t, pool, buf, self._side_stream(t.device), self._lock, call.group.block, ptr)
        call.seen[key] = (weakref.ref(t), packed)
        call.group.handles.append(weakref.ref(packed))
        self._live.add(packed)
        self._count("offloaded", nbytes)
        with self._lock:
            self._by_block[call.group.block] += nbytes
            self._n_by_block[call.group.block] += 1
        return packed

    def _warn_full(self, pool: HostBufferPool, nbytes: int) -> None:
        if not self._warned_full:
            self._warned_full = True
            log.warning("offload: host pool full (offload.max_host_mib=%g, %.1f MiB in use); a %.2f MiB activation "
                        "stays on device (counted as kept_pool_full; raise max_host_mib or offload fewer blocks)",
                        self.cfg.max_host_mib, pool.in_use_bytes / 2**20, nbytes / 2**20)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, PackedTensor):
            return packed
        if packed.dev is None:
            self._count("fetched_on_demand", packed.nbytes)
        elif packed.prefetched:
            self._count("prefetched", packed.nbytes)
            packed.prefetched = False  # count each prefetch once
        return packed.get()

    def _count(self, name: str, nbytes: int) -> None:
        with self._lock:
            self._counts[name] += 1
            self._bytes[name] += nbytes

    # ------------------------------------------------------------------ public API
    def live_handles(self) -> list[PackedTensor]:
        """Offloaded tensors still owned by some autograd graph (for inspection and tests)."""
        return list(self._live)

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset_stats(): tensors/bytes offloaded or kept, fetches, pool use."""
        with self._lock:
            c, b = dict(self._counts), dict(self._bytes)
            pools = list(self._pools.values())
            out: dict[str, Any] = {
                "offloaded_tensors": c.get("offloaded", 0), "offloaded_bytes": b.get("offloaded", 0),
                "kept_small_tensors": c.get("kept_small", 0), "kept_small_bytes": b.get("kept_small", 0),
                "kept_resident_tensors": c.get("kept_resident", 0),  # params / buffers (or views of them)
                "kept_other_tensors": c.get("kept_other", 0), "kept_other_bytes": b.get("kept_other", 0),
                "kept_pool_full_tensors": c.get("kept_pool_full", 0),
                "kept_pool_full_bytes": b.get("kept_pool_full", 0),
                "dedup_hits": c.get("dedup", 0),
                "prefetched_tensors": c.get("prefetched", 0),
                "fetched_on_demand_tensors": c.get("fetched_on_demand", 0),
                "offloaded_bytes_by_block": dict(sorted(self._by_block.items())),
                "offloaded_tensors_by_block": dict(sorted(self._n_by_block.items())),
            }
        out["pool_in_use_bytes"] = sum(p.in_use_bytes for p in pools)
        out["pool_peak_bytes"] = sum(p.peak_in_use_bytes for p in pools)
        out["pool_capacity_bytes"] = sum(p.capacity_bytes for p in pools)
        out["pool_allocations"] = sum(p.allocations for p in pools)
        out["pool_reuses"] = sum(p.reuses for p in pools)
        out["pool_max_bytes"] = int(self.cfg.max_host_mib * 2**20)
        return out

    def step_metrics(self) -> dict[str, Any]:
        """This step's counters for the metrics record (this rank; MB), then reset_stats(): bytes moved, pool size
        and peak, tensors kept for lack of room."""
        st = self.stats()
        self.reset_stats()
        return {"offload_MB": st["offloaded_bytes"] / 2**20, "offload_tensors": st["offloaded_tensors"],
                "offload_pool_MB": st["pool_capacity_bytes"] / 2**20,
                "offload_pool_peak_MB": st["pool_peak_bytes"] / 2**20,
                "offload_pool_full_tensors": st["kept_pool_full_tensors"]}

    def reset_stats(self) -> None:
        """Zero the counters (call once per step); the pool peak restarts from what is held now."""
        with self._lock:
            self._counts: dict[str, int] = defaultdict(int)
            self._bytes: dict[str, int] = defaultdict(int)
            self._by_block: dict[int, int] = defaultdict(int)
            self._n_by_block: dict[int, int] = defaultdict(int)
            for p in self._pools.values():
                p.end_step()  # idle buffers of sizes this step and the one before did not need
                p.reset_counters()

    def remove(self) -> None:
        """Remove every hook and forward override; tensors already offloaded stay valid."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for i in self._checkpointed:
            uncheckpoint_module(self.blocks[i])
        self._checkpointed.clear()
        self._last_group.clear()
        for p in self._pools.values():
            p.clear()
        _ENABLED.pop(self.model, None)


def enable_activation_offload(model: nn.Module, cfg: OffloadConfig) -> OffloadController:
    """Offload saved activations of every `cfg.every_k_layers`-th block of `model.layers` to host memory."""
    return OffloadController(model, cfg)
