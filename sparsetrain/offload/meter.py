"""Activation bytes per block, measured at save time through the saved-tensor stack (offload.saved).

`ActivationMeter(model)` pushes a pass-through layer for every block call: it records the bytes of each
distinct saved tensor that is not a parameter or buffer, then hands the tensor on (to offload, if on).
Inside a checkpointed region torch's checkpoint hooks are innermost, so the meter sees what checkpointing
keeps (the region's inputs), not what the replay recomputes. Gathered FSSDP expert copies are claimed by
an inner layer and never counted: they are weights, not activations. Bytes are per saved tensor (a view
saved beside its base counts again): an upper bound on the storage autograd holds.
"""
from __future__ import annotations

import functools
import weakref
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from typing_extensions import Self

from sparsetrain.offload.activation import _resident_ptrs, _storage_ptr, find_blocks
from sparsetrain.offload.saved import PASS, LayerScope


class _BlockCall:
    """Pass-through layer of one block call: counts distinct non-parameter saved tensors."""

    def __init__(self, meter: ActivationMeter, block: int, resident: set[int]) -> None:
        self.meter, self.block, self.resident = meter, block, resident
        self.seen: dict[tuple, weakref.ReferenceType[torch.Tensor]] = {}

    def pack(self, t: torch.Tensor) -> Any:
        ptr = _storage_ptr(t) if type(t) is torch.Tensor else None
        if isinstance(t, nn.Parameter) or ptr is None or ptr in self.resident:
            return PASS
        key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
        hit = self.seen.get(key)
        if hit is None or hit() is None:  # a dead tensor's memory may be reused under the same key
            self.seen[key] = weakref.ref(t)
            self.meter.bytes_by_block[self.block] += t.numel() * t.element_size()
        return PASS

    def unpack(self, payload: Any) -> torch.Tensor:  # never called: pack always passes
        raise AssertionError("ActivationMeter claims no tensor")


class ActivationMeter:
    """Context manager: `bytes_by_block` holds saved activation bytes per block while it is entered."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks = find_blocks(model)
        self.bytes_by_block: dict[int, int] = defaultdict(int)
        self._hooks: list[Any] = []
        self._scopes: list[LayerScope] = []

    def _enter(self, i: int, block: nn.Module, args: tuple) -> None:
        resident = _resident_ptrs(self.model) | _resident_ptrs(block)
        self._scopes.append(LayerScope(_BlockCall(self, i, resident)))

    def _exit(self, i: int, block: nn.Module, args: tuple, out: Any) -> None:
        self._scopes.pop().close()

    def __enter__(self) -> Self:
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(functools.partial(self._enter, i)))
            self._hooks.append(block.register_forward_hook(functools.partial(self._exit, i), always_call=True,
                                                          prepend=True))  # inner layer: leaves first
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def total(self) -> int:
        """Saved activation bytes over all blocks."""
        return sum(self.bytes_by_block.values())
