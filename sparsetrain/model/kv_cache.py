"""Key/value cache for incremental decoding: each new token runs one position through the model.

One buffer per layer [B, H, max_len, head_dim]. `GPT.forward(idx, cache=cache)` feeds positions
`cache.pos .. cache.pos + S - 1`: attention writes their keys/values into the cache and attends over
everything cached so far; RoPE tables are offset by `cache.pos`. The MoE layers need nothing: routing
and experts act on each token independently (dropless), so a cached step equals the full forward.
"""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for the positions seen so far (`pos` of them)."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len, self.pos = max_len, 0

    def layer(self, index: int) -> LayerKV:
        return LayerKV(self, index)

    def advance(self, n: int) -> None:
        """Mark n more positions as cached (the model calls this after all layers wrote them)."""
        self.pos += n

    def reset(self) -> None:
        self.pos = 0


class LayerKV:
    """One layer's view of a KVCache: append this step's keys/values, read all cached ones."""

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache, self.index = cache, index

    @property
    def pos(self) -> int:
        return self.cache.pos

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, H, S, hd] of positions pos..pos+S-1 -> all cached keys, values [B, H, pos+S, hd]."""
        c, end = self.cache, self.cache.pos + k.shape[2]
        if end > c.max_len:
            raise ValueError(f"KV cache holds {c.max_len} positions; {c.pos} cached + {k.shape[2]} new exceed it")
        c.k[self.index, :, :, c.pos:end] = k
        c.v[self.index, :, :, c.pos:end] = v
        return c.k[self.index, :, :, :end], c.v[self.index, :, :, :end]
