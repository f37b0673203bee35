"""Routing workloads for benchmarks: per-step target expert shares reached by the router (quota routing).

A workload fixes, for every MoE layer and step, the share of routed slots each expert receives:
- `zipf`: Zipf(s) over a seeded random permutation of the experts (a different permutation per layer), the
  expert at permutation rank r getting a share proportional to r^-s;
- `drift`: the same, with a new permutation every `drift_every` steps (the hot set moves);
- `trace`: the shares recorded in an `expert_loads.jsonl` of a real run, replayed step by step.
Shares are capped at 1/top_k (a token picks an expert at most once; the excess is spread over the rest).

The router reaches them by quota routing: each sequence's slots are split into per-expert quotas (largest
remainder of share x seq_len x top_k) and every expert takes its quota of tokens by the router's own gate
scores (`quota_route`; keeping every quota servable by a Gale-Ryser test). So each step's
measured share per expert equals the target up to one slot per sequence, every token still takes top_k
distinct experts, and the combine weights stay the router's softmax probabilities (gradients as usual).
Assignment is per sequence, so it does not depend on how the batch is sharded over ranks (parity holds).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["RoutingWorkload", "cap_shares", "load_trace", "quota_route", "slot_quotas", "zipf_shares"]


def zipf_shares(num_experts: int, s: float) -> torch.Tensor:
    """Shares [E] float64 summing to 1, rank r (0-based) getting (r+1)^-s."""
    w = torch.arange(1, num_experts + 1, dtype=torch.float64, device="cpu").pow(-float(s))
    return w / w.sum()


def cap_shares(p: torch.Tensor, cap: float) -> torch.Tensor:
    """Water-fill: no share above `cap`, the excess spread over the others in proportion (sum stays 1)."""
    p = p.to(torch.float64) / p.sum()
    if cap * p.numel() < 1 - 1e-12:
        raise ValueError(f"cannot cap {p.numel()} shares at {cap}: they would sum to less than 1")
    for _ in range(p.numel()):
        over = p > cap + 1e-15
        if not bool(over.any()):
            break
        excess = float((p[over] - cap).sum())
        p[over] = cap
        free = p < cap - 1e-15
        p[free] += excess * p[free] / p[free].sum()
    return p


def slot_quotas(p: torch.Tensor, slots: int, cap: int) -> torch.Tensor:
    """Integer slots per expert [E] summing to `slots`, proportional to p (largest remainder), each <= cap."""
    raw = p.to(torch.float64) * slots
    q = raw.floor().clamp(max=cap).long()
    frac = raw - raw.floor()
    for e in torch.argsort(-frac, stable=True).tolist() * 2:  # second pass: room left after caps
        if int(q.sum()) >= slots:
            break
        if q[e] < cap:
            q[e] += 1
    return q


def _top(key: torch.Tensor, q: int) -> torch.Tensor:
    """Indices [G, q] of the q largest keys per row, exact ties by index (topk's tie order is unspecified and
    can change with unrelated values, which would break parity across batch shardings)."""
    return torch.argsort(key, dim=-1, descending=True, stable=True)[:, :q]


def quota_route(scores: torch.Tensor, quotas: torch.Tensor, top_k: int) -> torch.Tensor:
    """scores [G, S, E], quotas [E] (sum S*top_k, each <= S) -> expert ids [G, S, top_k], best score first.

    Experts take tokens in turn, largest quota first: each takes its quota of the tokens that still need a
    choice and prefer it most (margin of its score over the token's own cut-off among the other experts still
    to come, so with quotas equal to plain top-k's counts the result is plain top-k), unless that would leave the remaining experts' quotas unservable (Gale-Ryser
    test); then it takes from the tokens needing the most choices, by score among them, which keeps the
    rest servable. So every quota is met exactly, every token gets top_k distinct experts, and tokens keep
    their own preferences wherever the quotas allow. Deterministic (ties: token order).
    """
    g, s, e = scores.shape
    q_list = [int(q) for q in quotas.tolist()]
    if sum(q_list) != s * top_k or max(q_list) > s:
        raise ValueError(f"quotas {q_list} must sum to {s * top_k} with none above {s}")
    sc = scores.detach().float()
    dev = sc.device
    unit = float(sc.abs().max().clamp_min(1.0)) * 4  # need levels dominate any score difference
    need = torch.full((g, s), top_k, dtype=torch.long, device=dev)
    chosen = torch.zeros(g, s, e, dtype=torch.bool, device=dev)
    order = [x for x in sorted(range(e), key=lambda x: (-q_list[x], x)) if q_list[x] > 0]
    # Gale-Ryser: fresh experts with descending quotas q_1.. serve token needs d iff for every j,
    # q_1 + .. + q_j <= sum_t min(d_t, j); supply[j] = (tokens per need level) @ min(level, j)
    levels = torch.arange(top_k + 1, device=dev)
    min_table = torch.minimum(levels.unsqueeze(1), torch.arange(1, e + 1, device=dev).unsqueeze(0))  # [k+1, E]
    demand = torch.tensor([q_list[x] for x in order], device=dev)  # [n] descending
    minus = torch.full((g, max(q_list)), -1, dtype=torch.long, device=dev)
    sc_o = sc[..., order].contiguous()  # [G, S, n] columns in processing order
    pad = torch.full((g, s, top_k), float("-inf"), device=dev)
    for i, ex in enumerate(order):
        q = q_list[ex]
        open_ = need > 0
        # a token's margin for ex: its score minus its need-th best score among the other experts still to
        # come (> 0 exactly when the token would itself pick ex; a continuous value, no mass of exact ties
        # that float noise could reorder)
        others = torch.cat([sc_o[..., i + 1:].sort(dim=-1, descending=True).values, pad], dim=-1)  # [G, S, r+k]
        margin = sc_o[..., i] - others.gather(-1, (need - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [G, S]
        take = _top(torch.where(open_, margin, float("-inf")), q)  # [G, q]
        rest = demand[i + 1:].cumsum(0)  # [r-1]
        if rest.numel():
            after = need.scatter_add(-1, take, minus[:, :q])  # [G, S]
            per_level = torch.nn.functional.one_hot(after, top_k + 1).sum(1)  # [G, k+1]
            ok = (rest <= per_level @ min_table[:, :rest.numel()]).all(dim=-1)  # [G]
            if not bool(ok.all()):  # would strand later quotas: take the neediest tokens, by margin among them
                needy = _top(torch.where(open_, need * unit + margin, float("-inf")), q)
                take = torch.where(ok.unsqueeze(-1), take, needy)
        chosen[..., ex].scatter_(-1, take, True)
        need.scatter_add_(-1, take, minus[:, :q])
    neg = torch.tensor(float("-inf"), device=sc.device)
    return torch.topk(torch.where(chosen, sc, neg), top_k, dim=-1).indices  # [G, S, k] best score first


def load_trace(path: str | Path) -> torch.Tensor:
    """An `expert_loads.jsonl` (one {"step", "counts": [L][E]} per line) -> loads [steps, L, E] float64."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"moe.routing_trace: no such file {str(p)!r}")
    from sparsetrain.textio import read_utf8

    try:
        text = read_utf8(p, f"moe.routing_trace {p}: not a UTF-8 expert_loads.jsonl", ValueError)
    except OSError as e:
        raise ValueError(f"moe.routing_trace {p}: cannot read: {e.strerror}") from None
    rows = []
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line)["counts"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"moe.routing_trace {p}: line {i + 1} is not a {{'counts': [[...]]}} record") from exc
    if not rows:
        raise ValueError(f"moe.routing_trace {p}: no records")
    t = torch.tensor(rows, dtype=torch.float64, device="cpu")
    if t.dim() != 3 or bool((t < 0).any()) or bool((t.sum(-1) <= 0).any()):
        raise ValueError(f"moe.routing_trace {p}: counts must be [layers][experts] of non-negative loads per step")
    return t


