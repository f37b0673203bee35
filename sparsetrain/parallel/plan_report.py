"""`sparsetrain plan`: per-rank memory and the initial FSSDP placement, computed without training."""
from __future__ import annotations

import torch

from sparsetrain.config import Config
from sparsetrain.parallel.placement import LayerPlacement, initial_owners
from sparsetrain.parallel.planners import get_planner
from sparsetrain.parallel.topology import Topology
from sparsetrain.sim.workload import zipf_loads


def _gib(n: float) -> str:
    return f"{n / 2**30:8.3f}"


def layer_sizes(cfg: Config) -> tuple[int, int, int]:
    """(dense params, params of one expert, number of MoE layers) from the config alone."""
    m, e = cfg.model, cfg.moe
    n_moe = sum(1 for i in range(m.n_layers) if m.moe_every == 1 or i % m.moe_every == m.moe_every - 1)
    d_dense = m.d_ffn_dense or 4 * m.d_model
    attn = 4 * m.d_model * m.d_model + 2 * m.d_model
    dense = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.d_model
    dense += m.n_layers * attn + (m.n_layers - n_moe) * 3 * m.d_model * d_dense + n_moe * m.d_model * e.num_experts
    return dense, 3 * m.d_model * e.d_ffn, n_moe


def initial_placement(cfg: Config, world: int) -> tuple[Topology, list[int], LayerPlacement, torch.Tensor]:
    """First-step placement: loads uniform, or Zipf(moe.router_skew) when the skew knob is set."""
    topo = Topology.from_env(world, cfg.parallel.pretend_nodes if world > 1 else 0)
    e = cfg.moe.num_experts
    loads = zipf_loads(e, cfg.moe.router_skew) if cfg.moe.router_skew > 0 else torch.full((e,), 1.0 / e)
    owners = initial_owners(e, world)
    f = cfg.parallel.fssdp
    budget = f.overlap_budget if f.overlap_budget >= 0 else f.slots_per_rank
    placement = get_planner(f.planner)(loads, owners, topo, f.slots_per_rank, budget)
    return topo, owners, placement, loads


def plan_report(cfg: Config) -> str:
    """Text report: parameter/optimizer bytes per rank under FSSDP and the first placement of layer 0."""
    world = cfg.launch.workers
    bytes_p = 2 if cfg.train.precision == "bf16" else 4
    dense, per_expert, n_moe = layer_sizes(cfg)
    topo, owners, placement, loads = initial_placement(cfg, world)
    lines = [(f"FSSDP plan: {world} ranks ({topo.num_nodes} nodes x {topo.ranks_per_node}), "
             f"{cfg.moe.num_experts} experts x {n_moe} MoE layers, planner {cfg.parallel.fssdp.planner}, "
             f"slots/rank {cfg.parallel.fssdp.slots_per_rank}"),
             (f"dense params {dense:,} (FSDP2-sharded), one expert {per_expert:,} params "
             f"({per_expert * bytes_p / 2**20:.2f} MiB per chunk)"), "",
             "rank  owned  copies  params GiB  grads GiB  adam GiB  copies GiB  total GiB"]
    extra = placement.extra_count(world)
    for r in range(world):
        owned = owners.count(r)
        p = dense / world + owned * per_expert * n_moe
        copies = extra[r] * per_expert * bytes_p  # one layer's copies live at a time (released after use)
        total = p * (bytes_p + 4 + 8) + copies
        lines.append(f"{r:>4}  {owned:>5}  {extra[r]:>6}  {_gib(p * bytes_p)}    {_gib(p * 4)}  {_gib(p * 8)}"
                     f"    {_gib(copies)}   {_gib(total)}")
    lines += ["", "initial placement (layer 0; every layer starts the same):", "expert  load   owner  copies"]
    order = torch.argsort(loads, descending=True, stable=True).tolist()
    for e in order:
        lines.append(f"{e:>6}  {float(loads[e]):.3f}  {placement.owners[e]:>5}  {list(placement.copies[e])}")
    chunk = per_expert * bytes_p
    lines.append(f"\nspAG bytes per MoE layer: {placement.spag_bytes(chunk) / 2**20:.2f} MiB "
                 f"(all-gather of every expert: {chunk * cfg.moe.num_experts * (world - 1) / 2**20:.2f} MiB)")
    return "\n".join(lines)
