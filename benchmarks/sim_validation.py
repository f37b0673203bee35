"""Simulator validation: calibrate on some local runs, predict held-out ones, compare with what they measured.

Calibration runs and held-out runs differ in routing skew and batch (held-out configurations are never used
for fitting). Every run is a fresh `sparsetrain train` process (torchrun, 2 ranks, or 1 rank in-process) on a
tiny shape for a few steps. The simulator is calibrated with `sparsetrain.sim.calibrate` (per-rank busy CPU
time and all-to-all span timings), then predicts each held-out run from its config and its recorded expert
loads (a replayed trace: the router is not what is being validated). Prints predicted vs measured step time
per strategy and the fssdp/ep ratio, and ends with `max relative error: X%`.

    python benchmarks/sim_validation.py                 # 6 short runs
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
CALIBRATION = {
    "cal-none-b16": (1, "none", 0.0, 16), "cal-none-b32": (1, "none", 0.0, 32),
    "cal-ep-s0-b16": (2, "ep", 0.0, 16), "cal-ep-s1.6-b16": (2, "ep", 1.6, 16),
}
HELD_OUT = {"ho-ep-s1.2-b24": (2, "ep", 1.2, 24), "ho-fssdp-s1.2-b24": (2, "fssdp", 1.2, 24)}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default="runs/sim_validation")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs under --out")
    args = ap.parse_args()
    import dataclasses

    from sparsetrain.sim.calibrate import calibrate, compute_features, load_run, measured_step_s, run_shares
    from sparsetrain.sim.cluster import load_cluster
    from sparsetrain.sim.predict import predict

    out = (ROOT / args.out).resolve()
    print(f"calibration runs ({len(CALIBRATION)}):", flush=True)
    cal = [run(out, n, s, args.steps, args.reuse) for n, s in CALIBRATION.items()]
    print(f"held-out runs ({len(HELD_OUT)}):", flush=True)
    held = {n: run(out, n, s, args.steps, args.reuse) for n, s in HELD_OUT.items()}
    cluster, diag = calibrate(cal, load_cluster("cpu-2core"), "cpu-2core")
    (out / "cpu-calibrated.yaml").write_text(cluster.to_yaml())
    print("\ncalibrated:", ", ".join(f"{k}={getattr(cluster, k):.4g}" for k in (
        "achievable_flops", "layer_overhead_s", "intra_node_Bps", "intra_node_latency_s", "bwd_fwd_ratio",
        "optimizer_s_per_param", "step_overhead_s", "cpu_share")), f"({diag['compute_samples']} compute, "
        f"{diag['link_samples']} link samples; core share per rank seen {diag['cpu_share_range']})")
    rows, worst = [], 0.0
    for name, d in held.items():
        r = load_run(d)
        measured = measured_step_s(r)
        pred = predict(r.setup, cluster, r.world, run_shares(r)).step_time_s
        err = abs(pred - measured) / measured
        worst = max(worst, err)
        feats = [compute_features(r, rec, k) for rec in r.records for k in range(r.world)]
        share = min(1.0, sorted(b / w for _, _, b, w in feats)[len(feats) // 2])  # this run's own core share
        at_share = predict(r.setup, dataclasses.replace(cluster, cpu_share=share), r.world, run_shares(r)).step_time_s
        rows.append((name, measured, pred, err, share, at_share))
    print(f"\n{'held-out run':<20} {'measured ms':>12} {'predicted ms':>13} {'rel err':>8} {'core share':>11} "
          f"{'pred. at that share':>20} {'rel err':>8}")
    for name, m, p, e, sh, ps in rows:
        print(f"{name:<20} {1e3 * m:>12.1f} {1e3 * p:>13.1f} {100 * e:>7.1f}% {sh:>11.3f} {1e3 * ps:>20.1f} "
              f"{100 * abs(ps - m) / m:>7.1f}%")
    by = {n: (m, p) for n, m, p, *_ in rows}
    for name, (me, pe) in by.items():
        twin = name.replace("-ep-", "-fssdp-")
        if "-ep-" in name and twin in by:
            mf, pf = by[twin]
            print(f"fssdp/ep step time ({twin.split('-', 2)[2]}): measured {mf / me:.3f}, predicted {pf / pe:.3f}")
    print(f"max relative error: {100 * worst:.1f}%")


if __name__ == "__main__":
    main()
