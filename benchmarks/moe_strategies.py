"""EP vs FSSDP (and dp) side by side: same processes, same data, Zipf-skewed routing.

For each world size, one set of gloo ranks runs every (skew, strategy) pair in turn on identical
batches and prints: step time and the fssdp/ep ratio, per-rank expert tokens max/mean, per-rank expert
busy time (thread CPU time around the expert GEMMs) max/mean, spAG/spRS and all-to-all bytes per step,
and peak RSS per rank.

    python benchmarks/moe_strategies.py                       # 2 and 4 ranks, s in {0, 0.8, 1.2, 1.6}
    python benchmarks/moe_strategies.py --worlds 2 --skews 1.2 --steps 20
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.seq_len=128", "moe.num_experts=16",
         "moe.top_k=2", "moe.d_ffn=2048", "train.eval_every=0", "train.log_every=1000", "train.progress=false",
         "checkpoint.save_final=false", "checkpoint.resume=false", "launch.torch_threads=1", "train.warmup_steps=2",
         "moe.aux_loss_coef=0.0"]  # aux loss off: the router keeps the Zipf skew under study
FSSDP = ["parallel.fssdp.slots_per_rank=2", "parallel.fssdp.reshard_every=5", "parallel.fssdp.load_window=3"]
VARIANTS = {  # name -> overrides; every variant runs on the same data in the same processes
    "ep": ["parallel.strategy=ep"],
    "fssdp": ["parallel.strategy=fssdp", "parallel.fssdp.planner=hecate", *FSSDP],
    "fssdp-lpt": ["parallel.strategy=fssdp", "parallel.fssdp.planner=lpt_spill", *FSSDP],
    # spRS posted from each layer's input-grad hook during backward (sprs_post=auto posts it after
    # backward on CPU): the overlap's A/B on the same data
    "fssdp-overlap": ["parallel.strategy=fssdp", "parallel.fssdp.planner=hecate", *FSSDP,
                      "parallel.fssdp.sprs_post=backward"],
    "fssdp-lpt-overlap": ["parallel.strategy=fssdp", "parallel.fssdp.planner=lpt_spill", *FSSDP,
                          "parallel.fssdp.sprs_post=backward"],
}


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _state_mib(tr) -> float:
    """This rank's training state: local params + grads + Adam moments, plus its largest gathered layer."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * local(p).element_size() for p in tr.model.parameters())
    adam = sum(local(v).numel() * local(v).element_size() for st in tr.optimizer.state.values()
               for v in st.values() if hasattr(v, "numel") and v.dim() > 0)
    copies = 0  # the largest gathered layer (layers without copies compute on the owned Parameters)
    s = tr.strategy
    gathered = [len(v) for li, v in getattr(s, "mat_ids", {}).items() if s.replicated(li)]
    if gathered:
        copies = max(gathered) * s.chunk_bytes
    return (2 * params + adam + copies) / 2**20


