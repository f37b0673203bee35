"""`sparsetrain sim calibrate RUN_DIRS`: fit a cluster's compute and link constants from measured runs.

Each run dir holds config.yaml and metrics.jsonl, whose records carry per-rank span times (`ranks`).
Fits, by least squares over (logged step, rank) samples (the first logged interval is warm-up, skipped):
- compute: forward busy CPU time of attention + experts = FLOPs / achievable_flops + passes x layer_overhead_s
  (per-rank thread CPU time, so ranks sharing the host's cores do not count each other's work); on a CPU host
  the median of busy CPU / wall time of those spans is the share of a core a rank got (`cpu_share`; with
  `cores` set, the split of cores among more ranks than cores is taken out first: `Cluster.rank_share`);
- link: with FSSDP runs whose spRS ran after backward, bandwidth = bytes the busiest rank sent / the spRS span
  of the rank that waited least (bulk rows, no routing work), and the forward all-to-all wall time (dispatch +
  combine spans of the rank that waited least: the others also wait for the slowest rank's experts) less its
  bytes at that bandwidth = peer messages x latency + routed slots x local dispatch work per slot; without such
  runs, all-to-all time = peer messages x latency + bytes / bandwidth (local work inside the bandwidth);
- backward/forward compute ratio from each record's fwd_s / bwd_s less the collective spans;
- optimizer seconds per local parameter from the optimizer span;
- step overhead: what the measured step time (from tokens/s) keeps beyond the model, median over runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsetrain.sim.cluster import Cluster
from sparsetrain.sim.shape import SimSetup, setup_from_config
from sparsetrain.textio import load_yaml


@dataclass
class RunData:
    """One measured run: its setup, world size and logged records (warm-up dropped)."""

    path: Path
    setup: SimSetup
    world: int
    records: list[dict[str, Any]]
    strategy: str  # the runtime strategy (none/dp/ep/fssdp)


RANK_KEYS = ("attention_ms", "experts_ms", "attention_cpu_ms", "experts_cpu_ms", "optimizer_ms", "tokens",
             "dispatch_ms", "combine_ms")  # what the fits read from each record's `ranks`


def load_run(path: str | Path, skip: int = 1) -> RunData:
    """Read config.yaml + metrics.jsonl of a run directory (torn lines skipped, as `sparsetrain report` does)."""
    from sparsetrain.config import config_from_dict
    from sparsetrain.telemetry.jsonl import read_jsonl

    p = Path(path)
    if not (p / "config.yaml").exists() or not (p / "metrics.jsonl").exists():
        raise ValueError(f"{p}: a calibration run needs config.yaml and metrics.jsonl (written by sparsetrain train)")
    cfg = config_from_dict(load_yaml((p / "config.yaml").read_text(encoding="utf-8"), str(p / "config.yaml")))
    recs = [r for r in read_jsonl(p / "metrics.jsonl")[skip:] if isinstance(r.get("ranks"), dict)]
    if not recs:
        raise ValueError(f"{p}: no logged records with per-rank timings after the first {skip} (log more often)")
    lacking = sorted({k for r in recs for k in RANK_KEYS if k not in r["ranks"]})
    if lacking:
        raise ValueError(f"{p}: records lack per-rank {', '.join(lacking)} (written by an older sparsetrain?)")
    return RunData(p, setup_from_config(cfg), len(recs[0]["ranks"]["experts_ms"]), recs, cfg.parallel.strategy)


def compute_features(run: RunData, rec: dict[str, Any], rank: int) -> tuple[float, float, float, float]:
    """(forward FLOPs, layer passes, forward busy CPU seconds, their wall seconds) of one rank at one step."""
    s, r = run.setup, rec["ranks"]
    tokens_rank = s.tokens / run.world
    slots = r["tokens"][rank] if r["tokens"][rank] > 0 else tokens_rank * s.top_k * s.n_moe  # dp/none: all local
    flops = s.n_layers * tokens_rank * s.attn_fwd_flops() + slots * s.expert_fwd_flops()
    busy = (r["attention_cpu_ms"][rank] + r["experts_cpu_ms"][rank]) / 1000
    wall = (r["attention_ms"][rank] + r["experts_ms"][rank]) / 1000
    return flops, float(s.n_layers + s.n_moe), busy, wall


def link_features(run: RunData, rec: dict[str, Any]) -> tuple[float, float, float, float] | None:
    """(peer messages, bytes sent per rank, slot permutations per rank, measured seconds) of the forward
    all-to-alls (dispatch and combine, every MoE layer) at one step."""
    if run.world == 1 or run.strategy not in ("ep", "fssdp") or "a2a_MB" not in rec:
        return None
    r, s = rec["ranks"], run.setup
    # the rank that reached the exchange last waited for nobody: its span is the transfer itself
    secs = min(r["dispatch_ms"][i] + r["combine_ms"][i] for i in range(run.world)) / 1000
    fwd_bytes = rec["a2a_MB"] * 2**20 / run.world / 2  # the record sums ranks, forward + backward
    msgs = s.n_moe * 3 * (run.world - 1)  # counts, dispatch, combine: one message per peer each
    slots = 2 * s.tokens / run.world * s.top_k * s.n_moe  # dispatch and combine each permute all the rank's slots
    return float(msgs), fwd_bytes, slots, secs


def p2p_features(run: RunData, rec: dict[str, Any], device: str) -> tuple[float, float] | None:
    """(bytes the busiest rank sent, measured seconds) of one step's spRS posted after backward: bulk
    point-to-point rows with no routing work, so they time the link itself. None without such a spRS (no
    copies; spRS overlapping backward, as `sprs_post=auto` does on `device` cuda: its span is only the unhidden rest;
    records without per-rank bytes)."""
    r, post = rec["ranks"], run.setup.sprs_post
    in_backward = post == "backward" or (post == "auto" and device == "cuda")
    if run.world == 1 or run.strategy != "fssdp" or in_backward or "sprs_sent_MB" not in r:
        return None
    sent, secs = max(r["sprs_sent_MB"]) * 2**20, min(r["sprs_ms"]) / 1000  # the last rank to arrive waited least
    return (sent, secs) if sent > 0 and secs > 0 else None


def _lstsq_nonneg(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least squares x @ b = y with b >= 0 (a negative coefficient is dropped and the rest refitted)."""
    cols = list(range(x.shape[1]))
    while cols:
        b = torch.linalg.lstsq(x[:, cols], y[:, None]).solution[:, 0]
        if (b >= 0).all():
            out = torch.zeros(x.shape[1], dtype=x.dtype)
            out[cols] = b
            return out
        cols.pop(int(b.argmin()))
    return torch.zeros(x.shape[1], dtype=x.dtype)


