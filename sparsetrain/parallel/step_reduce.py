"""The per-step cross-rank numbers in one collective: losses and flags averaged over ranks, the squared gradient
norm and the routed counts summed over ranks, as one fp64 all-reduce (`reduce_step`); on one rank nothing is
sent. With parallel.dense=ddp (dp, ep, fssdp: `Strategy.reduce_step_fused`) they ride instead at the end of the
flat fp32 dense gradient all-reduce (`fused_reduce_step`), so a step issues that one all-reduce, as a minimal
DDP loop does (EP adds only its all-to-alls). The parallel layer's: strategies call it, the trainer too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparsetrain.parallel.comm import is_dist, to_comm

__all__ = ["StepReduction", "fused_reduce_step", "grad_sq", "reduce_step"]


@dataclass
class StepReduction:
    stats: torch.Tensor  # [n] the per-rank stats averaged over ranks (CPU, fp64)
    grad_sq: torch.Tensor | None  # () squared global gradient norm (CPU, fp64), when a local share was given
    counts: torch.Tensor | None  # [L_moe, E] routed slots summed over ranks (CPU, fp64), when counts were given


def reduce_step(stats: torch.Tensor, grad_sq: torch.Tensor | None, counts: torch.Tensor | None,
                world: int) -> StepReduction:
    """Mean of `stats` [n], sum of `grad_sq` () and `counts` [L, E] over ranks, in ONE all-reduce."""
    parts = [stats.detach().reshape(-1)] + ([grad_sq.reshape(1)] if grad_sq is not None else []) \
        + ([counts.detach().reshape(-1)] if counts is not None else [])
    dev = stats.device
    flat = torch.cat([p.to(dev, torch.float64) for p in parts])  # [n (+1) (+L*E)]
    if is_dist() and world > 1:
        flat = to_comm(flat)
        dist.all_reduce(flat)
    flat = flat.cpu()
    n = stats.numel()
    out_sq = flat[n] if grad_sq is not None else None
    off = n + (1 if grad_sq is not None else 0)
    out_counts = flat[off:].view(counts.shape) if counts is not None else None  # [L*E] -> [L, E]
    return StepReduction(flat[:n] / world, out_sq, out_counts)


def grad_sq(grads: list[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm (fp64 scalar) of a list of gradients: one fused pass per dtype, no fp64 grad copies."""
    sq = torch.zeros((), dtype=torch.float64)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        sq += torch.stack(torch._foreach_norm(same)).to(torch.float64).pow(2).sum().cpu()
    return sq


def fused_reduce_step(grads: list[torch.Tensor], world: int, stats: torch.Tensor, sq_to_sum: torch.Tensor | None,
                      counts: torch.Tensor | None) -> StepReduction:
    """The dense gradients' averaging all-reduce and `reduce_step`'s numbers in ONE all-reduce over all ranks:
    the numbers ride at the end of the flat fp32 gradient buffer (what the minimal DDP loop sends, plus a few
    floats). grads: fp32, summed then divided by `world` in place; `sq_to_sum`: this rank's share of the squared
    norm of gradients the all-reduce does not average (summed; the caller adds the averaged ones' norm after)."""
    parts = [stats.detach().reshape(-1)] + ([sq_to_sum.reshape(1)] if sq_to_sum is not None else []) \
        + ([counts.detach().reshape(-1)] if counts is not None else [])
    dev = grads[0].device
    tail = torch.cat([p.to(dev, torch.float32) for p in parts])  # [n (+1) (+L*E)]
    flat = to_comm(torch.cat([g.reshape(-1) for g in grads] + [tail]))  # [sum numel + tail]
    dist.all_reduce(flat)
    body, summed = flat[:-tail.numel()], flat[-tail.numel():].to("cpu", torch.float64)
    body /= world
    torch._foreach_copy_(grads, [c.view_as(g) for c, g in zip(body.split([g.numel() for g in grads]), grads)])
    n = stats.numel()
    out_sq = summed[n] if sq_to_sum is not None else None
    off = n + (1 if sq_to_sum is not None else 0)
    out_counts = summed[off:].view(counts.shape) if counts is not None else None  # [L*E] -> [L, E]
    return StepReduction(summed[:n] / world, out_sq, out_counts)
