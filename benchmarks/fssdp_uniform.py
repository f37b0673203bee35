"""FSSDP vs EP side by side: does FSSDP cost nothing when nothing needs copying?

Each (repetition, variant) runs in a fresh set of gloo ranks (one core each), variants interleaved
(`benchmarks/measure.run_interleaved`: ep fssdp, fssdp ep, ...), the same model, data and initial weights;
it reports each variant's median step time over repetitions, its ratio to the first variant and each
repetition's own ratio, the CPU time per step (`measure.StepClock`: the rank process's CPU time, all threads,
max over ranks: load-independent), the copies FSSDP made (spAG bytes) and the time FSSDP spent in its own
per-step work (placement, tracker, dispatch choice) measured inside the ranks.

    python benchmarks/fssdp_uniform.py                  # 2 ranks, tiny-preset shape, 5 repetitions
    python benchmarks/fssdp_uniform.py --reps 3 --steps 16 --warmup 4 --variants ep fssdp-nocopy fssdp fssdp-nogate
    python benchmarks/fssdp_uniform.py --set moe.router_skew=1e-6   # a uniform routing workload, where available
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COMMON = ["train.eval_every=0", "train.log_every=1000", "train.progress=false", "checkpoint.save_final=false",
          "checkpoint.resume=false", "launch.torch_threads=1", "parallel.pretend_nodes=0"]
VARIANTS = {
    "ep": ["parallel.strategy=ep"],
    "fssdp": ["parallel.strategy=fssdp"],  # the tiny preset's FSSDP settings (hecate, 2 slots, re-shard 50)
    "fssdp-nogate": ["parallel.strategy=fssdp", "parallel.fssdp.cost_gate=false"],
    # the gate refuses every copy (a link too slow to pay): FSSDP's path when nothing needs copying
    "fssdp-nocopy": ["parallel.strategy=fssdp", "parallel.fssdp.link_GBps=1e-6"],
    "deepspeed_moe": ["parallel.strategy=deepspeed_moe"],  # DeepSpeed-MoE dropless, ZeRO-0 (docs/peers.md)
}


def _rank_body(rank: int, world: int, overrides: list[str], steps: int, warmup: int) -> dict:
    from benchmarks.measure import StepClock
    from sparsetrain.config import load_config
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.telemetry.comm import COMM
    from sparsetrain.train.trainer import Trainer

    cfg = load_config("tiny", [*COMMON, f"launch.workers={world}", f"train.steps={steps}",
                               f"train.out_dir=/tmp/st-uniform-{rank}", *overrides])
    tr = Trainer(cfg, init_distributed("cpu"))
    own = {"after_step": 0.0}
    s = tr.strategy
    if hasattr(s, "after_step"):  # time the strategy's own per-step work (placement, tracker, re-shard)
        inner = s.after_step

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                own["after_step"] += time.perf_counter() - t0

        s.after_step = timed
    clock, spag = StepClock(), 0
    for step in range(steps):
        COMM.reset()
        with clock.step(timed=step >= warmup):
            tr.train_step(step)
        if step >= warmup:
            spag += COMM.snapshot().get("spag", 0)
        if step == warmup - 1:
            own["after_step"] = 0.0
    n = max(len(clock.wall), 1)
    return {"step_s": statistics.median(clock.wall), "cpu_s": statistics.median(clock.cpu), "spag_B": spag / n,
            "after_step_s": own["after_step"] / n}


def _run(args: argparse.Namespace, v: str) -> dict:
    """One run of variant `v` in fresh ranks: the slowest rank's step and CPU time, summed spAG bytes."""
    from tests.dist_utils import run_distributed

    per_rank = run_distributed(_rank_body, args.world, VARIANTS[v] + args.set, args.steps, args.warmup, timeout=1800)
    return {"step_s": max(r["step_s"] for r in per_rank), "cpu_s": max(r["cpu_s"] for r in per_rank),
            "spag_B": sum(r["spag_B"] for r in per_rank), "after_step_s": max(r["after_step_s"] for r in per_rank)}


def _log(rep: int, v: str, rec: dict) -> None:
    print(f"rep {rep} {v:<13} step {1000 * rec['step_s']:7.1f} ms  cpu {1000 * rec['cpu_s']:7.1f} ms  "
          f"spAG {rec['spag_B'] / 2**20:6.2f} MiB/step  after_step {1000 * rec['after_step_s']:6.2f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=["ep", "fssdp"], choices=list(VARIANTS))
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every variant")
    args = ap.parse_args()
    if args.reps < 1 or not 0 <= args.warmup < args.steps:
        ap.error(f"--reps {args.reps} --warmup {args.warmup} --steps {args.steps}: need reps >= 1, 0 <= warmup < steps")
    from benchmarks.measure import per_run_ratios, run_interleaved

    res = run_interleaved(args.variants, args.reps, partial(_run, args), _log)
    base = statistics.median(r["step_s"] for r in res[args.variants[0]])
    cbase = statistics.median(r["cpu_s"] for r in res[args.variants[0]])
    print(f"\n| variant | step ms (median of {args.reps} runs) | vs {args.variants[0]} | per-run ratios | "
          f"CPU ms/step/rank (median) | vs {args.variants[0]} | spAG MiB/step | after_step ms |")
    print("|---|---|---|---|---|---|---|---|")
    for v in args.variants:
        med = statistics.median(r["step_s"] for r in res[v])
        cmed = statistics.median(r["cpu_s"] for r in res[v])
        ratios = per_run_ratios([r["step_s"] for r in res[v]], [b["step_s"] for b in res[args.variants[0]]])
        print(f"| {v} | {1000 * med:.1f} | {med / base:.3f} | {', '.join(f'{x:.2f}' for x in ratios)} | "
              f"{1000 * cmed:.1f} | {cmed / cbase:.3f} | "
              f"{statistics.median(r['spag_B'] for r in res[v]) / 2**20:.2f} | "
              f"{1000 * statistics.median(r['after_step_s'] for r in res[v]):.2f} |")


if __name__ == "__main__":
    main()
