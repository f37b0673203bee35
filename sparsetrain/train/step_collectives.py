"""The trainer's cross-rank numbers: one fused all-reduce per step, one all-gather on log steps only.

Per step the trainer needs the losses and flags averaged over ranks, the squared gradient norm summed
over ranks and (when the forward did not already reduce them) the routed counts summed over ranks. They
travel as one fp64 vector in one collective; on one rank nothing is sent. With parallel.dense=ddp (dp, ep,
fssdp: `Strategy.reduce_step_fused`) they ride instead at the end of the flat fp32 dense gradient all-reduce, so
a step issues that one all-reduce, as a minimal DDP loop does (EP adds only its all-to-alls).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sparsetrain.parallel.comm import all_gather_host, is_dist, to_comm
from sparsetrain.telemetry.memory import PeakMemory
from sparsetrain.telemetry.timers import TIMERS

__all__ = ["StepReduction", "fused_reduce_step", "grad_sq", "log_step_metrics", "reduce_step"]


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


def log_step_metrics(strategy: Any, memory: PeakMemory, comm: dict[str, int], world: int) -> dict[str, Any]:
    """Everything the log line needs from other ranks, in ONE collective on log steps only: bytes sent
    per collective (summed), span times (max), expert busy time (max/mean), peak memory per rank and
    the strategy's own per-rank numbers. `ranks` keeps each rank's values (busy CPU ms of attention /
    experts, wall ms of every span, routed slots): what `sparsetrain sim calibrate` fits and
    `sparsetrain report` draws."""
    byte_names = ("spag", "sprs", "all_to_all")
    span_names = ("attention", "dispatch", "experts", "combine", "optimizer", "spag_wait", "sprs")
    wall, cpu = TIMERS.pop()
    local = {"attention_cpu": cpu.get("attention", 0.0), "experts_cpu": cpu.get("experts", 0.0),
             "peak_memory_mib": memory.peak_mib(), "rank_tokens": 0.0, **strategy.local_log_values()}
    row = [float(comm.get(n, 0)) for n in byte_names] + [wall.get(n, 0.0) for n in span_names] + list(local.values())
    allv = all_gather_host(row)  # [world, len(row)]
    nb, ns = len(byte_names), len(span_names)
    sums = {n: int(v) for n, v in zip(byte_names, allv[:, :nb].sum(0).tolist())}
    per_rank = {k: allv[:, nb + ns + i] for i, k in enumerate(local)}
    out: dict[str, Any] = strategy.step_metrics(sums, per_rank)
    for n, v in zip(span_names[:5], allv[:, nb:nb + 5].max(0).values.tolist()):
        out[f"t_{n}_ms"] = 1000 * v
    if world > 1:
        busy = per_rank["experts_cpu"]
        out["expert_busy_max_mean"] = float(busy.max() / busy.mean().clamp_min(1e-12))
    out["peak_memory_mib"] = [round(v, 1) for v in per_rank["peak_memory_mib"].tolist()]
    ranks = {f"{n}_ms": allv[:, nb + i] * 1000 for i, n in enumerate(span_names)}
    ranks.update({"attention_cpu_ms": per_rank["attention_cpu"] * 1000, "tokens": per_rank["rank_tokens"],
                  "experts_cpu_ms": per_rank["experts_cpu"] * 1000})
    out["ranks"] = {k: [round(v, 4) for v in t.tolist()] for k, t in ranks.items()}
    return out
