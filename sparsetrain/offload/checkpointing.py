"""Activation checkpointing (`train.activation_checkpointing: none | full | selective`) as a model pass.

- full: every transformer block is recomputed in backward; it keeps only its input `x` between forward
  and backward (RoPE tables are buffers).
- selective: every block's FFN is recomputed — the router and the experts of an MoE layer (or the dense
  MLP) — and the attention path is kept: attention's and the norms' saved tensors stay, the FFN keeps only
  its input (the `ffn_norm` output). MoE FFNs hold most of a block's activations (k copies of every token,
  d_ffn-wide hidden states) at little FLOP cost relative to attention's saved softmax inputs.

Regions run non-reentrant `torch.utils.checkpoint` with early stop off, so a replay runs the whole region
on every rank: collectives inside (EP all-to-all, FSSDP spAG, the count all-reduce) are issued in the same
order everywhere. Under FSSDP the replay gathers the layer's copies again through spAG (counted in the
spAG bytes); nothing is released or re-gathered by FSSDP's own hooks inside a region (see offload.saved).
The forward override is an instance attribute: the model file is unchanged and `uncheckpoint_module` undoes it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsetrain.offload.saved import checkpoint_region

MODES = ("none", "full", "selective")
_INNER = "_sparsetrain_checkpoint_inner"  # instance attribute: the forward being checkpointed


def checkpoint_module(module: nn.Module) -> bool:
    """Recompute `module` in backward (instance-level forward override); False if it already is."""
    if _INNER in module.__dict__:
        return False
    prev = module.__dict__.get("forward")  # an instance override to restore later, else None
    inner = module.forward
    object.__setattr__(module, _INNER, (inner, prev))

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # eval / no_grad: nothing is saved, nothing to recompute
            return inner(*args, **kwargs)
        replay = [False]

        def run(*a: Any, **k: Any) -> Any:
            with checkpoint_region(recompute=replay[0]):
                replay[0] = True  # the next call of run is the backward replay
                return inner(*a, **k)

        from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

        with set_checkpoint_early_stop(False):  # replays run whole on every rank (collectives inside)
            return checkpoint(run, *args, use_reentrant=False, **kwargs)

    module.forward = forward  # type: ignore[method-assign]
    return True


def uncheckpoint_module(module: nn.Module) -> None:
    """Undo checkpoint_module (no-op when the module is not checkpointed)."""
    saved = module.__dict__.pop(_INNER, None)
    if saved is None:
        return
    _inner, prev = saved
    if prev is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = prev  # type: ignore[method-assign]


def is_checkpointed(module: nn.Module) -> bool:
    """Whether checkpoint_module is in force on this module."""
    return _INNER in module.__dict__


def checkpoint_targets(model: nn.Module, mode: str) -> list[nn.Module]:
    """The modules `mode` recomputes: blocks (full), each block's FFN (selective), none."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing={mode!r}; allowed: {', '.join(MODES)}")
    if mode == "none":
        return []
    from sparsetrain.offload.activation import find_blocks

    blocks = find_blocks(model)
    return blocks if mode == "full" else [b.ffn for b in blocks]


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint the modules `mode` selects (see the module docstring); returns the model."""
    for mod in checkpoint_targets(model, mode):
        checkpoint_module(mod)
    return model