def _run_one(overrides: list[str], steps: int, warmup: int) -> dict:
    """Build a Trainer in this rank, run `steps` steps, return this rank's measurements."""
    import torch.distributed as dist

    from sparsetrain.config import load_config
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.telemetry.comm import COMM
    from sparsetrain.telemetry.timers import TIMERS
    from sparsetrain.train.trainer import Trainer

    world = dist.get_world_size()
    cfg = load_config("tiny", MODEL + [f"launch.workers={world}", f"train.steps={steps}",
                                       f"train.out_dir=/tmp/st-bench-{os.getpid()}", *overrides])
    tr = Trainer(cfg, init_distributed("cpu"))
    TIMERS.enabled = True
    times, busy, tokens, bytes_ = [], [], [], []
    rss_ok = _peak_rss_reset()
    for step in range(steps):
        COMM.reset()
        TIMERS.pop()
        dist.barrier()
        t0 = time.perf_counter()
        tr.train_step(step)
        dist.barrier()
        dt = time.perf_counter() - t0
        _, cpu = TIMERS.pop()
        if step >= warmup:
            times.append(dt)
            busy.append(cpu.get("experts", 0.0))
            tokens.append(sum(getattr(tr.strategy, "rank_tokens", {}).values()))
            bytes_.append(COMM.snapshot())
    TIMERS.enabled = False
    n = max(len(times), 1)
    agg = {k: sum(b.get(k, 0) for b in bytes_) / n for k in ("spag", "sprs", "all_to_all")}
    if rank_zero := (dist.get_rank() == 0) and hasattr(tr.strategy, "overlap_budget"):
        print(f"[bench] {overrides} overlap budget t={tr.strategy.overlap_budget} reshards={tr.strategy.reshards} "
              f"moved experts={tr.strategy.reshard_moves}",
              flush=rank_zero)
    return {"state_mib": _state_mib(tr), "step_s": sorted(times)[len(times) // 2], "busy_s": sum(busy) / n,
            "tokens": sum(tokens) / n,
            "bytes": agg, "peak_rss_mib": _peak_rss_mib() if rss_ok else float("nan")}


def _rank_body(rank: int, world: int, skews: list[float], steps: int, warmup: int,
               variants: dict[str, list[str]]) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    out = []
    for s in skews:
        for name, extra in variants.items():
            res = _run_one([f"moe.router_skew={s}", *extra], steps, warmup)
            out.append({"skew": s, "strategy": name, **res})
    return out


def _ratio(vals: list[float]) -> float:
    m = sum(vals) / len(vals)
    return max(vals) / m if m > 0 else float("nan")


def report(world: int, per_rank: list[list[dict]], all_gather_mib: float) -> list[str]:
    """Rows of the table for one world size."""
    rows = []
    for i, rec in enumerate(per_rank[0]):
        recs = [r[i] for r in per_rank]
        step = max(r["step_s"] for r in recs)
        rows.append({"world": world, "skew": rec["skew"], "strategy": rec["strategy"], "step_ms": 1000 * step,
                     "tok": _ratio([r["tokens"] for r in recs]), "busy": _ratio([r["busy_s"] for r in recs]),
                     "spag": sum(r["bytes"]["spag"] for r in recs) / 2**20,
                     "sprs": sum(r["bytes"]["sprs"] for r in recs) / 2**20,
                     "a2a": sum(r["bytes"]["all_to_all"] for r in recs) / 2**20,
                     "rss": max(r["peak_rss_mib"] for r in recs),
                     "state": max(r["state_mib"] for r in recs), "state_min": min(r["state_mib"] for r in recs)})
    lines = []
    for r in rows:
        ep = next(x for x in rows if x["skew"] == r["skew"] and x["strategy"] == "ep")
        ratio = r["step_ms"] / ep["step_ms"]
        lines.append(f"| {world} | {r['skew']:.1f} | {r['strategy']:<9} | {r['step_ms']:8.1f} | {ratio:5.2f} | "
                     f"{r['tok']:5.2f} | {r['busy']:5.2f} | {r['spag']:6.2f} | {r['sprs']:6.2f} | "
                     f"{100 * r['spag'] / all_gather_mib if all_gather_mib else 0:5.1f}% | {r['a2a']:6.2f} | "
                     f"{r['state']:7.1f} / {r['state_min']:.1f} | {r['rss']:7.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--skews", type=float, nargs="+", default=[0.0, 0.8, 1.2, 1.6])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--variants", nargs="+", default=["ep", "fssdp", "fssdp-lpt"], choices=list(VARIANTS))
    ap.add_argument("--fssdp", nargs="*", default=None, help="extra overrides for the fssdp variants")
    args = ap.parse_args()
    from tests.dist_utils import run_distributed

    d_model, d_ffn, e, layers = 128, 2048, 16, 2
    chunk_mib = 3 * d_model * d_ffn * 4 / 2**20
    header = [("| ranks | zipf s | strategy | step ms (median) | vs ep | expert tokens max/mean | "
              "expert busy max/mean | spAG MiB/step | spRS MiB/step | spAG vs all-gather | a2a MiB/step | "
              "train state MiB/rank max / min | process RSS high-water MiB |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print(f"# moe_strategies: {e} experts top-2, d_model {d_model}, d_ffn {d_ffn}, {layers} MoE layers, "
          f"seq 128, global batch 16, steps {args.steps} (first {args.warmup} not timed)")
    print("\n".join(header), flush=True)
    for world in args.worlds:
        # all-gather of every expert to every rank, per step (forward + backward re-gather), all layers
        all_gather_mib = 2 * layers * e * (world - 1) * chunk_mib
        variants = {k: VARIANTS[k] + (args.fssdp or [] if k != "ep" else []) for k in args.variants}
        per_rank = run_distributed(_rank_body, world, args.skews, args.steps, args.warmup, variants, timeout=3000)
        print("\n".join(report(world, per_rank, all_gather_mib)), flush=True)


if __name__ == "__main__":
    main()
