"""Runtime overhead: sparsetrain's strategies vs a minimal DDP loop of the same model, same batches.

The minimal loop is written here: the same `GPT` module (experts replicated, local dispatch), the same
TokenBatches, AdamW, and per step exactly one flat gradient all-reduce (no count reductions, no metric
reductions, no grad-norm collective: after the all-reduce every rank clips the identical gradients).
Each variant runs in fresh gloo processes; per step it prints tokens/s, the ratio to the minimal loop,
the process CPU time per step summed over ranks (main and gloo threads; load-independent, unlike tokens/s on a
shared machine) with the same ratio, and the collectives issued per step by kind (calls and MiB, counted by
wrapping torch.distributed). `--profile PREFIX` writes a cProfile of rank 0's timed steps per variant.

    python benchmarks/overhead.py                        # 1 and 4 ranks, every variant
    python benchmarks/overhead.py --worlds 4 --steps 30 --variants minimal ep dp-ddp
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = ["data.batch_size=32", "train.eval_every=0", "train.log_every=1000", "train.progress=false",
         "checkpoint.save_final=false", "checkpoint.resume=false", "launch.torch_threads=1",
         "parallel.pretend_nodes=0"]  # the tiny preset's model: d_model 128, 4 layers, 8 experts top-2
VARIANTS = {
    "minimal": [],  # the hand-written loop below
    "none": ["parallel.strategy=none"],  # the Trainer, single process only
    "dp-ddp": ["parallel.strategy=dp", "parallel.dense=ddp"],
    "dp-fsdp2": ["parallel.strategy=dp", "parallel.dense=fsdp2"],
    "dp-fsdp2-always": ["parallel.strategy=dp", "parallel.dense=fsdp2", "parallel.fsdp_reshard_after_forward=always"],
    "dp-fsdp2-never": ["parallel.strategy=dp", "parallel.dense=fsdp2", "parallel.fsdp_reshard_after_forward=never"],
    "ep": ["parallel.strategy=ep", "parallel.dense=ddp"],
    "ep-fsdp2": ["parallel.strategy=ep", "parallel.dense=fsdp2"],
    "fssdp": ["parallel.strategy=fssdp"],
}


def _minimal_step(model, opt, x, y, world: int) -> None:
    import torch
    import torch.distributed as dist

    out = model(x, y)
    (out.loss + out.aux_loss + out.z_loss).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if world > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])  # [sum numel]
        dist.all_reduce(flat)
        flat /= world
        parts = flat.split([g.numel() for g in grads])  # [sum numel] -> one flat piece per grad
        torch._foreach_copy_(grads, [c.view_as(g) for c, g in zip(parts, grads)])
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _rank_body(rank: int, world: int, variant: str, steps: int, warmup: int, profile: str = "") -> dict:
    import cProfile

    import torch
    import torch.distributed as dist

    from benchmarks.measure import CollectiveCounter

    counter = CollectiveCounter()
    counter.install()
    from sparsetrain.config import load_config
    from sparsetrain.data import TokenBatches
    from sparsetrain.model.gpt import build_model
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.train.optim import build_optimizer
    from sparsetrain.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config("tiny", SHAPE + [f"launch.workers={world}", f"train.steps={steps}",
                                       f"train.out_dir=/tmp/st-overhead-{os.getpid()}", *VARIANTS[variant]])
    if variant == "minimal":
        model = build_model(cfg)
        opt = build_optimizer(list(model.named_parameters()), cfg.train)
        data = TokenBatches(cfg, rank, world)

        def step_fn(step: int) -> None:
            x, y = data.train_batch(step)
            _minimal_step(model, opt, x, y, world)
    else:
        tr = Trainer(cfg, init_distributed("cpu"))

        def step_fn(step: int) -> None:
            tr.train_step(step)
    t0 = c0 = m0 = 0.0
    prof = cProfile.Profile(time.thread_time) if profile and rank == 0 else None  # CPU, not waits
    for step in range(steps):
        if step == warmup:
            if world > 1:
                dist.barrier()
            counter.pop()
            counter.enabled = True
            t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
            if prof is not None:
                prof.enable()
        step_fn(step)
    cpu, main_cpu = time.process_time() - c0, time.thread_time() - m0  # before the barrier's wait
    if prof is not None:
        prof.disable()
        prof.dump_stats(f"{profile}.{variant}.w{world}.prof")
    if world > 1:
        dist.barrier()
    wall = time.perf_counter() - t0
    counter.enabled = False
    calls, nbytes = counter.pop()
    n = steps - warmup
    return {"wall": wall, "cpu": cpu, "main_cpu": main_cpu, "steps": n, "calls": {k: v / n for k, v in calls.items()},
            "mib": {k: v / n / 2**20 for k, v in nbytes.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile", default="", metavar="PREFIX",
                    help="cProfile (main-thread CPU time) rank 0 over the timed steps into PREFIX.<variant>.w<ranks>.prof")
    args = ap.parse_args()
    from tests.dist_utils import run_distributed

    tokens = 32 * 128
    print(f"# overhead: tiny model, global batch 32 x 128 tokens, {args.steps} steps ({args.warmup} not timed), "
          f"fresh gloo processes per variant")
    print("| ranks | variant | tokens/s | vs minimal | CPU ms/step, all ranks (main threads) | CPU vs minimal | "
          "collectives per step (calls, MiB; rank 0) |\n|---|---|---|---|---|---|---|")
    for world in args.worlds:
        ref = ref_cpu = None
        for v in args.variants:
            if v == "none" and world > 1:
                continue
            res = run_distributed(_rank_body, world, v, args.steps, args.warmup, args.profile, timeout=3000)
            wall = max(r["wall"] for r in res)
            tps = tokens * res[0]["steps"] / wall
            cpu = 1000 * sum(r["cpu"] for r in res) / res[0]["steps"]  # process CPU time (gloo threads too)
            main_cpu = 1000 * sum(r["main_cpu"] for r in res) / res[0]["steps"]
            ref = tps if v == "minimal" else ref
            ref_cpu = cpu if v == "minimal" else ref_cpu
            kinds = ", ".join(f"{k} {c:g}x {res[0]['mib'].get(k, 0):.2f}" for k, c in sorted(res[0]["calls"].items()))
            ratio = f"{tps / ref:.2f}" if ref else "-"
            cpu_ratio = f"{ref_cpu / cpu:.2f}" if ref_cpu else "-"  # like tokens/s: minimal's CPU / this CPU
            print(f"| {world} | {v} | {tps:,.0f} | {ratio} | {cpu:,.0f} ({main_cpu:,.0f}) | {cpu_ratio} | {kinds or 'none'} |",
                  flush=True)


if __name__ == "__main__":
    main()
