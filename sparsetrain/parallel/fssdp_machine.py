"""FSSDP's machine numbers, fixed once per run: link bandwidth, expert throughput, overlap budget, copy cost.

Each is the config's value, the device default (`copy_cost.DEVICE_DEFAULTS`) when 0, or measured once at
set-up when -1 (`parallel.fssdp.link_GBps` / `expert_TFLOPs`; all ranks take the slowest rank's number; a
resumed job restores the measurement from its checkpoint instead of measuring again). Nothing is re-timed
during training, so the placement is a deterministic function of the seed, the config and these numbers.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from sparsetrain.model.experts import GroupedExperts
from sparsetrain.parallel.comm import all_reduce_host
from sparsetrain.parallel.copy_cost import (
    DEVICE_DEFAULTS,
    CopyCost,
    attention_flops_per_token,
    expert_flops_per_slot,
    measure_expert_flops,
    overlap_budget_from_model,
)
from sparsetrain.parallel.placement import LayerPlacement, initial_owners
from sparsetrain.parallel.sparse_collectives import spag
from sparsetrain.telemetry.comm import COMM

__all__ = ["measure_bandwidth", "set_machine_numbers"]

FSSDPStrategy = Any  # sparsetrain.parallel.fssdp.FSSDP, not imported: it imports this module


def set_machine_numbers(s: FSSDPStrategy, experts: GroupedExperts, measured: dict[str, float] | None = None) -> None:
    """Fix, once, the bandwidth, expert throughput, overlap budget and copy cost for the whole run
    (`measured`: numbers an earlier run of this job measured, restored from its checkpoint)."""
    f, cfg, measured = s.fcfg, s.cfg, measured or {}
    intra, inter, tflops = DEVICE_DEFAULTS["cuda" if s.info.device.type == "cuda" else "cpu"]
    if f.link_GBps < 0:
        s.bandwidth = measured.get("bandwidth") or measure_bandwidth(s, experts)
    else:
        s.bandwidth = 1e9 * (f.link_GBps or (inter if s.topo.num_nodes > 1 else intra))
    m = cfg.model
    tokens = cfg.data.batch_size * m.seq_len // (s.info.world * cfg.train.grad_accum)  # per micro-batch
    if f.expert_TFLOPs < 0:  # the slowest rank's, so every rank gates with the same number
        s.expert_flops = measured.get("expert_flops") or float(all_reduce_host(
            [measure_expert_flops(experts, tokens * cfg.moe.top_k, s.wire_dtype(experts), device=s.info.device)],
            s.group, op=dist.ReduceOp.MIN)[0])
    else:
        s.expert_flops = 1e12 * (f.expert_TFLOPs or tflops)
    if f.overlap_budget < 0:  # attention time of one block x bandwidth / chunk bytes
        s.overlap_budget = overlap_budget_from_model(
            tokens * attention_flops_per_token(m.d_model, m.seq_len), s.expert_flops, s.bandwidth,
            s.chunk_bytes, cfg.moe.num_experts)
    if f.cost_gate:
        s.cost = CopyCost(s.chunk_bytes, expert_flops_per_slot(experts.d_model, experts.d_ffn), s.expert_flops,
                          s.bandwidth, 2 if f.keep_materialized else 3, s.overlap_budget)


def measure_bandwidth(s: FSSDPStrategy, experts: GroupedExperts) -> float:
    """Time one spAG in a ring (each rank's first owned chunk to the next rank: one extra chunk per rank,
    never a whole layer); all ranks agree on the slowest."""
    e, world = experts.num_experts, s.info.world
    owners = initial_owners(e, world)
    firsts = {owners.index(r): r for r in range(world) if r in owners}  # expert -> its owner
    copies = [sorted({o, (o + 1) % world}) if x in firsts else [o] for x, o in enumerate(owners)]
    probe = LayerPlacement.from_lists(owners, copies)
    owners, copies = list(probe.owners), [list(c) for c in probe.copies]
    with torch.no_grad():
        rows = torch.zeros(len(probe.owned_by(s.info.rank)), s.chunk_numel, device=s.info.device,
                           dtype=s.wire_dtype(experts))
        dist.barrier(s.group)
        t0 = time.perf_counter()
        spag(rows, probe.owned_by(s.info.rank), owners, copies, s.group)
        if rows.is_cuda:
            torch.cuda.synchronize(rows.device)
        dt = all_reduce_host([time.perf_counter() - t0], s.group, op=dist.ReduceOp.MAX)
    COMM.reset()
    return probe.spag_bytes(s.chunk_bytes) / s.info.world / max(float(dt[0]), 1e-9)
