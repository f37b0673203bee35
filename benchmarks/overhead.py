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
    python benchmarks/overhead.py --worlds 4 --steps 40 --repeats 3 --routing balanced   # medians of 3
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
    "ep-serial": ["parallel.strategy=ep", "parallel.dense=ddp", "parallel.a2a_overlap=false"],  # no a2a overlap
    "ep-fsdp2": ["parallel.strategy=ep", "parallel.dense=fsdp2"],
    "fssdp": ["parallel.strategy=fssdp"],
    "fssdp-ddp": ["parallel.strategy=fssdp", "parallel.dense=ddp"],
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


ROUTING = {  # --routing: the router's own (learned) top-k, or a workload that fixes each expert's share
    "learned": [],
    "balanced": ["moe.router_skew=1e-6"],  # equal shares: EP's ranks get equal expert work
    "trace": ["moe.routing_trace=benchmarks/traces/aux_on.jsonl"],
}


def _rank_body(rank: int, world: int, variant: str, steps: int, warmup: int, profile: str = "",
               routing: str = "learned") -> dict:
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
                                       f"train.out_dir=/tmp/st-overhead-{os.getpid()}", *ROUTING[routing],
                                       *VARIANTS[variant]])
    if variant == "minimal":
        model = build_model(cfg)
        opt = build_optimizer(list(model.named_parameters()), cfg.train)
        data = TokenBatches(cfg, rank, world)

        def step_fn(step: int) -> None:
            x, y = data.train_batch(step)
            model.set_routing_step(step)  # routing workloads (a replayed trace) follow the step, as in the Trainer
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
    ap.add_argument("--routing", default="learned", choices=list(ROUTING),
                    help="learned: the router's top-k (EP's ranks then carry unequal expert work); balanced: equal "
                         "shares per expert, so the ratio measures the runtime, not the routing; trace: aux_on.jsonl")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repetitions per variant (medians)")
    ap.add_argument("--profile", default="", metavar="PREFIX",
                    help="cProfile (main-thread CPU time) rank 0 over the timed steps into PREFIX.<variant>.w<ranks>.prof")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: must be >= 1")
    from statistics import median

    from benchmarks.measure import per_run_ratios, run_interleaved
    from tests.dist_utils import run_distributed

    tokens = 32 * 128
    print(f"# overhead: tiny model, global batch 32 x 128 tokens, {args.steps} steps ({args.warmup} not timed), "
          f"routing {args.routing}, {args.repeats} interleaved repetition(s), fresh gloo processes per run")
    print("| ranks | variant | tokens/s | vs minimal (runs) | CPU ms/step, all ranks (main threads) | CPU vs minimal | "
          "collectives per step (calls, MiB; rank 0) |\n|---|---|---|---|---|---|---|")
    for world in args.worlds:
        variants = [v for v in args.variants if not (v == "none" and world > 1)]

        def run(v: str, world: int = world) -> dict:
            res = run_distributed(_rank_body, world, v, args.steps, args.warmup, args.profile, args.routing,
                                  timeout=3000)
            return {"tps": tokens * res[0]["steps"] / max(r["wall"] for r in res),
                    "cpu": 1000 * sum(r["cpu"] for r in res) / res[0]["steps"],  # process CPU (gloo threads too)
                    "main_cpu": 1000 * sum(r["main_cpu"] for r in res) / res[0]["steps"],
                    "calls": res[0]["calls"], "mib": res[0]["mib"]}

        def log(rep: int, v: str, r: dict, world: int = world) -> None:
            print(f"# rep {rep + 1}/{args.repeats} {world} ranks {v}: {r['tps']:,.0f} tokens/s, "
                  f"CPU {r['cpu']:,.0f} ms/step", flush=True)

        out = run_interleaved(variants, args.repeats, run, log)
        ref = out.get("minimal")
        for v in variants:
            rs = out[v]
            tps, cpu = [r["tps"] for r in rs], [r["cpu"] for r in rs]
            kinds = ", ".join(f"{k} {c:g}x {rs[0]['mib'].get(k, 0):.2f}" for k, c in sorted(rs[0]["calls"].items()))
            if ref:  # paired: each run against the minimal loop's run of the same repetition
                ratios = per_run_ratios(tps, [r["tps"] for r in ref])
                cpu_ratios = [1 / x for x in per_run_ratios(cpu, [r["cpu"] for r in ref])]  # minimal's CPU / this
                ratio = f"{median(ratios):.2f}" + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(rs) > 1 else "")
                cpu_ratio = f"{median(cpu_ratios):.2f}"
            else:
                ratio = cpu_ratio = "-"
            print(f"| {world} | {v} | {median(tps):,.0f} | {ratio} | {median(cpu):,.0f} "
                  f"({median(r['main_cpu'] for r in rs):,.0f}) | {cpu_ratio} | {kinds or 'none'} |", flush=True)


if __name__ == "__main__":
    main()
