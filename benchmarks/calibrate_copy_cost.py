"""Measure the two machine numbers of FSSDP's copy cost gate: spAG bandwidth and expert GEMM throughput.

Runs on `--world` gloo ranks (one thread each) of this machine: times an spAG that sends every expert
chunk to every rank (as `parallel.fssdp.link_GBps=-1` does once at set-up) and the forward + backward of
one rank's grouped SwiGLU experts at the given shape. Prints medians of `--reps`; set the results as
`parallel.fssdp.link_GBps` / `parallel.fssdp.expert_TFLOPs` to pin them (placement stays deterministic).

    python benchmarks/calibrate_copy_cost.py                         # tiny preset shape, 2 ranks
    python benchmarks/calibrate_copy_cost.py --d-model 128 --d-ffn 2048 --experts 16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _body(rank: int, world: int, d: int, f: int, e: int, tokens: int, reps: int) -> dict:
    import torch
    import torch.distributed as dist

    from sparsetrain.model.experts import GroupedExperts
    from sparsetrain.parallel.copy_cost import expert_flops_per_slot
    from sparsetrain.parallel.placement import LayerPlacement, initial_owners
    from sparsetrain.parallel.sparse_collectives import spag

    torch.manual_seed(rank)
    chunk = 3 * d * f
    probe = LayerPlacement.from_lists(initial_owners(e, world), [range(world)] * e)
    owners, copies = list(probe.owners), [list(c) for c in probe.copies]
    rows = torch.randn(len(probe.owned_by(rank)), chunk)
    local = e // world
    experts = GroupedExperts(local, d, f)
    experts.reset_parameters(0.02, 0.02)
    x = torch.randn(tokens, d, requires_grad=True)
    counts = [tokens // local] * (local - 1) + [tokens - (tokens // local) * (local - 1)]
    bw, fl = [], []
    for _ in range(reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        spag(rows, probe.owned_by(rank), owners, copies, None)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        bw.append(probe.spag_bytes(chunk * 4) / world / float(dt))
        t0 = time.perf_counter()
        experts(x, counts).sum().backward()
        fl.append(tokens * expert_flops_per_slot(d, f) / (time.perf_counter() - t0))
    return {"GBps": statistics.median(bw[1:]) / 1e9, "TFLOPs": statistics.median(fl[1:]) / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-ffn", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048, help="routed slots per rank")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    from tests.dist_utils import run_distributed

    res = run_distributed(_body, a.world, a.d_model, a.d_ffn, a.experts, a.tokens, a.reps, timeout=1200)
    gbps = min(r["GBps"] for r in res)
    tflops = min(r["TFLOPs"] for r in res)
    print(f"spAG bandwidth per rank: {gbps:.3f} GB/s; expert fwd+bwd: {tflops:.4f} TFLOP/s "
          f"(machine balance {tflops * 1e3 / gbps:.1f} FLOP/byte)")
    print(f"  --set parallel.fssdp.link_GBps={gbps:.3g} parallel.fssdp.expert_TFLOPs={tflops:.3g}")


if __name__ == "__main__":
    main()
