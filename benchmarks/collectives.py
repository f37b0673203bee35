"""spAG transport choice: batched point-to-point (`batch_isend_irecv`) vs one uneven `all_to_all_single`.

Runs 4 gloo ranks on this machine and prints a table of median spAG times (the slowest rank per
iteration) for a few placements and chunk sizes; also spAG+spRS (forward + backward) round trips.

    .venv/bin/python benchmarks/collectives.py [--world 4] [--iters 40]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sparsetrain.launcher.env import free_port

from sparsetrain.parallel.collectives import plan_sparse, spag
from sparsetrain.telemetry.comm import COMM

Placement = tuple[list[int], list[list[int]]]
BOTH = ("p2p", "a2a")


def placements(world: int) -> dict[str, Placement]:
    """Named placements over 4 experts per rank (owner = e % world)."""
    n = 4 * world
    owners = [e % world for e in range(n)]
    own = [[o] for o in owners]
    everyone = list(range(world))
    rng = random.Random(0)
    one_extra = [sorted([o, rng.choice([r for r in everyone if r != o])]) for o in owners]
    return {
        "3 hot on rank0 -> all": ([0] * 3 + owners[3:], [everyone] * 3 + own[3:]),
        "1 hot on rank0,1 -> all": (owners, [everyone if e < 2 else own[e] for e in range(n)]),
        "1 hot per rank -> all": (owners, [everyone if e < world else own[e] for e in range(n)]),
        "every expert +1 copy": (owners, one_extra),
        "all experts -> all": (owners, [everyone] * n),
    }


def _time(fns: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    """Median over iterations of the slowest rank's time per fn, in ms; fns interleaved (order flips) vs drift."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(iters + 3):
        for k in list(fns)[:: 1 if i % 2 == 0 else -1]:
            dist.barrier()
            t0 = time.perf_counter()
            fns[k]()
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if i >= 3:  # warm-up
                times[k].append(dt.item() * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _spag_fb(owned: torch.Tensor, ids: list[int], owners: list[int], copies: list[list[int]], t: str) -> None:
    mat, _ = spag(owned, ids, owners, copies, transport=t)
    mat.sum().backward()


def _rank_main(rank: int, world: int, port: int, iters: int, chunk_kbs: list[int], queue: Any) -> None:
    """One rank: time every (placement, chunk size, transport); rank 0 puts the rows on the queue."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    rows = []
    for name, (owners, copies) in placements(world).items():
        ids = [e for e, o in enumerate(owners) if o == rank]
        for kb in chunk_kbs:
            owned = torch.randn(len(ids), kb * 1024 // 4)  # [n_owned, C] fp32
            owned_g = owned.clone().requires_grad_(True)
            plan = plan_sparse(owners, copies, rank, world)
            row: dict[str, Any] = {"placement": name, "chunk_kb": kb, "moved": sum(len(c) - 1 for c in copies)}
            row.update(pairs=f"{plan.n_pairs}/{world * (world - 1)}", auto=plan.transport("auto"))
            row.update(_time({t: partial(spag, owned, ids, owners, copies, transport=t) for t in BOTH}, iters))
            fb = _time({t: partial(_spag_fb, owned_g, ids, owners, copies, t) for t in BOTH}, iters // 2)
            row.update({k + "_fb": v for k, v in fb.items()})
            COMM.reset()
            spag(owned, ids, owners, copies)
            nbytes = torch.tensor([COMM.snapshot().get("spag", 0)])
            dist.all_reduce(nbytes)
            row["mb"] = nbytes.item() / 2**20
            rows.append(row)
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    """Spawn the ranks, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--chunk-kb", type=int, nargs="+", default=[16, 256, 1024])
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_rank_main, args=(args.world, free_port("127.0.0.1"), args.iters, args.chunk_kb, queue), nprocs=args.world)
    rows = queue.get()
    print(f"spAG on {args.world} gloo ranks, fp32, median of {args.iters} iters (slowest rank), ms")
    print(
        "| placement | rank pairs | chunk KB | chunks moved | MB moved | p2p spAG | a2a spAG | a2a/p2p "
        "| auto picks | p2p spAG+spRS | a2a spAG+spRS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['placement']} | {r['pairs']} | {r['chunk_kb']} | {r['moved']} | {r['mb']:.2f} | {r['p2p']:.2f} "
            f"| {r['a2a']:.2f} | {r['a2a'] / r['p2p']:.2f} | {r['auto']} | {r['p2p_fb']:.2f} | {r['a2a_fb']:.2f} |"
        )


if __name__ == "__main__":
    main()
