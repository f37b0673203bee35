"""Run N ranks of a worker entry as Ray actors in one placement group.

Why own actors instead of Ray Train's TorchTrainer: measured on this 2-core box,
a 2-worker TorchTrainer `fit` takes ~24 s to first step (Train controller, its own
actor group, storage/result plumbing), while ray.init plus two plain actors is
about 5-7 s end to end (see docs/launching.md). Owning the actors also gives us
exact control of the rank environment (RANK/LOCAL_WORLD_SIZE as Ray placed them,
CUDA_VISIBLE_DEVICES ordered by local rank), `(rank N)` log prefixes with a live
tqdm bar from rank 0, the failing rank's traceback, detection of a killed worker
process, and a Ctrl-C that tears everything down. Checkpoint/restart policy stays
in the trainer (sparsetrain.train), so Train's fault-tolerance layer is not needed.
"""
from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from sparsetrain.launcher.capture import OutputCapture, RankOutput, console_log_dir
from sparsetrain.launcher.env import (
    Failure,
    RankSlot,
    assign_ranks,
    forwarded_env,
    free_port,
    is_peer_error,
    rank_env,
    root_cause,
    split_host_port,
    tcp_error,
    visible_devices,
)
from sparsetrain.launcher.errors import LaunchError, one_line, require_ray, user_error_types
from sparsetrain.launcher.resources import reserve

from sparsetrain.rendezvous import LISTEN_FD_ENV

DEFAULT_ENTRY = "sparsetrain.train.entry:train_worker"
POLL_S = 0.2  # how often the driver collects worker output
FAILURE_GRACE_S = 5.0  # after a rank fails, how long to wait for the others before naming the cause


def local_temp_dir() -> str:
    """Short per-user temp dir for local runtimes (unix socket paths must stay < 108 chars)."""
    return os.environ.get("SPARSETRAIN_RAY_TMPDIR") or f"/tmp/st-ray-{os.getuid()}"


def local_num_cpus(workers: int, cpus_per_worker: int, cpu_count: int | None) -> int:
    """CPUs to declare for a local runtime: enough for every worker even on a small machine."""
    return max(workers * cpus_per_worker, cpu_count or 1)


