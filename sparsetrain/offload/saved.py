"""One saved-tensor hook stack for everything that changes how autograd keeps activations.

PyTorch applies only the innermost `torch.autograd.graph.saved_tensors_hooks` pair. Activation offload
(entered per block) and FSSDP's release of gathered expert chunks (entered per MoE layer, inside the
block) both need to see saved tensors; with two independent pairs the inner one silently hid every
tensor from the outer one. So both push a *layer* here: every pair this module enters runs the whole
stack, innermost layer first, and a layer either claims a tensor (returns its payload) or passes it on
(returns `PASS`) to the next outer layer; a tensor nobody claims is kept as autograd would keep it.

Activation checkpointing (`sparsetrain.offload.checkpointing`) marks its regions here: inside one,
torch's checkpoint hooks are innermost and keep nothing but the region's inputs, so `saved_layer`
enters no pair there (one would replace checkpoint's and keep everything). Recomputation in backward
runs inside a region too; `recomputing()` tells side-effecting code (router statistics) it is a replay.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import torch

PASS = object()  # a layer's pack returns this for tensors it does not handle


class SavedTensorLayer(Protocol):
    """One participant of the stack (offload controller, FSSDP chunk release, activation meter)."""

    def pack(self, t: torch.Tensor) -> Any:
        """Payload for `t`, or PASS to leave it to the next outer layer."""
        ...

    def unpack(self, payload: Any) -> torch.Tensor:
        """The tensor for a payload this layer's pack returned."""
        ...


class _Claimed:
    """What autograd holds for a tensor a layer claimed: the layer and its payload."""

    __slots__ = ("layer", "payload")

    def __init__(self, layer: SavedTensorLayer, payload: Any) -> None:
        self.layer, self.payload = layer, payload


class _State(threading.local):
    def __init__(self) -> None:
        self.layers: list[SavedTensorLayer] = []
        self.checkpoint_depth = 0
        self.recompute_depth = 0


_STATE = _State()


def _pack(layers: tuple[SavedTensorLayer, ...], t: torch.Tensor) -> Any:
    for layer in reversed(layers):  # innermost first
        payload = layer.pack(t)
        if payload is not PASS:
            return _Claimed(layer, payload)
    return t.detach()  # never t itself: a saved output would form an uncollectable C++ cycle


def _unpack(saved: Any) -> torch.Tensor:
    return saved.layer.unpack(saved.payload) if isinstance(saved, _Claimed) else saved


@contextlib.contextmanager
def saved_layer(layer: SavedTensorLayer) -> Iterator[bool]:
    """Push `layer` for the tensors saved inside the block; yields False (and does nothing) inside a
    checkpointed region, where checkpoint's own hooks must stay innermost."""
    if _STATE.checkpoint_depth:
        yield False
        return
    layers = _STATE.layers
    layers.append(layer)
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t, stack=tuple(layers): _pack(stack, t), _unpack):
            yield True
    finally:
        layers.pop()


class LayerScope:
    """Enter/exit a layer from separate calls (module forward pre-hook / forward hook)."""

    def __init__(self, layer: SavedTensorLayer) -> None:
        self._cm = saved_layer(layer)
        self.active = self._cm.__enter__()

    def close(self) -> None:
        """Leave the layer (idempotent per scope: call once)."""
        self._cm.__exit__(None, None, None)


def active_layers() -> tuple[SavedTensorLayer, ...]:
    """The layers in force on this thread, outermost first (for tests and diagnostics)."""
    return tuple(_STATE.layers)


@contextlib.contextmanager
def checkpoint_region(recompute: bool) -> Iterator[None]:
    """Mark a checkpointed forward (recompute=False) or its replay in backward (recompute=True)."""
    _STATE.checkpoint_depth += 1
    _STATE.recompute_depth += int(recompute)
    try:
        yield
    finally:
        _STATE.checkpoint_depth -= 1
        _STATE.recompute_depth -= int(recompute)


def in_checkpoint() -> bool:
    """Whether this thread runs inside a checkpointed region (forward or recompute)."""
    return _STATE.checkpoint_depth > 0


def recomputing() -> bool:
    """Whether this thread replays a checkpointed region during backward."""
    return _STATE.recompute_depth > 0
