"""`sparsetrain plan`: per-rank memory (what a run holds) and the initial FSSDP placement, without training."""
from __future__ import annotations

import json

import torch

from sparsetrain.config import Config
from sparsetrain.parallel.memory_plan import MemoryPlan, initial_placement, memory_plan
from sparsetrain.telemetry.flops import model_size

__all__ = ["initial_placement", "layer_sizes", "plan_json", "plan_report"]

GIB = 2**30
COLUMNS = (("params", "params"), ("grads", "grads"), ("optimizer", "adam"), ("compute_copies", "bf16 cp"),
           ("gathered_dense", "fsdp ag"), ("gathered_experts", "copies"), ("copy_grads", "copy gr"),
           ("activations", "acts"), ("backward_transient", "bwd tmp"), ("comm_buffers", "comm"),
           ("host_data", "data"))


def layer_sizes(cfg: Config) -> tuple[int, int, int]:
    """(dense params, params of one expert, number of MoE layers) from the config alone."""
    size = model_size(cfg)
    return size.dense, size.per_expert, size.n_moe


def _memory_table(plan: MemoryPlan) -> list[str]:
    head = "rank  " + "".join(f"{label:>9}" for _, label in COLUMNS) + "   peak GiB  (phase)"
    title = (f"memory per rank (GiB; {plan.device}, {plan.precision}, {plan.strategy}, "
             f"{plan.tokens_per_micro_batch} tokens per micro-batch per rank):")
    lines = [title, head]
    for r in plan.ranks:
        cells = "".join(f"{getattr(r, k) / GIB:9.3f}" for k, _ in COLUMNS)
        phase = max(r.phases, key=r.phases.get)
        lines.append(f"{r.rank:>4}  {cells}   {r.peak / GIB:8.3f}  ({phase})")
    worst = plan.max_mib / 1024
    lines.append(f"largest rank: {worst:.2f} GiB; fits 80 GiB with 10% headroom: {'yes' if plan.fits(80) else 'NO'}")
    off = max(r.offloaded for r in plan.ranks)
    if off:
        lines.append(f"activations offloaded to host per rank: {off / GIB:.3f} GiB (pinned host memory)")
    return lines


def plan_report(cfg: Config) -> str:
    """Text report: every rank's memory by kind and peak, then the first FSSDP placement of layer 0."""
    world = cfg.launch.workers
    act_bytes = 2 if cfg.train.precision == "bf16" else 4
    dense, per_expert, n_moe = layer_sizes(cfg)
    topo, _owners, placement, loads = initial_placement(cfg, world)
    lines = [(f"{cfg.parallel.strategy} plan: {world} ranks ({topo.num_nodes} nodes x {topo.ranks_per_node}), "
              f"{cfg.moe.num_experts} experts x {n_moe} MoE layers, planner {cfg.parallel.fssdp.planner}, "
              f"slots/rank {cfg.parallel.fssdp.slots_per_rank}"),
             (f"dense params {dense:,} (FSDP2-sharded), one expert {per_expert:,} params "
              f"({per_expert * act_bytes / 2**20:.2f} MiB per chunk in {cfg.train.precision})"), ""]
    lines += _memory_table(memory_plan(cfg))
    lines += ["", "initial placement (layer 0; every layer starts the same):", "expert  load   owner  copies"]
    order = torch.argsort(loads, descending=True, stable=True).tolist()
    for e in order:
        lines.append(f"{e:>6}  {float(loads[e]):.3f}  {placement.owners[e]:>5}  {list(placement.copies[e])}")
    chunk = per_expert * act_bytes
    lines.append(f"\nspAG bytes per MoE layer: {placement.spag_bytes(chunk) / 2**20:.2f} MiB "
                 f"(all-gather of every expert: {chunk * cfg.moe.num_experts * (world - 1) / 2**20:.2f} MiB)")
    from sparsetrain.offload.accounting import activation_plan_lines

    lines += activation_plan_lines(cfg, world)
    return "\n".join(lines)


def plan_json(cfg: Config) -> str:
    """The same numbers as JSON: `memory_mib_per_rank`, each rank's breakdown (bytes), model size."""
    plan = json.loads(memory_plan(cfg).to_json())
    size = model_size(cfg)
    plan.update(params_total=size.total, params_active=size.active,
                fits_80gib_10pct_headroom=memory_plan(cfg).fits(80))
    return json.dumps(plan, indent=1)
