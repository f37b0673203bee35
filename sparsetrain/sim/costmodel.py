"""Analytic step-time and memory model for expert parallelism (EP) vs FSSDP on one training step.

Pure arithmetic on numbers/tensors; no processes. A placement is anything with `.owners` (expert -> rank)
and `.copies` (expert -> ranks holding a copy), e.g. `sparsetrain.parallel.placement.LayerPlacement`;
`None` means EP (contiguous owner blocks, no copies). Token dispatch follows the runtime rule: a copy on
the source rank, else on its node, else remote, split evenly among equals. Formulas: docs/placement.md.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["CostConfig", "CostReport", "PlacementLike", "dispatch_flow", "estimate", "overlap_budget", "zipf_loads"]


SPAG_ALGOS = ("p2p", "chain")


class PlacementLike(Protocol):
    """Owners (P0) and copies (P1) of one layer."""

    owners: Sequence[int]
    copies: Sequence[Sequence[int]]


@dataclass(frozen=True)
class CostConfig:
    """Model, batch and machine numbers the estimate needs (defaults: a Mixtral-like layer on H100 nodes)."""

    d_model: int = 4096
    d_ffn: int = 14336  # hidden size of one expert
    num_experts: int = 8
    top_k: int = 2
    num_layers: int = 32  # MoE layers (each preceded by attention)
    seq_len: int = 4096
    tokens_per_rank: int = 8192
    world: int = 8
    ranks_per_node: int = 8
    intra_node_Bps: float = 300e9  # per-rank bandwidth inside a node (bytes/s)
    inter_node_Bps: float = 50e9  # per-rank bandwidth across nodes (bytes/s)
    tflops: float = 400.0  # achieved dense TFLOP/s per rank
    param_bytes: int = 2
    grad_bytes: int = 4
    optim_bytes: int = 12  # per owned parameter: fp32 master + two Adam moments
    act_bytes: int = 2
    ffn_matrices: int = 3  # SwiGLU: w1, w2, w3
    attn_act_factor: float = 16.0  # saved attention-block activations per token, in units of d_model values
    keep_materialized: bool = False  # True: keep copies for backward (no re-gather), more memory
    spag_algo: str = "p2p"  # p2p: owner sends to every holder; chain: pipelined relay owner -> node -> nodes

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ffn", "num_experts", "top_k", "num_layers", "seq_len", "tokens_per_rank",
                     "world", "ranks_per_node", "param_bytes", "grad_bytes", "act_bytes", "ffn_matrices"):
            if getattr(self, name) < 1:
                raise ValueError(f"CostConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("intra_node_Bps", "inter_node_Bps", "tflops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CostConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"CostConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.spag_algo not in SPAG_ALGOS:
            raise ValueError(f"CostConfig.spag_algo={self.spag_algo!r} unknown; allowed: {list(SPAG_ALGOS)}")
        if self.world % self.ranks_per_node:
            raise ValueError(f"CostConfig.world={self.world} not divisible by ranks_per_node={self.ranks_per_node}")

    @property
    def expert_params(self) -> int:
        """Parameters of one expert."""
        return self.ffn_matrices * self.d_model * self.d_ffn

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one expert chunk (weights only) as moved by spAG."""
        return self.expert_params * self.param_bytes

    @property
    def dense_params_per_layer(self) -> int:
        """Attention projection parameters per layer (Q, K, V, O)."""
        return 4 * self.d_model * self.d_model

    @property
    def flops_per_slot(self) -> float:
        """Training FLOPs (forward + backward = 3x forward) of one routed token slot in one expert."""
        return 3.0 * 2.0 * self.expert_params

    @property
    def attn_flops_per_token(self) -> float:
        """Training FLOPs of one token in one attention block (projections + scores)."""
        return 3.0 * (2.0 * self.dense_params_per_layer + 4.0 * self.seq_len * self.d_model)