def _fit_links(link: list[tuple[float, float, float, float]], p2p: list[tuple[float, float]], base: Cluster
               ) -> tuple[float, float, float]:
    """(latency s, bytes/s, local seconds per routed slot). With spRS samples the bandwidth is theirs (bytes through
    the origin) and the all-to-all time beyond its bytes fits latency and per-slot local work; without, the
    all-to-all alone fits latency and bandwidth (its local work then sits inside the bandwidth, per-slot work 0)."""
    lat, bw, per_slot = base.intra_node_latency_s, base.intra_node_Bps, base.dispatch_s_per_slot
    if p2p:
        pb = torch.tensor(p2p, dtype=torch.float64)  # [n, 2] bytes, seconds
        bw = float((pb[:, 0] ** 2).sum() / (pb[:, 0] * pb[:, 1]).sum())
    if len(link) < 2:
        return lat, bw, per_slot
    lt = torch.tensor(link, dtype=torch.float64)  # [n, 4] messages, bytes, slots, seconds
    if p2p:
        lat, per_slot = _lstsq_nonneg(lt[:, [0, 2]], lt[:, 3] - lt[:, 1] / bw).tolist()
        return lat, bw, per_slot
    lat, inv_bw = _lstsq_nonneg(lt[:, :2], lt[:, 3]).tolist()
    return lat, (1.0 / inv_bw if inv_bw > 0 else bw), 0.0  # the base's per-slot work is inside this bandwidth