def load_entry(spec: str) -> Any:
    """Import 'module:function' and return the function."""
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ValueError(f"entry must look like 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(mod), fn)


class RankWorker:
    """One rank: a Ray actor (max_concurrency=2 so `drain` runs while `run` trains)."""

    def __init__(self) -> None:
        self._capture = OutputCapture()
        self._listener: socket.socket | None = None
        self._running = self._term_seen = False
        self._term_prev: Any = None
        if threading.current_thread() is threading.main_thread():  # Ray runs an actor's __init__ there
            self._term_prev = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """SIGTERM to this worker (a preempted node's processes, `kill`): while a run trains, the same graceful
        stop as a SIGTERM to the launcher (every rank checkpoints at the end of the step and returns); a second
        one, or one while idle, goes to Ray's own handler (exit)."""
        if self._running and not self._term_seen:
            self._term_seen = True
            from sparsetrain.train.guards import request_stop

            print("SIGTERM: checkpointing at the end of this step and stopping (a second SIGTERM exits now)",
                  file=sys.stderr, flush=True)
            request_stop()
            return
        prev = self._term_prev
        if callable(prev):
            prev(signum, frame)
        else:
            raise SystemExit(128 + signum)

    def info(self) -> dict:
        """Where Ray placed this worker."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "node": ctx.get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
        }

    def free_port(self, host: str = "") -> int:
        """A free TCP port on this worker's node (asked of rank 0 for MASTER_PORT)."""
        return free_port(host)

    def listen(self, host: str) -> int:
        """Rank 0 of a local run: listen on host:<kernel-chosen port> now, for the TCPStore to take over."""
        self._listener = socket.create_server((host, 0), backlog=128)
        return int(self._listener.getsockname()[1])

    def run(self, entry: str, cfg_dict: dict, env: dict[str, str], torch_threads: int,
            log_dir: str | None = None) -> dict:
        """Set the rank env, call the entry; return {'ok', 'result' | 'error', 'time'}. Console output is
        captured for the driver and, with log_dir, appended to its rank<R>.out/.err."""
        os.environ.update(env)
        self._running = True
        if self._listener is not None:
            os.environ[LISTEN_FD_ENV] = str(self._listener.detach())
            self._listener = None
        self._capture.start(log_dir, int(env["RANK"]))
        try:
            fn = load_entry(entry)
            import torch

            torch.set_num_threads(torch_threads)
            return {"ok": True, "result": fn(cfg_dict), "time": time.time()}
        except user_error_types() as e:  # bad input: one line on this rank, no traceback
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            return {"ok": False, "error": one_line(e), "time": time.time()}
        except BaseException:  # noqa: BLE001 - any failure goes back to the driver with its traceback
            tb = traceback.format_exc()
            print(console_report(tb), file=sys.stderr, flush=True)
            return {"ok": False, "error": tb, "time": time.time()}
        finally:
            self._running = False
            self._capture.stop()

    def drain(self) -> tuple[bytes, bytes]:
        """Output captured since the last drain."""
        return self._capture.drain()

    def request_stop(self) -> None:
        """Preemption: the trainer checkpoints at the end of its current step and returns."""
        from sparsetrain.train.guards import request_stop

        request_stop()


def console_report(tb: str) -> str:
    """What a failing rank prints: its traceback, or one line when the error only echoes a peer that went away
    (a collective's 'Connection closed by peer'), so the cause's lines and the restart line are not buried under
    every survivor's gloo/NCCL traceback. The driver still gets the whole traceback as the failure's details."""
    if not is_peer_error(tb):
        return tb.rstrip("\n")
    last = tb.strip().splitlines()[-1]
    return f"error: a collective lost a peer (another rank stopped or died): {last}"


def _start_runtime(workers: int, cpus_per_worker: int, address: str) -> tuple[bool, Any]:
    """Connect to `address` or start a private local runtime; (we started it, its LocalRay handle)."""
    import logging

    import ray

    if ray.is_initialized():
        return False, None
    if address:
        hp = split_host_port(address)
        if hp and (why := tcp_error(*hp)):
            raise LaunchError(f"cannot reach the Ray cluster at launch.address={address!r} ({why}); "
                              "is `ray start --head` running there and the GCS port open?")
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return False, None
    from sparsetrain.launcher.local_ray import start_local_ray

    return True, start_local_ray(local_num_cpus(workers, cpus_per_worker, os.cpu_count()), local_temp_dir())



def _pump(actors: dict[int, Any], outputs: dict[int, RankOutput], final: bool) -> None:
    """Print every worker's new output with its rank prefix (final: also unterminated rests)."""
    import ray

    refs = {rank: a.drain.remote() for rank, a in actors.items()}
    for rank in sorted(refs):
        try:
            out, err = ray.get(refs[rank], timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            continue  # a dead worker is reported by its run() result, its last output read from its console log
        outputs[rank].show(out, err, final)


def _env_for(slots: list[RankSlot], infos: list[dict], port: int, threads: int) -> list[dict[str, str]]:
    """Full environment of every worker (index = creation order)."""
    master = infos[next(i for i, s in enumerate(slots) if s.rank == 0)]["ip"]
    extra = forwarded_env()
    envs = []
    for slot, info in zip(slots, infos):
        env = rank_env(slot, len(slots), master, port, threads) | extra
        if info["gpus"]:
            peers = sorted((s.local_rank, i["gpus"]) for s, i in zip(slots, infos) if s.node == slot.node)
            env["CUDA_VISIBLE_DEVICES"] = visible_devices(info["gpus"], [g for _, g in peers])
        envs.append(env)
    return envs


def _wait(runs: dict[Any, int], actors: dict[int, Any], infos: dict[int, dict], outputs: dict[int, RankOutput],
          term: threading.Event, watch: Any = None) -> dict | None:
    """Stream output until every rank returns; raise LaunchError naming the rank that caused a failure.

    After `term` is set (SIGTERM), every rank is asked once to checkpoint and stop; they then return normally.
    """
    import ray

    pending, result, failures = list(runs), None, []
    deadline = None  # after a first failure, wait briefly for the others to report (to find the cause)
    stop_sent = False
    while pending:
        if watch is not None and watch.stalled is not None:  # the heartbeat watcher: the group stopped moving
            _pump(actors, outputs, final=True)
            raise watch.stalled
        if term.is_set() and not stop_sent:
            print(f"SIGTERM: asking {len(actors)} worker(s) to checkpoint and stop", file=sys.stderr, flush=True)
            for a in actors.values():
                a.request_stop.remote()
            stop_sent = True
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
        _pump(actors, outputs, final=False)
        for ref in ready:
            rank = runs[ref]
            try:
                res = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                where = f"pid {infos[rank]['pid']} on {infos[rank]['ip']}"
                failures.append(Failure(rank, f"rank {rank} ({where}) died unexpectedly", str(e), time.time(), True))
                continue
            except ray.exceptions.RayError as e:  # e.g. OutOfMemoryError: Ray's memory monitor killed the worker
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                failures.append(Failure(rank, f"rank {rank}: {type(e).__name__}: {first}", str(e), time.time(), True))
                continue
            if not res["ok"]:
                last = res["error"].strip().splitlines()[-1] if res["error"].strip() else "error"
                failures.append(Failure(rank, f"rank {rank} failed: {last}", res["error"], res["time"]))
            elif rank == 0:
                result = res["result"]
        if failures:
            deadline = deadline or time.monotonic() + FAILURE_GRACE_S
            if root_cause(failures).priority()[0] == 0 or time.monotonic() > deadline:
                break
    _pump(actors, outputs, final=True)
    for f in failures:
        if f.died:
            outputs[f.rank].recover()  # the lines it printed after the last drain, often the ones that say why
    if failures:
        cause = root_cause(failures)
        raise LaunchError(cause.message, rank=cause.rank, details=cause.details)
    return result


def _on_sigterm() -> tuple[threading.Event, Any]:
    """First SIGTERM sets the event (graceful stop); a second one interrupts like Ctrl-C. Returns (event, undo)."""
    term = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return term, lambda: None

    def handler(signum: int, frame: Any) -> None:
        if term.is_set():
            raise KeyboardInterrupt
        term.set()

    old = signal.signal(signal.SIGTERM, handler)
    return term, lambda: signal.signal(signal.SIGTERM, old)


def run_ray(cfg_dict: dict, entry: str = DEFAULT_ENTRY, pg_timeout_s: float | None = None) -> dict | None:
    """Run `entry(cfg_dict)` on launch.workers Ray actors; rank 0's return value comes back."""
    require_ray()
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    launch = cfg_dict["launch"]
    n, cpus, gpus = int(launch["workers"]), int(launch["cpus_per_worker"]), int(launch["gpus_per_worker"])
    address = launch.get("address", "")
    try:
        started, local = _start_runtime(n, cpus, address)
    except ConnectionError as e:
        raise LaunchError(f"cannot reach the Ray cluster at launch.address={address!r}: {e}") from None
    pg, handles, actors = None, [], {}
    term, undo_term = _on_sigterm()  # replaces the handler ray.init installed (sys.exit, then a C++ abort)
    try:
        wait_s = pg_timeout_s or (60.0 if started else float(launch.get("resource_timeout_s", 600.0)))
        if int(launch.get("min_workers", 0) or 0):  # elastic: fewer ranks when a node is gone
            from sparsetrain.launcher.elastic import reserve_elastic

            cfg_dict, pg = reserve_elastic(cfg_dict, cpus, gpus, wait_s,
                                           lambda k, t: reserve(k, cpus, gpus, t, started))
            launch = cfg_dict["launch"]
            n = int(launch["workers"])
        else:
            pg = reserve(n, cpus, gpus, wait_s, started)
        cls = ray.remote(RankWorker)
        handles = [
            cls.options(
                num_cpus=cpus, num_gpus=gpus, max_concurrency=2, name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote()
            for i in range(n)
        ]
        info_list = ray.get([h.info.remote() for h in handles])
        slots = assign_ranks([i["node"] for i in info_list])
        by_rank = {s.rank: i for i, s in enumerate(slots)}
        actors = {s.rank: handles[i] for i, s in enumerate(slots)}
        infos = {s.rank: info_list[i] for i, s in enumerate(slots)}
        rank0 = actors[0]
        port = ray.get(rank0.listen.remote(infos[0]["ip"]) if started else rank0.free_port.remote())
        envs = _env_for(slots, info_list, port, int(launch["torch_threads"]))
        log_dir = str(console_log_dir(str(cfg_dict["train"]["out_dir"])))
        tty = (sys.stdout.isatty(), sys.stderr.isatty())  # progress-bar frames only on terminals
        outputs = {r: RankOutput(r, tty, log_dir) for r in range(n)}  # before the runs: where their logs start
        runs = {handles[by_rank[r]].run.remote(entry, cfg_dict, envs[by_rank[r]], int(launch["torch_threads"]),
                                               log_dir): r
                for r in range(n)}
        from sparsetrain.launcher.watchdog import HeartbeatWatch

        with HeartbeatWatch(cfg_dict["train"]["out_dir"], float(launch["timeout_s"]), lambda: None) as watch:
            return _wait(runs, actors, infos, outputs, term, watch)  # a stall raises; `finally` kills the actors
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping {len(handles)} worker(s)", file=sys.stderr, flush=True)
        raise
    finally:
        undo_term()
        for a in handles:
            ray.kill(a, no_restart=True)
        if pg is not None:
            remove_placement_group(pg)
        if local is not None:
            local.stop()
