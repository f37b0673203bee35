"""The trainer's cross-rank numbers: one fused all-reduce per step, one all-gather on log steps only.

The per-step reduction (losses and flags averaged, squared gradient norm and routed counts summed, in one
all-reduce, or riding at the end of the dense gradient all-reduce under parallel.dense=ddp) lives in the
parallel layer (`sparsetrain.parallel.step_reduce`, re-exported here); this module adds the log-step gather.
"""
from __future__ import annotations

from typing import Any

from sparsetrain.parallel.comm import all_gather_host
from sparsetrain.parallel.step_reduce import StepReduction, fused_reduce_step, grad_sq, reduce_step
from sparsetrain.telemetry.memory import PeakMemory
from sparsetrain.telemetry.timers import TIMERS

__all__ = ["StepReduction", "fused_reduce_step", "grad_sq", "log_step_metrics", "reduce_step"]


def log_step_metrics(strategy: Any, memory: PeakMemory, comm: dict[str, float], world: int) -> dict[str, Any]:
    """Everything the log line needs from other ranks, in ONE collective on log steps only: bytes sent
    per collective (`comm`: this rank's per step, summed over ranks; FSSDP's ownership moves as `reshard`),
    span times (max), expert busy time (max/mean), peak memory per rank and the strategy's own per-rank
    numbers. `ranks` keeps each rank's values (busy CPU ms of attention / experts, wall ms of every span,
    routed slots, MiB sent per collective kind): what `sparsetrain sim calibrate` fits and `sparsetrain report`
    draws."""
    byte_names = ("spag", "sprs", "all_to_all", "reshard")
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
    ranks.update({f"{n}_sent_MB": allv[:, i] / 2**20 for i, n in enumerate(byte_names)})
    ranks.update({"attention_cpu_ms": per_rank["attention_cpu"] * 1000, "tokens": per_rank["rank_tokens"],
                  "experts_cpu_ms": per_rank["experts_cpu"] * 1000})
    out["ranks"] = {k: [round(v, 4) for v in t.tolist()] for k, t in ranks.items()}
    return out
