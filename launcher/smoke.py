"""A stand-in worker entry with train_worker's contract: checks the process group only.

`--entry sparsetrain.launcher.smoke:smoke_worker` runs it instead of training, to
check a cluster's wiring (ranks, rendezvous, collectives, log streaming) in seconds.
"""
from __future__ import annotations

import os
import signal
import time

from sparsetrain.launcher.env import FAIL_RANK_ENV

KILL_RANK_ENV = "SPARSETRAIN_SMOKE_KILL_RANK"  # smoke only: that rank SIGKILLs itself at step 2
SLEEP_ENV = "SPARSETRAIN_SMOKE_SLEEP"  # smoke only: seconds to sleep per step


def smoke_worker(cfg_dict: dict) -> dict | None:
    """Join the process group, all-reduce the ranks a few times, return a summary on rank 0."""
    import datetime

    import torch
    import torch.distributed as dist

    from sparsetrain.rendezvous import loopback_store

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = cfg_dict.get("train", {}).get("device", "auto") != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    store = loopback_store(rank, world, datetime.timedelta(seconds=300))  # None unless MASTER_ADDR is loopback
    dist.init_process_group("nccl" if use_cuda else "gloo", **({"store": store, "rank": rank, "world_size": world}
                                                                if store is not None else {}))
    try:
        steps = int(cfg_dict.get("train", {}).get("steps", 3))
        fail_rank = os.environ.get(FAIL_RANK_ENV, "")
        kill_rank = os.environ.get(KILL_RANK_ENV, "")
        pause = float(os.environ.get(SLEEP_ENV, "0.01"))
        total = 0.0
        for step in range(1, steps + 1):
            if fail_rank and int(fail_rank) == rank and step == 1:
                raise RuntimeError(f"injected failure on rank {rank}")
            if kill_rank and int(kill_rank) == rank and step == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            t = torch.tensor([float(rank + step)], device="cuda" if use_cuda else "cpu")
            dist.all_reduce(t)
            total = float(t.item())
            print(f"step {step} | loss {1.0 / step:.4f} | allreduce {total:.1f}", flush=True)
            time.sleep(pause)
        expected = world * (world - 1) / 2 + world * steps
        if total != expected:
            raise RuntimeError(f"all_reduce gave {total}, expected {expected}")
        return {"world_size": world, "steps": steps, "allreduce": total} if rank == 0 else None
    finally:
        dist.destroy_process_group()
