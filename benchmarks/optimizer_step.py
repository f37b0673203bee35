"""AdamW step per kernel (`train.optimizer_impl`): time and temporaries on the benchmark model's parameter shapes.

The expert weights of `benchmarks/moe_strategies.py` as one rank holds them on 2 ranks (2 MoE layers x w1/w2/w3,
8 experts stacked [8, 2048, 128]: 12.6M parameters), also split per expert ([2048, 128] each, as DeepSpeed's
`nn.Linear` experts hold them). Each kernel is timed on the same tensors (median of `--iters` steps after one
untimed step that creates the state) and its temporaries measured as the allocation high-water of one step
above the live bytes before it (the profiler's memory events), one thread.

    python benchmarks/optimizer_step.py
    python benchmarks/optimizer_step.py --iters 20 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.measure import live_tensor_bytes, peak_tensor_bytes
from sparsetrain.config_checks import OPTIMIZER_IMPLS

LAYOUTS = {"stacked": [(8, 2048, 128)] * 6, "per-expert": [(2048, 128)] * 48}


def measure(shapes: list[tuple[int, ...]], impl: str, iters: int) -> tuple[float, float]:
    """(median step ms, temporaries MiB) of one AdamW kernel on fresh parameters of these shapes."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, **OPTIMIZER_IMPLS[impl])
    opt.step()  # state created
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    base = live_tensor_bytes()
    return 1000 * statistics.median(times), (peak_tensor_bytes(opt.step) - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# AdamW step, {args.threads} thread(s), median of {args.iters} steps, torch {torch.__version__}")
    print("| layout | parameters | kernel | step ms | vs for-loop | temporaries MiB |")
    print("|---|---|---|---|---|---|")
    for layout, shapes in LAYOUTS.items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        res = {impl: measure(shapes, impl, args.iters) for impl in OPTIMIZER_IMPLS}
        for impl, (ms, mib) in res.items():
            print(f"| {layout} | {numel / 1e6:.1f}M | {impl} | {ms:.1f} | {ms / res['for-loop'][0]:.2f} | {mib:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
