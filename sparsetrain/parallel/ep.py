"""Expert parallelism: a static partition of experts over the EP group, all-to-all dispatch/combine."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparsetrain.model.experts import EXPERT_WEIGHTS, GroupedExperts
from sparsetrain.model.gpt import GPT
from sparsetrain.model.router import RouterOutput
from sparsetrain.parallel.mesh import DistInfo
from sparsetrain.parallel.strategy import Strategy, expert_modules
from sparsetrain.parallel.token_exchange import exchange_and_compute


def keep_expert_rows(experts: GroupedExperts, ids: list[int]) -> None:
    """Replace stacked weights by the rows of `ids` (fresh Parameters) and record the global ids."""
    index = torch.tensor(ids, dtype=torch.long, device=experts.w1.device)
    for name in EXPERT_WEIGHTS:
        full = getattr(experts, name)
        setattr(experts, name, nn.Parameter(full.detach().index_select(0, index).clone()))  # [len(ids), out, in]
    experts.expert_ids = list(ids)


class EPDispatcher:
    """Slots go to the EP-group rank owning their expert (`parallel.ep_placement` decides the owners)."""

    def __init__(self, strategy: ExpertParallel, layer: int) -> None:
        self.s, self.layer = strategy, layer

    def __call__(self, experts: GroupedExperts, x: torch.Tensor, route: RouterOutput) -> tuple[torch.Tensor, int]:
        s = self.s
        owner = s.owner_table[self.layer]  # [E] EP-group rank of each expert, on the rank's device
        slot_rank = owner[route.expert_ids.reshape(-1)]  # [T*k]
        out, dropped, counts = exchange_and_compute(
            x, route, slot_rank, experts.num_experts, experts.expert_ids,
            experts.bind(ids=experts.expert_ids), s.ep_group, s.cfg.moe.capacity_factor,
            s.cfg.moe.capacity_renorm, s.cfg.moe.capacity_priority, sum_route_counts=s.ep_size == s.info.world,
            overlap=s.cfg.parallel.a2a_overlap)
        s.rank_tokens[self.layer] = float(counts.sum())
        return out, dropped


class ExpertParallel(Strategy):
    """Experts partitioned over contiguous EP groups; replicas across groups average expert grads."""

    name = "ep"
    fuses_step_reduction = True

    def __init__(self, cfg, info: DistInfo) -> None:
        super().__init__(cfg, info)
        self.ep_size = (cfg.parallel.ep_size or info.world) if info.world > 1 else 1
        self.experts_per_rank = cfg.moe.num_experts // self.ep_size
        self.ep_group = self.replica_group = None
        self.rank_tokens: dict[int, float] = {}
        self.owner_table: list[torch.Tensor] = []  # per MoE layer [E]: EP-group rank owning each expert

    def _groups(self) -> None:
        from sparsetrain.parallel.mesh import build_mesh

        mesh = build_mesh(self.info, self.ep_size)
        self.mesh = mesh
        self.ep_group = mesh["ep"].get_group()
        self.replica_group = mesh["dp"].get_group()  # size 1 when one EP group spans the world

    def apply(self, model: GPT) -> GPT:
        self.install_count_reducer(model)
        if self.info.world == 1:
            return model
        self._groups()
        ep_rank = dist.get_rank(self.ep_group)
        owners = self.static_owners(len(model.moe_layers()))
        for li, moe in enumerate(model.moe_layers()):
            self.owner_table.append(torch.tensor(owners[li], dtype=torch.long, device=self.info.device))  # once
            keep_expert_rows(moe.experts, [e for e, o in enumerate(owners[li]) if o == ep_rank])
            moe.dispatcher = EPDispatcher(self, li)
        self._expert_list = [p for _, m in expert_modules(model) for p in m.parameters()]  # same order on all ranks
        self._expert_params = set(self._expert_list)
        if self.cfg.parallel.dense == "fsdp2":
            from sparsetrain.parallel.dense import apply_dense_sharding

            apply_dense_sharding(model, self.info, ignored=self._expert_params, mp_policy=self.mp_policy(),
                                 reshard=self.cfg.parallel.fsdp_reshard_after_forward)
        return model

    def static_owners(self, num_layers: int) -> list[list[int]]:
        """Owner (EP-group rank) of each expert per MoE layer: contiguous blocks, or `balanced` for the
        routing workload's mean load over the run (the best static placement a careful EP user would pick)."""
        e = self.cfg.moe.num_experts
        if self.cfg.parallel.ep_placement == "contiguous":
            return [[x // self.experts_per_rank for x in range(e)] for _ in range(num_layers)]
        from sparsetrain.model.workloads import RoutingWorkload
        from sparsetrain.parallel.placement import balanced_owners

        workload = RoutingWorkload.from_config(self.cfg.moe)
        assert workload is not None  # config validation requires a workload for ep_placement=balanced
        loads = torch.stack([workload.mean_target(li, self.cfg.train.steps) for li in range(num_layers)])  # [L, E]
        return balanced_owners(loads, self.ep_size)

    def replication(self, name: str, p: torch.Tensor) -> int:
        if hasattr(p, "to_local"):
            return 1
        if p in getattr(self, "_expert_params", set()):
            return self.info.world // self.ep_size
        return self.info.world

    def finish_backward(self, model: GPT) -> None:
        """Expert grads hold the sum over the EP group's tokens; sum over replicas, divide by world."""
        if self.info.world == 1:
            return
        self.finish_own_grads(model)
        self.all_reduce_dense_grads(model, skip=self._expert_params)

    def own_grads(self) -> set[nn.Parameter]:
        return self._expert_params

    def finish_own_grads(self, model: GPT) -> None:
        from sparsetrain.parallel.dense import all_reduce_grads

        for p in self._expert_list:
            if p.grad is None:  # none of this rank's experts got a token: zero, as in one process (AdamW steps them;
                p.grad = torch.zeros_like(p)  # the replica all-reduce packs the same tensors on every replica)
        all_reduce_grads(self._expert_list, self.info.world, group=self.replica_group, dtype=self.allreduce_dtype())

    def step_metrics(self, comm: dict[str, int], per_rank: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"a2a_MB": comm.get("all_to_all", 0) / 2**20, **super().step_metrics(comm, per_rank)}

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "ep_size": self.ep_size, "experts_per_rank": self.experts_per_rank,
                "ep_placement": self.cfg.parallel.ep_placement}
