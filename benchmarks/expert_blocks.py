"""CPU experts: a hot expert's rows in cache-sized blocks (`kernels.grouped.CPU_BLOCK_BYTES`) vs in one piece.

SwiGLU forward + backward of one rank's experts (`swiglu_experts_reference`, the CPU path of every strategy),
on Zipf-skewed counts (a hot expert holding most of the rank's slots, as FSSDP's owner or EP's busiest rank
sees on the drift / zipf1.2 workloads) and on balanced counts with the same total. Same weights, rows and
output gradient. Variants are interleaved and the medians are reported; one thread. Outputs and gradients
must agree within fp32 rounding.

    python benchmarks/expert_blocks.py
    python benchmarks/expert_blocks.py --rows 4096 --experts 8 --repeats 20
    python benchmarks/expert_blocks.py --curve     # one expert's cost per row vs its row count

The curve shows why skewed counts cost more than balanced ones with the same total even in blocks: an expert
with few rows runs its GEMMs at a lower rate per row, and under Zipf skew the rank holding the hot expert
holds the coldest ones too (equal experts per rank).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparsetrain.kernels import grouped, swiglu_experts_reference


def zipf_counts(rows: int, experts: int, s: float) -> list[int]:
    """`rows` split over `experts` by Zipf(s) shares, hottest first (rounding left to the hottest)."""
    shares = [1 / (k + 1) ** s for k in range(experts)]
    counts = [int(rows * w / sum(shares)) for w in shares]
    counts[0] += rows - sum(counts)
    return counts


def step(x: torch.Tensor, counts: list[int], ws: list[torch.Tensor], g: torch.Tensor, block_bytes: int
         ) -> tuple[float, list[torch.Tensor]]:
    """Seconds for forward + backward with blocks of `block_bytes`; the output and gradients."""
    grouped.CPU_BLOCK_BYTES = block_bytes
    x = x.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in ws]
    t0 = time.perf_counter()
    y = swiglu_experts_reference(x, counts, *ws)
    y.backward(g)
    dt = time.perf_counter() - t0
    return dt, [y.detach(), x.grad] + [w.grad for w in ws]


def curve(ws: list[torch.Tensor], repeats: int) -> None:
    """Microseconds per row of one expert's forward and backward vs its row count (interleaved medians)."""
    sizes = [16, 32, 64, 96, 128, 192, 256, 384, 512, 1024]
    one = [w[:1] for w in ws]  # [1, ...]: expert 0 alone
    times: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
    for rep in range(repeats + 1):  # the first round warms up
        for n in (sizes if rep % 2 else sizes[::-1]):
            x, g = torch.randn(n, ws[0].shape[2], requires_grad=True), torch.randn(n, ws[0].shape[2])
            w = [t.clone().requires_grad_() for t in one]
            t0 = time.perf_counter()
            y = swiglu_experts_reference(x, [n], *w)
            t1 = time.perf_counter()
            y.backward(g)
            if rep:
                times[n].append((t1 - t0, time.perf_counter() - t1))
    print("| rows | forward us/row | backward us/row | total us/row | vs 512 rows |")
    print("|---|---|---|---|---|")
    per_row = {n: [1e6 * statistics.median(t[i] for t in times[n]) / n for i in (0, 1)] for n in sizes}
    for n, (f, b) in per_row.items():
        print(f"| {n} | {f:.1f} | {b:.1f} | {f + b:.1f} | {(f + b) / sum(per_row[512]):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096, help="slots on the rank (moe_strategies, 2 ranks: 4096)")
    ap.add_argument("--experts", type=int, default=8, help="experts on the rank")
    ap.add_argument("--skew", type=float, default=1.2, help="Zipf exponent of the skewed counts")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-ffn", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--curve", action="store_true", help="print one expert's cost per row vs its row count")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d, f, e = args.d_model, args.d_ffn, args.experts
    ws = [torch.randn(e, f, d) * d ** -0.5, torch.randn(e, d, f) * f ** -0.5, torch.randn(e, f, d) * d ** -0.5]
    if args.curve:
        print(f"# expert_blocks --curve: one expert, d_model {d}, d_ffn {f}, fp32, 1 thread, {args.repeats} "
              "interleaved repetitions (medians)")
        return curve(ws, args.repeats)
    shipped = grouped.CPU_BLOCK_BYTES
    variants = {"one piece": 1 << 62, f"blocks of {shipped >> 20} MiB (shipped)": shipped}
    print(f"# expert_blocks: {args.rows} rows on {e} experts, d_model {d}, d_ffn {f}, fp32, 1 thread, "
          f"{args.repeats} interleaved repetitions (medians)")
    print("| counts | " + " | ".join(f"{v} ms" for v in variants) + " | blocks / one piece |")
    print("|---|" + "---|" * (len(variants) + 1))
    for name, counts in (("zipf", zipf_counts(args.rows, e, args.skew)), ("balanced", [args.rows // e] * e)):
        x, g = torch.randn(sum(counts), d), torch.randn(sum(counts), d)
        times: dict[str, list[float]] = {v: [] for v in variants}
        outs: dict[str, list[torch.Tensor]] = {}
        for rep in range(args.repeats + 1):  # the first round warms up
            order = list(variants) if rep % 2 else list(reversed(variants))
            for v in order:
                dt, outs[v] = step(x, counts, ws, g, variants[v])
                if rep:
                    times[v].append(dt)
        for a, b in zip(*outs.values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        med = [1e3 * statistics.median(t) for t in times.values()]
        print(f"| {name} {counts} | " + " | ".join(f"{m:.1f}" for m in med) + f" | {med[1] / med[0]:.2f} |")
    grouped.CPU_BLOCK_BYTES = shipped


if __name__ == "__main__":
    main()
