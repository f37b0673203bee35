"""Re-shard moves against the wire: `reshard.move_ownership` vs the same bytes sent as one message per rank pair.

Two gloo ranks own the benchmark model's experts (16 per layer, [d_ffn, d_model] w1/w2/w3, fp32, Adam state) in
contiguous halves; each timed move swaps `--moves` experts per layer each way and the next one swaps them back,
so every move ships params + both Adam moments of 2 x moves x layers experts. The wire floor is one
`batch_isend_irecv` per rank of the same byte count each way on pre-allocated buffers. Both are timed after a
barrier (median and max over `--repeats`, slowest rank), the first of each untimed (connection set-up).

    python benchmarks/reshard_move.py
    python benchmarks/reshard_move.py --moves 2 4 8 --layers 2 --repeats 9
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _swap(owners: list[int], moves: int) -> list[int]:
    """Owners with the first `moves` experts of each half exchanged between ranks 0 and 1."""
    half = len(owners) // 2
    new = list(owners)
    for e in list(range(moves)) + list(range(half, half + moves)):
        new[e] = 1 - owners[e]
    return new


def _timed(fn, repeats: int) -> list[float]:
    import torch.distributed as dist

    out = []
    for _ in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out[1:]  # the first call sets up connections


def _body(rank: int, world: int, args: argparse.Namespace) -> dict[int, tuple[list[float], list[float], int]]:
    import torch

    from sparsetrain.model.experts import GroupedExperts
    from sparsetrain.parallel.ep import keep_expert_rows
    from sparsetrain.parallel.reshard import moved_bytes_per_expert

    torch.set_num_threads(1)
    out = {}
    for moves in args.moves:
        base = [0] * (args.experts // 2) + [1] * (args.experts // 2)
        layers = [GroupedExperts(args.experts, args.d_model, args.d_ffn) for _ in range(args.layers)]
        for m in layers:
            keep_expert_rows(m, [e for e, o in enumerate(base) if o == rank])
        opt = torch.optim.AdamW([p for m in layers for p in m.parameters()], lr=1e-3)
        sum(p.sum() for m in layers for p in m.parameters()).backward()
        opt.step()
        state = {"owners": [base] * args.layers, "opt": opt}
        nbytes = moves * args.layers * moved_bytes_per_expert(layers[0])  # each way
        send, recv = torch.randn(nbytes // 4), torch.empty(nbytes // 4)
        out[moves] = (_timed(partial(_move, state, layers, moves, rank), args.repeats),
                      _timed(partial(_wire, send, recv, rank), args.repeats), nbytes)
    return out


def _move(state: dict, layers: list, moves: int, rank: int) -> None:
    """One re-shard: swap `moves` experts per layer each way (params + Adam state)."""
    import torch.distributed as dist

    from sparsetrain.parallel.reshard import move_ownership

    new = [_swap(o, moves) for o in state["owners"]]
    state["opt"], _ = move_ownership(layers, state["opt"], state["owners"], new, rank, dist.group.WORLD)
    state["owners"] = new


def _wire(send, recv, rank: int) -> None:
    """The same bytes as one message each way."""
    import torch.distributed as dist

    for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, 1 - rank), dist.P2POp(dist.irecv, recv, 1 - rank)]):
        w.wait()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-ffn", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--moves", type=int, nargs="+", default=[1, 4], help="experts swapped per layer each way")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    if args.experts % 2 or max(args.moves) > args.experts // 2:
        ap.error(f"--experts must be even and --moves at most experts/2 ({args.experts // 2})")
    from tests.dist_utils import run_distributed

    per_rank = run_distributed(_body, 2, args, timeout=900)
    print(f"# reshard_move: 2 gloo ranks, {args.experts} experts x {args.layers} layers, d_model {args.d_model}, "
          f"d_ffn {args.d_ffn}, fp32 + Adam state, {args.repeats} timed moves each (slowest rank)")
    print("| moved per layer each way | MiB each way | move ms median | max | wire ms median | move / wire | "
          "move GB/s |")
    print("|---|---|---|---|---|---|---|")
    for moves in args.moves:
        move = [max(r[moves][0][i] for r in per_rank) for i in range(args.repeats)]
        wire = [max(r[moves][1][i] for r in per_rank) for i in range(args.repeats)]
        nbytes = per_rank[0][moves][2]
        mm, wm = statistics.median(move), statistics.median(wire)
        print(f"| {moves} | {nbytes / 2**20:.3g} | {mm:.1f} | {max(move):.1f} | {wm:.1f} | {mm / wm:.2f} | "
              f"{nbytes / mm / 1e6:.2f} |")


if __name__ == "__main__":
    main()
