"""One MoE layer's experts called twice, as under `parallel.a2a_overlap` (own slots, then the received ones),
forward + backward: weights bound once per layer (`GroupedExperts.bind`, what EP and FSSDP do) vs bound per
call (each call unbinds the stacked weights again and backward stacks and adds full [E, out, in] gradients).

Same weights, rows and output gradient; interleaved repetitions, medians; one thread. The gradients must agree.

    python benchmarks/expert_calls.py
    python benchmarks/expert_calls.py --experts 16 --rows 128 --repeats 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparsetrain.model.experts import GroupedExperts


def step(experts: GroupedExperts, xs: list[torch.Tensor], counts: list[int], bound: bool) -> float:
    """Seconds for both calls' forward + backward."""
    experts.zero_grad(set_to_none=True)
    xs = [x.clone().requires_grad_() for x in xs]
    t0 = time.perf_counter()
    fn = experts.bind() if bound else experts
    y = torch.cat([fn(x, counts) for x in xs])
    y.square().mean().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8, help="experts on this rank (moe_strategies, 2 ranks: 8)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-ffn", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=128, help="rows per expert in each call")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    experts = GroupedExperts(args.experts, args.d_model, args.d_ffn)
    experts.reset_parameters(0.02, 0.02)
    counts = [args.rows] * args.experts
    xs = [torch.randn(args.rows * args.experts, args.d_model) for _ in range(2)]
    grads = {}
    for bound in (True, False):
        step(experts, xs, counts, bound)
        grads[bound] = [p.grad.clone() for p in experts.parameters()]
    if not all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads[True], grads[False])):
        raise SystemExit("bound and per-call gradients differ")
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.repeats):
        for bound in ((True, False) if r % 2 else (False, True)):
            times[bound].append(step(experts, xs, counts, bound))
    per_call, once = (1000 * statistics.median(times[b]) for b in (False, True))
    print(f"# {args.experts} experts, d_model {args.d_model}, d_ffn {args.d_ffn}, 2 calls x {args.rows} rows per "
          f"expert, forward + backward, median of {args.repeats} interleaved repetitions, 1 thread")
    print("| weights bound | ms | vs per call |\n|---|---|---|")
    print(f"| per call | {per_call:.1f} | 1.00 |\n| once per layer | {once:.1f} | {once / per_call:.2f} |")


if __name__ == "__main__":
    main()
