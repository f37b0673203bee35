"""Validation loss of a checkpoint on one process, as the run that saved it logged it.

Two things of the run decide what its logged val loss was, beyond the weights: the routing step (routing
workloads move their targets with it; the run evaluated after that step's training) and, in capacity mode
(moe.capacity_factor > 0), how the val batch was cut: each rank applied capacity to its own slice of it.
"""
from __future__ import annotations

from typing import Any

import torch

from sparsetrain.config import Config


def run_slices(cfg: Config, extra: dict[str, Any]) -> int:
    """Slices of each val batch the run computed apart: its world size in capacity mode, else 1 (dropless
    routing is per token, so the cut does not matter)."""
    if cfg.moe.capacity_factor <= 0:
        return 1
    saved = extra.get("config") if isinstance(extra.get("config"), dict) else {}
    launch, parallel = saved.get("launch") or {}, saved.get("parallel") or {}
    if parallel.get("strategy", "none") == "none":
        return 1
    return max(1, int(launch.get("workers", 1) or 1))


@torch.no_grad()
def val_loss(model: Any, data: Any, batches: int, slices: int = 1) -> float:
    """Mean validation cross entropy over `batches` fixed val batches, each computed as `slices` equal row slices
    (the ranks' shares) whose losses are averaged, as the trainer's all-reduced mean is."""
    total = 0.0
    for i in range(batches):
        x, y = data.val_batch(i)  # [B, S] each
        if x.shape[0] % slices:
            raise ValueError(f"val batch of {x.shape[0]} rows does not split into the run's {slices} ranks")
        total += sum(float(model(xs, ys).loss) for xs, ys in zip(x.chunk(slices), y.chunk(slices))) / slices
    return total / batches