@dataclass
class CostReport:
    """Per-step estimate; per-rank tensors have shape [world]."""

    rank_tokens: torch.Tensor  # [num_layers, world] routed slots computed per rank
    compute_s: torch.Tensor  # [world] attention + expert compute seconds per step
    a2a_bytes: float  # all ranks, dispatch + combine, forward + backward
    a2a_inter_bytes: float  # part of a2a_bytes crossing nodes
    spag_bytes: float  # all ranks, all layers, including the backward re-gather unless keep_materialized
    sprs_bytes: float  # gradient bytes summed into owners
    fsdp_bytes: float  # dense FSDP all-gathers (forward + backward) and reduce-scatter, all ranks
    step_time_s: float
    peak_mem_bytes: torch.Tensor  # [world]

    @property
    def token_imbalance(self) -> float:
        """max / mean of per-rank routed slots, averaged over layers."""
        t = self.rank_tokens
        return float((t.max(dim=1).values / t.mean(dim=1).clamp_min(1e-12)).mean())

    def summary(self) -> dict[str, float]:
        """Scalars for a table or JSONL line."""
        return {
            "step_time_s": self.step_time_s,
            "token_imbalance": self.token_imbalance,
            "compute_max_s": float(self.compute_s.max()),
            "a2a_bytes": self.a2a_bytes,
            "spag_bytes": self.spag_bytes,
            "sprs_bytes": self.sprs_bytes,
            "fsdp_bytes": self.fsdp_bytes,
            "peak_mem_max_bytes": float(self.peak_mem_bytes.max()),
            "peak_mem_spread": float(self.peak_mem_bytes.max() / self.peak_mem_bytes.min()),
        }


