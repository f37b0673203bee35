"""DeepSpeed's `TopKGate` made to follow a routing workload (Zipf quotas, drift, recorded traces).

The workloads of `sparsetrain.model.workloads` choose each token's experts by quota routing inside our router;
DeepSpeed's gate picks its own argmax. `WorkloadTopKGate` applies the same quotas to DeepSpeed's gate by
wrapping its input: the logits of the experts the workload did not choose for a token are masked to -inf,
and DeepSpeed's own `top1gating`/`top2gating` then run unchanged on the masked logits. So capacity,
slot locations, drops (first choices before second), renormalization and the dropless padding all stay
DeepSpeed's. What the mask would change is restored from the unmasked softmax:
- top-2 combine weights p1/(p1+p2) do not depend on the other logits (value and gradient unchanged);
- top-1 combine weight: the masked softmax gives 1, so it is scaled by the unmasked probability p1;
- the aux loss: DeepSpeed's own formula, E * sum_e mean(gates)_e * mean(first choice == e), on the
  unmasked gates (the masked ones would make it a constant-ish 1).
Without a workload the gate is DeepSpeed's, untouched. Imports DeepSpeed: only the adapter imports this.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate, top1gating, top2gating

from sparsetrain.model.workloads import RoutingWorkload


class RoutingState:
    """What the trainer sets on `moe.router` (the step) and what the gate reads (workload, layer, group)."""

    def __init__(self, workload: RoutingWorkload | None, layer_index: int) -> None:
        self.workload, self.layer_index = workload, layer_index
        self.step = 0  # set by GPT.set_routing_step each step
        self.group = 0  # tokens per sequence of the current forward (the DeepSpeed block sets it)

    def update_bias(self) -> None:
        """No-op: DeepSpeed's gate has no aux-loss-free bias."""


def workload_gating(logits: torch.Tensor, expert_ids: torch.Tensor, k: int, capacity_factor: float,
                    min_capacity: int, drop_tokens: bool, ep_group: Any) -> tuple:
    """DeepSpeed's sparse-route gating (l_aux, capacity, E, ids [k, T], locations [k, T], gates [k, T], counts)
    for logits [T, E] with each token's experts fixed to expert_ids [T, k] (best gate score first)."""
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, expert_ids, True)  # [T, E]
    masked = logits.masked_fill(~chosen, float("-inf"))
    if k == 1:
        out = top1gating(masked, capacity_factor, min_capacity, None, None, drop_tokens, False, ep_group,
                         sparse_routes=True)
    else:
        out = top2gating(masked, capacity_factor, min_capacity, drop_tokens, ep_group,
                         top2_2nd_expert_sampling=False, sparse_routes=True)
    _, capacity, num_experts, ids, locations, gates, counts = out
    probs = F.softmax(logits, dim=1)  # [T, E] the gate's own probabilities
    if k == 1:
        gates = gates * probs.gather(1, expert_ids[:, :1]).t()  # [1, T]: DeepSpeed's top-1 weight is p1
    first = F.one_hot(expert_ids[:, 0], num_experts).float()  # [T, E]
    l_aux = num_experts * (probs.mean(dim=0) * first.mean(dim=0)).sum()
    return l_aux, capacity, num_experts, ids, locations, gates, counts


class WorkloadTopKGate(TopKGate):
    """`TopKGate` whose experts per token come from the routing workload (when one is configured)."""

    def __init__(self, state: RoutingState, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.state = state

    def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False) -> tuple:
        """input [T, d] -> DeepSpeed's gate output (MOELayer asks for sparse routes)."""
        s = self.state
        if s.workload is None:
            return super().forward(input, used_token, sparse_routes, use_tutel)
        if self.k not in (1, 2) or used_token is not None or not sparse_routes or use_tutel:
            raise NotImplementedError("routing workloads on DeepSpeed's gate: top_k 1 or 2, sparse routes, "
                                      "no used_token mask, no Tutel")
        logits = F.linear(input.float(), self.wg.weight.float())  # [T, E], as TopKGate computes them
        with torch.no_grad():
            ids = s.workload.route(logits.softmax(dim=-1), s.layer_index, s.step, s.group or input.shape[0])
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return workload_gating(logits, ids, self.k, cf, self.min_capacity, self.drop_tokens, self.ep_group)
