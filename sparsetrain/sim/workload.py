"""Routing workloads for the simulator: Zipf expert shares, or a recorded expert_loads.jsonl replayed and
resampled to another number of experts / layers."""
from __future__ import annotations

import math
from pathlib import Path

import torch


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


def resample_shares(shares: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Shares [E] -> [E'] keeping the cumulative-share curve over expert index (hot regions stay hot)."""
    src = shares.to(torch.float64)
    src = src / src.sum()
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(src, 0)])  # [E + 1] at x = i / E
    x_src = torch.linspace(0, 1, len(src) + 1, dtype=torch.float64)
    x_new = torch.linspace(0, 1, num_experts + 1, dtype=torch.float64)
    idx = torch.searchsorted(x_src, x_new, right=True).clamp(1, len(src))  # segment of each new boundary
    x0, x1 = x_src[idx - 1], x_src[idx]
    y = cdf[idx - 1] + (cdf[idx] - cdf[idx - 1]) * (x_new - x0) / (x1 - x0)  # piecewise-linear cdf
    out = (y[1:] - y[:-1]).clamp_min(0)
    return out / out.sum()


def replay_loads(path: str | Path, num_experts: int, num_layers: int, skip_steps: int = 0) -> torch.Tensor:
    """Mean per-layer shares [L', E'] of a recorded expert_loads.jsonl, resampled to E' experts, layers cycled."""
    p = Path(path)
    if p.is_dir():
        p = p / "expert_loads.jsonl"
    if not p.exists():
        raise ValueError(f"no expert_loads.jsonl at {path}")
    from sparsetrain.telemetry.jsonl import read_jsonl

    rows = [r["counts"] for r in read_jsonl(p) if "counts" in r][skip_steps:]  # torn lines skipped
    if not rows:
        raise ValueError(f"{p} holds no steps with per-layer expert counts after skipping {skip_steps}")
    try:
        counts = torch.tensor(rows, dtype=torch.float64).sum(0)  # [L, E]
    except (TypeError, ValueError):
        raise ValueError(f"{p}: counts must be [layers][experts] numbers of one shape on every line") from None
    if counts.dim() != 2 or not bool((counts.sum(1) > 0).all()) or bool((counts < 0).any()):
        raise ValueError(f"{p}: every layer needs non-negative expert counts with a positive total, per line "
                         f"[layers][experts]; got totals {counts.sum(-1).tolist() if counts.dim() else counts}")
    shares = counts / counts.sum(1, keepdim=True)
    layers = [resample_shares(shares[li % shares.shape[0]], num_experts) for li in range(num_layers)]
    return torch.stack(layers)  # [L', E']


def workload_loads(spec: str, num_experts: int, num_layers: int) -> torch.Tensor:
    """'zipf:S' or a path to expert_loads.jsonl (or its run dir) -> shares [L, E]."""
    if spec.startswith("zipf:"):
        try:
            s = float(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"workload {spec!r}: expected zipf:S with a number S, e.g. zipf:1.2") from None
        return zipf_loads(num_experts, s).expand(num_layers, -1).clone()
    return replay_loads(spec, num_experts, num_layers)