def zipf_loads(num_experts: int, s: float) -> torch.Tensor:
    """Expert load shares [E] float64 summing to 1, share_e proportional to 1/(e+1)^s (s=0: uniform)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not (s >= 0 and math.isfinite(s)):
        raise ValueError(f"Zipf exponent s must be finite and >= 0, got {s}")
    w = torch.arange(1, num_experts + 1, dtype=torch.float64).pow(-float(s))
    return w / w.sum()


def overlap_budget(attn_time_s: float, bandwidth_Bps: float, chunk_bytes: int) -> int:
    """Chunks gatherable while the preceding non-MoE compute runs: floor(time * bandwidth / chunk_bytes)."""
    if attn_time_s < 0:
        raise ValueError(f"attn_time_s must be >= 0, got {attn_time_s}")
    if bandwidth_Bps <= 0:
        raise ValueError(f"bandwidth_Bps must be > 0, got {bandwidth_Bps}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    return math.floor(attn_time_s * bandwidth_Bps / chunk_bytes + 1e-9)


def _ep_copies(num_experts: int, world: int) -> tuple[list[int], list[list[int]]]:
    owners = [e * world // num_experts for e in range(num_experts)]
    return owners, [[o] for o in owners]


def dispatch_flow(shares: torch.Tensor, copies: Sequence[Sequence[int]], world: int, ranks_per_node: int,
                  slots_per_rank: float) -> torch.Tensor:
    """Token slots [src, dst] when every rank routes `slots_per_rank` slots by `shares` [E]."""
    flow = torch.zeros(world, world, dtype=torch.float64)
    for src in range(world):
        node = src // ranks_per_node
        for e, c in enumerate(copies):
            if src in c:
                cand = [src]
            else:
                cand = [r for r in c if r // ranks_per_node == node] or list(c)
            for dst in cand:
                flow[src, dst] += slots_per_rank * float(shares[e]) / len(cand)
    return flow


def _normalize_loads(cfg: CostConfig, loads: torch.Tensor) -> torch.Tensor:
    loads = loads.detach().to(torch.float64).cpu()
    if loads.dim() == 1:
        loads = loads.unsqueeze(0).expand(cfg.num_layers, -1)  # [E] -> [L, E]
    if tuple(loads.shape) != (cfg.num_layers, cfg.num_experts):
        raise ValueError(f"loads must have shape [{cfg.num_experts}] or [{cfg.num_layers}, {cfg.num_experts}], "
                         f"got {tuple(loads.shape)}")
    if (loads < 0).any() or (loads.sum(dim=1) <= 0).any():
        raise ValueError("loads must be >= 0 with a positive sum in every layer")
    return loads / loads.sum(dim=1, keepdim=True)  # shares per layer


def _comm_time(send: torch.Tensor, recv: torch.Tensor, cfg: CostConfig) -> float:
    """Seconds for a collective given per-rank [world, 2] (intra, inter) send/recv bytes."""
    busiest = torch.maximum(send, recv)  # [world, 2]
    t = busiest[:, 0] / cfg.intra_node_Bps + busiest[:, 1] / cfg.inter_node_Bps
    return float(t.max())


def estimate(cfg: CostConfig, loads: torch.Tensor, placements: Sequence[PlacementLike] | None = None) -> CostReport:
    """Estimate one training step; `placements` per layer (or one for all), None = EP."""
    shares = _normalize_loads(cfg, loads)  # [L, E]
    world, rpn, num_layers = cfg.world, cfg.ranks_per_node, cfg.num_layers
    if placements is not None and len(placements) not in (1, num_layers):
        raise ValueError(f"placements must have 1 or {num_layers} layers, got {len(placements)}")
    node = torch.arange(world) // rpn
    same_node = node[:, None] == node[None, :]  # [world, world]
    off_diag = ~torch.eye(world, dtype=torch.bool)
    slot_bytes = cfg.d_model * cfg.act_bytes
    attn_s = cfg.tokens_per_rank * cfg.attn_flops_per_token / (cfg.tflops * 1e12)  # per layer, train
    rank_tokens = torch.zeros(num_layers, world, dtype=torch.float64)
    expert_s = torch.zeros(world, dtype=torch.float64)
    owned = torch.zeros(world, dtype=torch.float64)  # owned expert chunks, all layers
    extra = torch.zeros(num_layers, world, dtype=torch.float64)  # materialized non-owner copies
    a2a = a2a_inter = spag = sprs = 0.0
    step = 0.0
    for layer in range(num_layers):
        if placements is None:
            owners, copies = _ep_copies(cfg.num_experts, world)
        else:
            p = placements[layer if len(placements) > 1 else 0]
            owners, copies = list(p.owners), [list(c) for c in p.copies]
            if len(owners) != cfg.num_experts or any(o not in c for o, c in zip(owners, copies)):
                raise ValueError(f"layer {layer}: placement must cover {cfg.num_experts} experts, owner in copies")
        flow = dispatch_flow(shares[layer], copies, world, rpn, cfg.tokens_per_rank * cfg.top_k)  # [src, dst]
        rank_tokens[layer] = flow.sum(dim=0)
        layer_expert_s = rank_tokens[layer] * cfg.flops_per_slot / (cfg.tflops * 1e12)  # [world]
        expert_s += layer_expert_s
        # all-to-all: dispatch + combine, forward + backward = 4 transfers of each remote slot
        remote = flow * off_diag * (4 * slot_bytes)  # [src, dst] bytes
        inter = remote * ~same_node
        a2a += float(remote.sum())
        a2a_inter += float(inter.sum())
        send = torch.stack([(remote - inter).sum(1), inter.sum(1)], dim=1)  # [world, 2]
        recv = torch.stack([(remote - inter).sum(0), inter.sum(0)], dim=1)
        a2a_s = _comm_time(send, recv, cfg)
        # spAG: owner -> every non-owner copy; spRS: the adjoint (same links reversed) with gradient bytes
        links = _spag_links(owners, copies, world, rpn, cfg.spag_algo)  # [sender, receiver] chunks
        for o in owners:
            owned[o] += 1
        extra[layer] = _extras(owners, copies, world)
        gathers = 1 if cfg.keep_materialized else 2
        ag = links * cfg.chunk_bytes
        rs = links.t() * (cfg.expert_params * cfg.grad_bytes)  # [receiver, sender]
        spag += gathers * float(ag.sum())
        sprs += float(rs.sum())
        ag_s = _comm_time(torch.stack([(ag * same_node).sum(1), (ag * ~same_node).sum(1)], 1),
                          torch.stack([(ag * same_node).sum(0), (ag * ~same_node).sum(0)], 1), cfg)
        rs_s = _comm_time(torch.stack([(rs * same_node).sum(1), (rs * ~same_node).sum(1)], 1),
                          torch.stack([(rs * same_node).sum(0), (rs * ~same_node).sum(0)], 1), cfg)
        attn_fwd, attn_bwd = attn_s / 3, 2 * attn_s / 3
        exposed = max(0.0, ag_s - attn_fwd) + max(0.0, (gathers - 1) * ag_s + rs_s - attn_bwd)
        step += attn_s + float(layer_expert_s.max()) + a2a_s + exposed
    # dense FSDP: all-gather forward and backward, reduce-scatter grads; ring bandwidth of the slowest link
    ring_Bps = cfg.inter_node_Bps if world > rpn else cfg.intra_node_Bps
    dense = cfg.dense_params_per_layer * num_layers
    per_rank_fsdp = dense * (world - 1) / world * (2 * cfg.param_bytes + cfg.grad_bytes)
    fsdp_bytes = per_rank_fsdp * world
    compute_s = expert_s + attn_s * num_layers
    step += max(0.0, per_rank_fsdp / ring_Bps - float(compute_s.min()))
    state = cfg.param_bytes + cfg.grad_bytes + cfg.optim_bytes
    copy_bytes = cfg.expert_params * (cfg.param_bytes + cfg.grad_bytes)
    live_copies = extra.sum(0) if cfg.keep_materialized else _two_layer_peak(extra)
    act = cfg.tokens_per_rank * cfg.d_model * cfg.act_bytes * cfg.attn_act_factor * num_layers
    expert_act = rank_tokens.sum(0) * cfg.act_bytes * (2 * cfg.d_model + 3 * cfg.d_ffn)
    peak = dense / world * state + owned * cfg.expert_params * state + live_copies * copy_bytes + act + expert_act
    return CostReport(rank_tokens=rank_tokens, compute_s=compute_s, a2a_bytes=a2a, a2a_inter_bytes=a2a_inter,
                      spag_bytes=spag, sprs_bytes=sprs, fsdp_bytes=fsdp_bytes, step_time_s=step,
                      peak_mem_bytes=peak)


def _two_layer_peak(extra: torch.Tensor) -> torch.Tensor:
    """Per rank, the most copies alive at once when one layer runs while the next is prefetched."""
    pairs = extra[:-1] + extra[1:] if extra.shape[0] > 1 else extra  # [L-1, world]
    return pairs.max(dim=0).values


def _extras(owners: Sequence[int], copies: Sequence[Sequence[int]], world: int) -> torch.Tensor:
    """Per rank, the number of non-owner copies it holds."""
    out = torch.zeros(world, dtype=torch.float64)
    for o, c in zip(owners, copies):
        for r in c:
            if r != o:
                out[r] += 1
    return out


def _spag_links(owners: Sequence[int], copies: Sequence[Sequence[int]], world: int, ranks_per_node: int,
                algo: str) -> torch.Tensor:
    """Chunk transfers [sender, receiver] for one layer's spAG under `algo` (p2p or chain)."""
    links = torch.zeros(world, world, dtype=torch.float64)
    for o, c in zip(owners, copies):
        holders = [r for r in c if r != o]
        if algo == "p2p":
            for r in holders:
                links[o, r] += 1
            continue
        home = o // ranks_per_node
        chain = [o] + sorted(holders, key=lambda r: (r // ranks_per_node != home, r // ranks_per_node, r))
        for a, b in itertools.pairwise(chain):
            links[a, b] += 1
    return links
