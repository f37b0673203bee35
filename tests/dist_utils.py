"""Multi-process test harness: run a function on N gloo ranks and get each rank's result back.

Usage (``fn`` must be a module-level function so it pickles)::

    from tests.dist_utils import run_distributed  # tests/conftest.py puts the repo root on sys.path

    def _body(rank: int, world_size: int, n: int) -> float:
        ...  # the default process group is initialised (gloo)
        return value

    results = run_distributed(_body, 4, 10)  # [rank0, rank1, rank2, rank3]

Start-up cost matters because many tests use this. Children are started from a
``forkserver`` that has already imported torch (torch import is ~1.6 s per process
on this machine, so plain ``spawn`` pays it on every rank of every call); the
server itself is a clean single-threaded process, so fork-safety is the same as
spawn's. Set ``SPARSETRAIN_TEST_START_METHOD=spawn`` to use plain spawn instead.
The rendezvous store is created in the parent on a kernel-chosen port and held
open for the whole run, so there is no free-port race between concurrent tests.
"""
from __future__ import annotations

import os
import pickle
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sparsetrain.launcher.env import is_peer_error

__all__ = ["DistributedError", "run_distributed", "start_method"]

ECHO_GRACE_S = 10.0  # how long an echo of a lost peer waits for that peer's own failure

# Imported once in the fork server, so ranks start warm. Nothing of ours (a syntax error there would kill the
# server); torch.distributed.tensor costs ~0.45 s and is pulled in lazily by torch.testing.assert_close and FSDP2.
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp", "numpy", "pytest"]


class DistributedError(RuntimeError):
    """A rank raised, crashed, or the run timed out; the message holds the rank's traceback."""


def start_method() -> str:
    """Multiprocessing start method used for ranks ('forkserver' unless overridden by env)."""
    method = os.environ.get("SPARSETRAIN_TEST_START_METHOD", "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"SPARSETRAIN_TEST_START_METHOD={method!r}: expected 'forkserver' or 'spawn'")
    return method


def _context() -> Any:
    method = start_method()
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _worker(
    rank: int,
    world_size: int,
    port: int,
    timeout: float,
    backend: str,
    env: dict[str, str],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    conn: Connection,
) -> None:
    """Child body: set env, init the process group, run fn, send ('ok'|'err', payload) back, destroy the group."""
    try:
        os.environ.update(env)
        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False, timeout=timedelta(seconds=timeout))
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
        )
        result = fn(rank, world_size, *args)
        msg = ("ok", pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        # Leave together: a rank that finishes early (e.g. not in a subgroup) and tears its gloo pairs down
        # while the others still connect or run collectives made them fail under load ("connectFullMesh
        # failed", "Connection closed by peer"); the trainer's shutdown_distributed does the same.
        dist.barrier()
    except BaseException:  # noqa: BLE001 - everything goes back to the parent as text
        msg = ("err", traceback.format_exc())
    try:
        conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _rank_env(rank: int, world_size: int, port: int, env: dict[str, str] | None) -> dict[str, str]:
    base = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        "OMP_NUM_THREADS": "1",
    }
    base.update(env or {})
    return base


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` ranks (gloo by default); return results in rank order."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be >= 1")
    if getattr(fn, "__name__", "<lambda>") == "<lambda>" or "<locals>" in getattr(fn, "__qualname__", ""):
        raise ValueError(f"run_distributed needs a module-level function (picklable), got {fn!r}")
    ctx = _context()
    # The parent owns the store: the port is chosen by the kernel and stays bound for the whole run.
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False)
    port = store.port
    procs, conns = [], []
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_worker,
                args=(rank, world_size, port, timeout, backend, _rank_env(rank, world_size, port, env), fn, args, writer),
                daemon=False,  # daemonic processes may not start children (DataLoader workers); killed in finally
                name=f"rank{rank}",
            )
            p.start()
            writer.close()
            procs.append(p)
            conns.append(reader)
        return _collect(procs, conns, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        for c in conns:
            c.close()
        del store


def _collect(procs: list[Any], conns: list[Connection], timeout: float) -> list[Any]:
    """Wait for every rank's message; raise on the first failure, crash, or timeout.

    The error names the cause, not an echo: a rank that died or failed on its own comes before one whose
    collective only lost that peer ('Connection reset/closed by peer'), which under load can reach the parent
    first. When only echoes are in, the parent waits up to ECHO_GRACE_S for the rank that went away."""
    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    by_conn = {c: r for r, c in enumerate(conns)}
    by_sentinel = {p.sentinel: r for r, p in enumerate(procs)}
    grace_end = None
    while len(results) + len(failures) < len(procs):
        now = time.monotonic()
        if failures and (grace_end is None or now >= grace_end):
            break
        left = min(deadline, grace_end or deadline) - now
        if left <= 0:
            pending = sorted(set(range(len(procs))) - set(results) - set(failures))
            raise DistributedError(f"timed out after {timeout} s waiting for ranks {pending} (killed)")
        pending = [r for r in range(len(procs)) if r not in results and r not in failures]
        ready = wait([conns[r] for r in pending] + [procs[r].sentinel for r in pending], timeout=left)
        for obj in ready:
            rank = by_conn.get(obj, by_sentinel.get(obj))
            if rank in results or rank in failures:
                continue
            if isinstance(obj, int):  # a sentinel: the rank exited; it may still have a message in its pipe
                if conns[rank].poll():
                    continue
                procs[rank].join(timeout=5)
                failures[rank] = f"rank {rank} exited with code {procs[rank].exitcode} without a result"
                continue
            try:
                status, payload = pickle.loads(conns[rank].recv_bytes())
            except EOFError:
                procs[rank].join(timeout=5)
                failures[rank] = f"rank {rank} closed its pipe without a result (exit code {procs[rank].exitcode})"
                continue
            if status == "err":
                failures[rank] = f"rank {rank} failed:\n{payload}"
            else:
                results[rank] = pickle.loads(payload)
        if failures and grace_end is None:
            causes = [m for m in failures.values() if not is_peer_error(m)]
            grace_end = time.monotonic() + (0 if causes else ECHO_GRACE_S)
    if failures:
        raise DistributedError(_root_cause(failures))
    return [results[r] for r in range(len(procs))]


def _root_cause(failures: dict[int, str]) -> str:
    """The failure to report first: a crash, then an error of the rank's own, then an echo; the rest listed."""
    def priority(item: tuple[int, str]) -> tuple[int, int]:
        rank, msg = item
        return (0 if "without a result" in msg else 1 if not is_peer_error(msg) else 2), rank

    (_, msg), *rest = sorted(failures.items(), key=priority)
    also = "".join(f"\nalso rank {r}: {m.strip().splitlines()[-1]}" for r, m in rest)
    return msg + also