def fit(runs: list[RunData], base: Cluster, link_from_sprs: bool = True) -> tuple[Cluster, dict[str, Any]]:
    """A cluster whose compute/link/optimizer/overhead constants fit the runs; plus fit diagnostics.
    `link_from_sprs=False` fits the link on the all-to-all alone, as before spRS rows were used (comparisons)."""
    from sparsetrain.sim.predict import predict

    comp = [compute_features(run, rec, k) for run in runs for rec in run.records for k in range(run.world)]
    x = torch.tensor([[f, n] for f, n, _, _ in comp], dtype=torch.float64)
    y = torch.tensor([b for _, _, b, _ in comp], dtype=torch.float64)
    # a rank's core share, less what oversubscription explains (more local ranks than cores split them)
    split = [base.rank_share(run.world) / base.cpu_share for run in runs for _ in run.records for _ in range(run.world)]
    shares = torch.tensor([b / w / k for (_, _, b, w), k in zip(comp, split) if w > 0], dtype=torch.float64)
    cpu_share = min(1.0, median(shares)) if base.device == "cpu" and len(shares) else 1.0
    inv_flops, overhead = _lstsq_nonneg(x, y).tolist()
    if inv_flops <= 0:
        raise ValueError("calibration: forward busy time does not grow with FLOPs in these runs; "
                         "use runs of different sizes or batch")
    link = [f for run in runs for rec in run.records if (f := link_features(run, rec)) is not None]
    p2p = [f for run in runs for rec in run.records
           if link_from_sprs and (f := p2p_features(run, rec, base.device)) is not None]
    lat, bw, per_slot = _fit_links(link, p2p, base)
    ratios = []
    for run in runs:
        for rec in run.records:
            r0 = rec["ranks"]
            comm = (r0["dispatch_ms"][0] + r0["combine_ms"][0]) / 1000
            fwd = rec.get("fwd_s", 0.0) - comm - r0.get("spag_wait_ms", [0.0])[0] / 1000
            if fwd > 0 and rec.get("bwd_s"):
                ratios.append(max(rec["bwd_s"] - comm, 0.0) / fwd)
    ratio = median(ratios) if ratios else base.bwd_fwd_ratio
    opt = []
    for run in runs:
        params = _local_params(run)
        opt += [(params, rec["ranks"]["optimizer_ms"][k] / 1000) for rec in run.records for k in range(run.world)]
    ox = torch.tensor([p for p, _ in opt], dtype=torch.float64)
    oy = torch.tensor([t for _, t in opt], dtype=torch.float64)
    per_param = float((ox * oy).sum() / (ox * ox).sum()) if opt else 0.0
    fitted = dataclasses.replace(base, achievable_flops=1.0 / inv_flops, peak_flops=max(base.peak_flops, 1.0 / inv_flops),
                                 layer_overhead_s=overhead, intra_node_Bps=bw, intra_node_latency_s=lat,
                                 dispatch_s_per_slot=per_slot,
                                 bwd_fwd_ratio=ratio, optimizer_s_per_param=per_param * cpu_share,
                                 step_overhead_s=0.0, cpu_share=cpu_share)
    residuals = []
    for run in runs:
        measured = measured_step_s(run)
        pred = predict(run.setup, fitted, run.world, run_shares(run)).step_time_s
        residuals.append(measured - pred)
    mid = median(residuals)  # robust to one run measured under a different load
    fitted = dataclasses.replace(fitted, step_overhead_s=max(0.0, mid))
    diag = {"compute_samples": len(comp), "link_samples": len(link), "p2p_samples": len(p2p), "bwd_fwd_samples": len(ratios),
            "cpu_share_range": [float(shares.min()), float(shares.max())] if len(shares) else None,
            "step_residuals_s": residuals}
    return fitted, diag


def _local_params(run: RunData) -> float:
    s = run.setup
    expert_total = s.n_moe * s.num_experts * s.expert_params
    if run.world == 1 or run.strategy in ("dp", "none"):
        return float(s.dense_params + expert_total)
    dense = s.dense_params / run.world if s.dense == "fsdp2" else s.dense_params
    return dense + expert_total / run.world


def measured_step_s(run: RunData) -> float:
    """Median step time over the run's logged intervals (`step_ms`, else from interval tokens/s): on a shared
    host one interval can catch another process's burst (seen: 10.5 s beside 3.5 s and 2.8 s); not this run's."""
    vals = [r["step_ms"] / 1000 if r.get("step_ms") else run.setup.tokens / r["tokens_per_s"]
            for r in run.records if r.get("step_ms") or r.get("tokens_per_s")]
    return median(vals)


def median(vals: list[float] | torch.Tensor) -> float:
    """The median; the mean of the two middle values for an even count (torch.median takes the lower one, which
    biased two-run fits low)."""
    t = torch.as_tensor(vals, dtype=torch.float64).flatten().sort().values
    n = len(t)
    return float(t[n // 2]) if n % 2 else float(t[n // 2 - 1:n // 2 + 1].mean())


def run_shares(run: RunData) -> torch.Tensor:
    """The run's own expert shares [n_moe, E] from its expert_loads.jsonl (uniform if absent)."""
    from sparsetrain.sim.workload import replay_loads

    s = run.setup
    if (run.path / "expert_loads.jsonl").exists():
        return replay_loads(run.path / "expert_loads.jsonl", s.num_experts, s.n_moe, skip_steps=1)
    return torch.full((s.n_moe, s.num_experts), 1.0 / s.num_experts, dtype=torch.float64)


def calibrate(run_dirs: list[str | Path], base: Cluster, name: str, link_from_sprs: bool = True
              ) -> tuple[Cluster, dict[str, Any]]:
    """Load the runs and fit; the result is named `name` and runs on device 'cpu' if the base does."""
    runs = [load_run(d) for d in run_dirs]
    fitted, diag = fit(runs, base, link_from_sprs)
    return dataclasses.replace(fitted, name=name), diag