class RoutingWorkload:
    """Per-(layer, step) target shares and the quota routing that reaches them (targets live on the CPU:
    the model may be built under a meta-device context)."""

    def __init__(self, num_experts: int, top_k: int, skew: float = 0.0, seed: int = 0, drift_every: int = 0,
                 trace: torch.Tensor | None = None) -> None:
        if trace is not None and trace.shape[-1] != num_experts:
            raise ValueError(f"moe.routing_trace has {trace.shape[-1]} experts, moe.num_experts={num_experts}")
        self.num_experts, self.top_k = num_experts, top_k
        self.skew, self.seed, self.drift_every, self.trace = skew, seed, drift_every, trace
        self._zipf = zipf_shares(num_experts, skew)

    @classmethod
    def from_config(cls, moe) -> RoutingWorkload | None:
        """The workload `moe.router_skew` / `moe.routing_trace` ask for, or None (learned routing)."""
        if moe.routing_trace:
            return cls(moe.num_experts, moe.top_k, trace=load_trace(moe.routing_trace))
        if moe.router_skew > 0:
            return cls(moe.num_experts, moe.top_k, moe.router_skew, moe.skew_seed, moe.skew_drift_every)
        return None

    def permutation(self, layer: int, step: int) -> torch.Tensor:
        """perm [E]: perm[r] = the expert at Zipf rank r for this layer and step (seeded; drifts every k steps)."""
        epoch = step // self.drift_every if self.drift_every > 0 else 0
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + layer * 10_007 + epoch)
        return torch.randperm(self.num_experts, generator=gen, device="cpu")

    def target(self, layer: int, step: int) -> torch.Tensor:
        """Target share per expert [E] float64 (sums to 1, none above 1/top_k)."""
        if self.trace is not None:
            row = self.trace[step % self.trace.shape[0], layer % self.trace.shape[1]]
            return cap_shares(row, 1.0 / self.top_k)
        p = torch.empty(self.num_experts, dtype=torch.float64, device="cpu")
        p[self.permutation(layer, step)] = self._zipf
        return cap_shares(p, 1.0 / self.top_k)

    def mean_target(self, layer: int, steps: int) -> torch.Tensor:
        """Mean of `target` over steps 0..steps-1 [E]: what the best static placement balances."""
        return torch.stack([self.target(layer, t) for t in range(max(steps, 1))]).mean(0)

    def route(self, probs: torch.Tensor, layer: int, step: int, group: int) -> torch.Tensor:
        """probs [T, E] -> expert ids [T, top_k] meeting the step's quotas per group of `group` tokens."""
        t, e = probs.shape
        quotas = slot_quotas(self.target(layer, step), group * self.top_k, group)  # [E]
        ids = quota_route(probs.view(t // group, group, e), quotas, self.top_k)  # [T, E] -> [G, S, E]
        return ids.reshape(t, self.top_k)  # [G, S, k] -> [T, k]
