"""Capacity-mode quality vs DeepSpeed-MoE: loss after N steps at one capacity factor, same data and weights.

Every variant runs in fresh gloo ranks with one seed, so all start from identical initial weights (the
`deepspeed_moe` adapter copies ours into DeepSpeed's layers) and read identical batches. The model is the
`moe_strategies.py` shape. DeepSpeed runs with `drop_tokens=True`, second-expert sampling and random token
selection off; it has no router z-loss, so both sides train with `moe.z_loss_coef=0` unless `--set` changes it.
Loss is not sensitive to machine load: this measures on a busy machine as well as on a quiet one.

Printed per variant: the training loss at the last step (mean over ranks) and its mean over the last 10 steps,
the validation loss on `data.eval_batches` fixed batches, the ratio of each to DeepSpeed's at the same
capacity, and the share of routed slots dropped (mean over steps, and at the last step).

    python benchmarks/capacity_quality.py                          # 2 ranks, 100 steps, capacity 1.0 and dropless
    python benchmarks/capacity_quality.py --set moe.aux_loss_coef=0 --set train.grad_clip=0   # objective parts
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.moe_strategies import MODEL  # (the harness's shape: one model for both benchmarks)

COMMON = ["moe.aux_loss_coef=0.01", "moe.z_loss_coef=0", "data.eval_batches=8"]


def variants(capacity: float) -> dict[str, list[str]]:
    """name -> overrides: both runtimes at `capacity`, then both dropless as the reference (DeepSpeed first)."""
    return {f"deepspeed_moe cf{capacity}": ["parallel.strategy=deepspeed_moe", f"moe.capacity_factor={capacity}"],
            f"ep cf{capacity}": ["parallel.strategy=ep", f"moe.capacity_factor={capacity}"],
            "deepspeed_moe dropless": ["parallel.strategy=deepspeed_moe", "moe.capacity_factor=0"],
            "ep dropless": ["parallel.strategy=ep", "moe.capacity_factor=0"]}


def _rank_body(rank: int, world: int, overrides: list[str], steps: int) -> dict:
    """One rank: train `steps` steps; per-step loss and dropped slots, then the validation loss."""
    import torch

    from sparsetrain.config import load_config
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config("tiny", MODEL + COMMON + [f"launch.workers={world}", f"train.steps={steps}",
                                                f"train.out_dir=/tmp/st-capq-{os.getpid()}", *overrides])
    tr = Trainer(cfg, init_distributed("cpu"))
    losses, dropped = [], []
    for step in range(steps):
        rec = tr.train_step(step)
        losses.append(rec["loss"])
        dropped.append(rec.get("dropped_slots", 0))
    return {"losses": losses, "dropped": dropped, "val": tr.evaluate(),
            "slots": cfg.data.batch_size * cfg.model.seq_len * cfg.moe.top_k * sum(
                1 for b in tr.model.layers if b.is_moe)}


def summarize(name: str, r: dict) -> dict:
    """One row's numbers from rank 0's record (losses and dropped counts are already global)."""
    frac = [d / r["slots"] for d in r["dropped"]]
    return {"variant": name, "loss": r["losses"][-1], "loss10": statistics.mean(r["losses"][-10:]),
            "val": r["val"], "dropped_mean": statistics.mean(frac), "dropped_last": frac[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--capacity", type=float, default=1.0)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="override for every run")
    ap.add_argument("--no-dropless", action="store_true", help="skip the dropless reference rows")
    ap.add_argument("--runtimes", nargs="+", default=["deepspeed_moe", "ep"], choices=["deepspeed_moe", "ep"],
                    help="whose rows to run (the ratio columns need deepspeed_moe's)")
    args = ap.parse_args()
    if args.capacity <= 0:
        ap.error(f"--capacity must be > 0 (capacity mode), got {args.capacity}")
    from tests.dist_utils import run_distributed

    runs = variants(args.capacity)
    if args.no_dropless:
        runs = {k: v for k, v in runs.items() if "dropless" not in k}
    runs = {k: v for k, v in runs.items() if k.split()[0] in args.runtimes}
    print(f"# capacity_quality: {args.world} ranks, {args.steps} steps, capacity {args.capacity}; "
          f"{' '.join(COMMON + args.extra)}", flush=True)
    print("| variant | loss @ last step | mean last 10 | val loss | last / DeepSpeed | mean10 / DeepSpeed "
          "| val / DeepSpeed | dropped slots % (mean) | dropped % (last step) |\n|---|---|---|---|---|---|---|---|---|",
          flush=True)
    rows: dict[str, dict] = {}
    for name, overrides in runs.items():
        out = run_distributed(_rank_body, args.world, overrides + args.extra, args.steps, timeout=3000,
                              env={"DS_ACCELERATOR": "cpu"})
        x = rows[name] = summarize(name, out[0])
        peer = rows.get(name.replace("ep ", "deepspeed_moe ", 1), x)  # DeepSpeed's run at the same capacity
        print(f"| {name} | {x['loss']:.4f} | {x['loss10']:.4f} | {x['val']:.4f} | {x['loss'] / peer['loss']:.4f} | "
              f"{x['loss10'] / peer['loss10']:.4f} | {x['val'] / peer['val']:.4f} | {100 * x['dropped_mean']:.1f} | "
              f"{100 * x['dropped_last']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
