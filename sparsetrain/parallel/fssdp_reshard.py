"""When FSSDP re-shards expert ownership, and to which owners.

Scheduled (`fssdp.reshard_every` K): every K steps, owners fitted to the tracker's mean load (the last
`load_window` steps) replace the current ones when they balance the owned load by `RESHARD_GAIN` and, gate
on, the expert time they save over the next K steps beats the bytes their moves take (`copy_cost.reshard_net_s`,
judged step by step on the window).

Early (`fssdp.reshard_early`, off by default): between scheduled re-shards the routing may move to a new hot
set, and a window still averaging the old one keeps the old owners for up to K steps. So after every step,
owners fitted to the step before the last alone are judged on the last step, which they have not seen.
When that re-shard would have paid (held out; gate off: would have balanced it by RESHARD_GAIN), ownership
moves now, to owners fitted to the last step (which must pay on it too). A moved hot set is followed on
its second step. A cheap bound first skips the check when even a perfect balance of the last step could
not pay for moving one expert, and sampling noise around a fixed mean does not trigger it. Routing that
moves from step to step (recorded traces: step-to-step total variation 0.38-0.62) often does: replayed on
the recorded traces it re-shards 1.2-3x as often as the schedule alone for -0.6 to 3.4 points of balance,
about what the extra moves cost on a CPU machine (benchmarks/RESULTS.md, "Early re-shards").
"""
from __future__ import annotations

from typing import Any

import torch

from sparsetrain.model.experts import GroupedExperts
from sparsetrain.parallel.copy_cost import reshard_net_s
from sparsetrain.parallel.placement import reshard_owners_min_moves
from sparsetrain.parallel.reshard import moved_bytes_per_expert, reshard_balances
from sparsetrain.parallel.routing import rank_loads

__all__ = ["REPLICATE_EVERYWHERE", "early_target", "reshard_target", "scheduled_target", "target_after_step"]

REPLICATE_EVERYWHERE = ("hecate", "eplb")
FSSDPStrategy = Any  # sparsetrain.parallel.fssdp.FSSDP, not imported: it imports this module


def reshard_target(s: FSSDPStrategy, fit: torch.Tensor, judge: torch.Tensor, experts: GroupedExperts
                   ) -> tuple[list[list[int]] | None, bool]:
    """New owners fitted to loads `fit` [L, E] and judged on loads `judge` [n, L, E], or None; and whether the
    gate refused the best candidate. Candidates: the few-moves re-shard counting copies (planners that copy hot
    experts everywhere spread their load whatever the owner) and, gate on, the one balancing the owners alone;
    each must balance the owned load of `fit` by RESHARD_GAIN. Gate off: the first that also balances the mean
    of `judge`. Gate on: the one saving the
    most expert time net of its moves over `reshard_every` steps, if that is > 0."""
    replicas = s.placements if s.fcfg.planner in REPLICATE_EVERYWHERE else None
    ways = [replicas] if s.cost is None or replicas is None else [replicas, None]
    fitted = [(reshard_owners_min_moves(fit, s.owners, s.topo, r), r) for r in ways]  # memory = EP
    cands = [c for c, r in fitted if reshard_balances(fit, s.owners, c, s.info.world, r) and
             (s.cost is not None or reshard_balances(judge.mean(0), s.owners, c, s.info.world, r))]
    if s.cost is None or not cands:  # gate off: the imbalance test alone, on the judged loads too
        return (cands[0] if cands else None), False
    horizon = max(1, s.fcfg.reshard_every)
    plans = [[s._plan(fit[li], o[li], judge[:, li])[0] for li in range(s.num_layers)] for o in [s.owners, *cands]]
    nets = [reshard_net_s(judge, plans[0], p, s.topo, s.cost, moved_bytes_per_expert(experts), horizon)
            for p in plans[1:]]
    best = max(range(len(nets)), key=lambda i: (nets[i], -i))
    return (cands[best], False) if nets[best] > 0 else (None, True)


def scheduled_target(s: FSSDPStrategy, experts: GroupedExperts) -> list[list[int]] | None:
    """The scheduled re-shard: fitted to the window's mean, judged on its steps; refusals counted."""
    owners, refused = reshard_target(s, s.tracker.predicted(), s.tracker.recent(), experts)
    s.reshards_gated += refused
    return owners


def _could_pay(s: FSSDPStrategy, held: torch.Tensor, experts: GroupedExperts) -> bool:
    """Bound: every layer's busiest rank brought to the mean on the held-out step [1, L, E] for `reshard_every`
    steps, against moving a single expert."""
    per_rank = [rank_loads(held[0, li], p, s.topo) for li, p in enumerate(s.placements)]  # [world] each
    over = sum(float(r.max() - r.mean()) for r in per_rank)
    gain = max(1, s.fcfg.reshard_every) * over * s.cost.flops_per_slot / s.cost.flops_per_s
    return gain > moved_bytes_per_expert(experts) / s.cost.bytes_per_s


def early_target(s: FSSDPStrategy, experts: GroupedExperts) -> list[list[int]] | None:
    """The early re-shard (module docstring): owners fitted to the last step, when owners fitted to the step
    before would have paid on it (gate off: would have balanced it by RESHARD_GAIN); None otherwise."""
    recent = s.tracker.recent()  # [n, L, E], oldest first; n < 2 before two steps or with a window of 1
    if recent.shape[0] < 2:
        return None
    held = recent[-1:]  # [1, L, E]
    if s.cost is not None and not _could_pay(s, held, experts):
        return None
    if reshard_target(s, recent[-2], held, experts)[0] is None:
        return None
    return reshard_target(s, recent[-1], held, experts)[0]


def target_after_step(s: FSSDPStrategy, step: int, experts: GroupedExperts) -> tuple[list[list[int]] | None, bool]:
    """After `step` (its loads tracked): new owners or None, and whether they come from an early re-shard.
    Scheduled on every `reshard_every`-th step, early (when on) on the steps between; never when it is 0."""
    every = s.fcfg.reshard_every
    if not every:
        return None, False
    if (step + 1) % every == 0:
        return scheduled_target(s, experts), False
    new = early_target(s, experts) if s.fcfg.reshard_early else None
    return new, new is not None
