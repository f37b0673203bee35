"""CPU cost of EP's token exchange beyond local dispatch: one MoE layer, forward + backward, main-thread CPU time.

The same router, experts and tokens through `token_exchange.exchange_and_compute` (EP's path: count exchange,
permutation, uneven all-to-all both ways, regrouping by expert) on a 1-rank gloo group, and through the
single-process `LocalDispatcher`; interleaved repetitions, medians. On one rank the all-to-alls are local copies,
so the difference is the exchange's host work (what a minimal loop does not do); the outputs must be identical.
Small `--d-ffn` makes the experts cheap so the exchange dominates.

    python benchmarks/ep_dispatch.py --tokens 1024 --d-ffn 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank (tiny preset, 4 ranks: 1024)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-ffn", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--iters", type=int, default=10, help="layer fwd+bwd per timed repetition")
    args = ap.parse_args()
    import torch
    import torch.distributed as dist

    from sparsetrain.model.experts import GroupedExperts
    from sparsetrain.model.moe import LocalDispatcher
    from sparsetrain.model.router import TopKRouter
    from sparsetrain.parallel.token_exchange import exchange_and_compute

    torch.set_num_threads(1)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    torch.manual_seed(0)
    e, k = args.experts, args.top_k
    router = TopKRouter(args.d_model, e, k)
    router.reset_parameters(0.02)
    experts = GroupedExperts(e, args.d_model, args.d_ffn)
    experts.reset_parameters(0.02, 0.02)
    x0 = torch.randn(args.tokens, args.d_model)
    ids = list(range(e))

    def ep() -> torch.Tensor:
        x = x0.clone().requires_grad_()
        route = router(x)
        slot_rank = torch.zeros(x.shape[0] * k, dtype=torch.long)  # every expert on this (only) rank
        out = exchange_and_compute(x, route, slot_rank, e, ids, lambda xs, c: experts(xs, c, ids=ids), None)[0]
        out.sum().backward()
        return out

    def local() -> torch.Tensor:
        x = x0.clone().requires_grad_()
        out = LocalDispatcher()(experts, x, router(x))[0]
        out.sum().backward()
        return out

    if not torch.equal(ep(), local()):
        raise SystemExit("EP exchange and local dispatch disagree")
    ms: dict[str, list[float]] = {"ep_exchange": [], "local": []}
    for _ in range(args.repeats):
        for name, fn in (("ep_exchange", ep), ("local", local)):
            t = time.thread_time()
            for _ in range(args.iters):
                fn()
            ms[name].append((time.thread_time() - t) / args.iters * 1000)
    med = {n: statistics.median(v) for n, v in ms.items()}
    print(f"# ep_dispatch: {args.tokens} tokens x d_model {args.d_model}, {e} experts top-{k}, d_ffn {args.d_ffn}, "
          f"{args.repeats} interleaved repeats x {args.iters} (pid {os.getpid()})")
    print("| path | CPU ms per layer fwd+bwd (median) | min |\n|---|---|---|")
    for n, v in ms.items():
        print(f"| {n} | {med[n]:.3f} | {min(v):.3f} |")
    print(f"exchange overhead: {med['ep_exchange'] - med['local']:.3f} ms per layer "
          f"({med['ep_exchange'] / med['local']:.2f}x local)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
