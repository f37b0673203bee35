"""Simulator validation: calibrate on some local runs, predict held-out ones, compare with what they measured.

Calibration runs and held-out runs differ in routing skew and batch (held-out configurations are never used
for fitting). Every run is a fresh `sparsetrain train` process (torchrun, 2 ranks, or 1 rank in-process) on a
tiny shape for a few steps. The simulator is calibrated with `sparsetrain.sim.calibrate` (per-rank busy CPU
time and all-to-all span timings), then predicts each held-out run from its config and its recorded expert
loads (a replayed trace: the router is not what is being validated). Prints predicted vs measured step time
(wall) and busiest-rank compute (busy CPU time, which other processes on the host do not inflate) per held-out
run and the fssdp/ep ratio, and ends with `max relative error: X%` (step time).

Robust to a shared host: calibration and held-out runs are interleaved (so both see the same load), and with
`--repeats N` each configuration runs N times and the median step time counts.

    python benchmarks/sim_validation.py --out runs/sim_validation_quiet   # the quiet re-run: 7 runs, ~4 min on 2 cores
    python benchmarks/sim_validation.py --repeats 2     # a shared host: each configuration twice, medians (~2x)
    python benchmarks/sim_validation.py --reuse         # re-analyse the runs already under --out
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.seq_len=128", "moe.num_experts=8",
         "moe.top_k=2", "moe.d_ffn=1024", "moe.aux_loss_coef=0.0", "train.eval_every=0", "train.warmup_steps=2",
         "train.progress=false", "train.trackers=[]", "checkpoint.save_final=false", "checkpoint.resume=false",
         "launch.torch_threads=1", "parallel.pretend_nodes=0", "parallel.fssdp.slots_per_rank=2",
         "parallel.fssdp.overlap_budget=2"]
# name -> (workers, strategy, skew, batch); calibration and held-out sets share no configuration
# (EP runs at two batches separate the all-to-all's per-message latency from its per-slot local work; the
# FSSDP run's spRS rows, bulk point-to-point, give the link bandwidth)
CALIBRATION = {
    "cal-none-b16": (1, "none", 0.0, 16), "cal-none-b32": (1, "none", 0.0, 32),
    "cal-ep-s0-b16": (2, "ep", 0.0, 16), "cal-ep-s1.6-b32": (2, "ep", 1.6, 32),
    "cal-fssdp-s1.6-b16": (2, "fssdp", 1.6, 16),
}
HELD_OUT = {"ho-ep-s1.2-b24": (2, "ep", 1.2, 24), "ho-fssdp-s1.2-b24": (2, "fssdp", 1.2, 24)}
# run order: held-out runs between calibration runs, so a load change on a shared host hits both sets
ORDER = ["cal-none-b16", "ho-ep-s1.2-b24", "cal-fssdp-s1.6-b16", "cal-none-b32", "cal-ep-s0-b16",
         "ho-fssdp-s1.2-b24", "cal-ep-s1.6-b32"]


def run(out: Path, name: str, spec: tuple[int, str, float, int], steps: int, reuse: bool) -> Path:
    """Train one configuration in a fresh process (skipped with --reuse when it finished before)."""
    workers, strategy, skew, batch = spec
    d = out / name
    if reuse and (d / "summary.json").exists():
        return d
    sets = MODEL + [f"launch.workers={workers}", f"parallel.strategy={strategy}", f"moe.router_skew={skew}",
                    f"data.batch_size={batch}", f"train.steps={steps}", f"train.log_every={max(steps // 4, 1)}",
                    f"train.out_dir={d}", "launch.backend=" + ("torchrun" if workers > 1 else "inline")]
    cmd = [sys.executable, "-m", "sparsetrain.cli", "train", "-c", "tiny"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    print(f"  ran {name} in {time.time() - t0:.0f} s", flush=True)
    return d


def busiest_busy_s(r, cluster=None) -> float:
    """Mean over records of the busiest rank's forward compute: measured busy CPU seconds, or (with `cluster`)
    what the calibrated compute model predicts for the same FLOPs and layer passes."""
    from sparsetrain.sim.calibrate import compute_features

    vals = []
    for rec in r.records:
        feats = [compute_features(r, rec, k) for k in range(r.world)]
        if cluster is None:
            vals.append(max(b for _, _, b, _ in feats))
        else:
            vals.append(max(f / cluster.achievable_flops + n * cluster.layer_overhead_s for f, n, _, _ in feats))
    return sum(vals) / len(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration (median step time counts)")
    ap.add_argument("--out", default="runs/sim_validation")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs under --out")
    args = ap.parse_args()
    if args.repeats < 1 or args.steps < 8:
        raise SystemExit("--repeats must be >= 1 and --steps >= 8 (4 logged intervals, the first is warm-up)")
    import dataclasses
    import statistics

    from sparsetrain.sim.calibrate import calibrate, compute_features, load_run, measured_step_s, run_shares
    from sparsetrain.sim.cluster import load_cluster
    from sparsetrain.sim.predict import predict

    out = (ROOT / args.out).resolve()
    specs = {**CALIBRATION, **HELD_OUT}
    dirs: dict[str, list[Path]] = {n: [] for n in ORDER}
    t0 = time.time()
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}: calibration {list(CALIBRATION)}, held out {list(HELD_OUT)}", flush=True)
        for n in ORDER:
            dirs[n].append(run(out, n if rep == 0 else f"{n}-r{rep}", specs[n], args.steps, args.reuse))
    print(f"runs took {time.time() - t0:.0f} s", flush=True)
    cal = [d for n in CALIBRATION for d in dirs[n]]
    cluster, diag = calibrate(cal, load_cluster("cpu-2core"), "cpu-2core")
    (out / "cpu-calibrated.yaml").write_text(cluster.to_yaml())
    print("\ncalibrated:", ", ".join(f"{k}={getattr(cluster, k):.4g}" for k in (
        "achievable_flops", "layer_overhead_s", "intra_node_Bps", "intra_node_latency_s", "bwd_fwd_ratio",
        "optimizer_s_per_param", "step_overhead_s", "cpu_share", "dispatch_s_per_slot")),
        f"({diag['compute_samples']} compute, {diag['link_samples']} all-to-all, {diag['p2p_samples']} spRS "
        f"samples; core share per rank seen {diag['cpu_share_range']})")
    rows, worst, worst_busy = [], 0.0, 0.0
    for name in HELD_OUT:
        runs = [load_run(d) for d in dirs[name]]
        measured = statistics.median(measured_step_s(r) for r in runs)
        pred = statistics.median(predict(r.setup, cluster, r.world, run_shares(r)).step_time_s for r in runs)
        err = abs(pred - measured) / measured
        worst = max(worst, err)
        busy = statistics.median(busiest_busy_s(r) for r in runs)
        busy_pred = statistics.median(busiest_busy_s(r, cluster) for r in runs)
        worst_busy = max(worst_busy, abs(busy_pred - busy) / busy)
        feats = [compute_features(r, rec, k) for r in runs for rec in r.records for k in range(r.world)]
        share = min(1.0, statistics.median(b / w for _, _, b, w in feats))  # these runs' own core share
        at_share = statistics.median(predict(r.setup, dataclasses.replace(cluster, cpu_share=share), r.world,
                                             run_shares(r)).step_time_s for r in runs)
        rows.append((name, measured, pred, err, busy, busy_pred, share, at_share))
    print(f"\n{'held-out run':<20} {'measured ms':>12} {'predicted ms':>13} {'rel err':>8} {'busy ms':>8} "
          f"{'pred. busy':>10} {'rel err':>8} {'core share':>11} {'pred. at that share':>20} {'rel err':>8}")
    for name, m, p, e, b, bp, sh, ps in rows:
        print(f"{name:<20} {1e3 * m:>12.1f} {1e3 * p:>13.1f} {100 * e:>7.1f}% {1e3 * b:>8.1f} {1e3 * bp:>10.1f} "
              f"{100 * abs(bp - b) / b:>7.1f}% {sh:>11.3f} {1e3 * ps:>20.1f} {100 * abs(ps - m) / m:>7.1f}%")
    by = {n: (m, p) for n, m, p, *_ in rows}
    for name, (me, pe) in by.items():
        twin = name.replace("-ep-", "-fssdp-")
        if "-ep-" in name and twin in by:
            mf, pf = by[twin]
            print(f"fssdp/ep step time ({twin.split('-', 2)[2]}): measured {mf / me:.3f}, predicted {pf / pe:.3f}")
    print(f"max relative error of busiest-rank compute (busy CPU time): {100 * worst_busy:.1f}%")
    old, _ = calibrate(cal, load_cluster("cpu-2core"), "cpu-2core", link_from_sprs=False)
    old_errs = []
    for name in HELD_OUT:  # the same runs with the link fitted on the all-to-all alone (before spRS rows)
        runs = [load_run(d) for d in dirs[name]]
        measured = statistics.median(measured_step_s(r) for r in runs)
        pred = statistics.median(predict(r.setup, old, r.world, run_shares(r)).step_time_s for r in runs)
        old_errs.append(f"{name} {1e3 * pred:.1f} ms ({100 * abs(pred - measured) / measured:.1f}%)")
    print(f"link fitted on the all-to-all alone ({old.intra_node_Bps / 1e6:.1f} MB/s): " + ", ".join(old_errs))
    print(f"max relative error: {100 * worst:.1f}%")


if __name__ == "__main__":
    main()
