"""`run_job(cfg)`: dispatch a validated config to the inline, Ray or torchrun backend."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from sparsetrain.launcher.env import (
    ENTRY_ENV,
    PROGRESS_ENV,
    Failure,
    RankSlot,
    free_port,
    patched_env,
    rank_env,
    root_cause,
)
from sparsetrain.launcher.errors import LaunchError
from sparsetrain.launcher.ray_runtime import DEFAULT_ENTRY, load_entry, run_ray
from sparsetrain.launcher.restart import run_with_restarts
from sparsetrain.launcher.watchdog import HeartbeatWatch

from sparsetrain.train import heartbeat

if TYPE_CHECKING:
    from sparsetrain.config import Config


def run_inline(cfg_dict: dict, entry: str = DEFAULT_ENTRY) -> dict | None:
    """Call the entry in this process as a 1-rank world (no launcher, no Ray)."""
    launch = cfg_dict["launch"]
    if int(launch["workers"]) != 1:
        raise LaunchError(f"launch.backend=inline runs one process, but launch.workers={launch['workers']}; "
                          "use launch.backend=ray or torchrun for several workers")
    slot = RankSlot(rank=0, local_rank=0, local_world_size=1, node="local")
    env = rank_env(slot, 1, "127.0.0.1", free_port("127.0.0.1"), int(launch["torch_threads"]))
    env[PROGRESS_ENV] = os.environ.get(PROGRESS_ENV, "1")
    with patched_env(env):
        return load_entry(entry)(cfg_dict)


def torchrun_command(nproc: int, config_path: str, summary_out: str, entry: str = DEFAULT_ENTRY) -> list[str]:
    """The single-node torchrun command line (torchrun == python -m torch.distributed.run)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "sparsetrain.launcher.torchrun_entry", "--config", config_path,
            "--summary-out", summary_out, "--entry", entry]


def _first_error(summary_out: str) -> tuple[int | None, str]:
    """The causing rank's traceback among those the ranks left next to the summary file (rank, text)."""
    failures = []
    for p in Path(summary_out).parent.glob(Path(summary_out).name + ".rank*.err"):
        rank = int(p.name.rsplit(".rank", 1)[1].split(".")[0])
        failures.append(Failure(rank, "", p.read_text(), p.stat().st_mtime))
    if not failures:
        return None, ""
    cause = root_cause(failures)
    return cause.rank, cause.details


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers, then torchrun itself (a stalled group ignores a polite stop)."""
    from sparsetrain.launcher.procs import descendants

    for pid in descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()


def _stop_ranks(proc: subprocess.Popen) -> None:
    """A SIGTERM to this launcher goes to the ranks (torchrun's children), not to torchrun: each rank checkpoints
    and exits 0 (the trainer's SIGTERM stop), so torchrun ends cleanly and so does this command. torchrun itself
    answers SIGTERM by killing its workers and raising SignalException (a traceback, a non-zero exit)."""
    from sparsetrain.launcher.procs import parent_map

    for pid in [c for c, parent in parent_map().items() if parent == proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@contextlib.contextmanager
def _sigterm_to_ranks(proc: subprocess.Popen) -> Iterator[None]:
    """While torchrun runs, this process's SIGTERM stops the ranks (see _stop_ranks); the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = signal.signal(signal.SIGTERM, lambda signum, frame: _stop_ranks(proc))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def _die_with_parent() -> None:
    """In the torchrun child before exec (Linux): SIGTERM it when this launcher dies, even by SIGKILL, so torchrun
    ends its ranks instead of training on, orphaned, in an output directory whose lock looks stale
    (prctl PR_SET_PDEATHSIG; a no-op where there is no prctl). The Ray backend has its reaper for this."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def run_torchrun(cfg_dict: dict, entry: str = DEFAULT_ENTRY) -> dict | None:
    """Run the job under a local torchrun with launch.workers processes."""
    if int(cfg_dict["launch"].get("min_workers", 0) or 0):  # elastic: fewer ranks when GPUs are gone
        from sparsetrain.launcher.elastic import local_placeable, shrink

        cfg_dict = shrink(cfg_dict, local_placeable(cfg_dict))
    launch = cfg_dict["launch"]
    with tempfile.TemporaryDirectory(prefix="st-torchrun-") as tmp:
        cfg_path, summary = os.path.join(tmp, "config.yaml"), os.path.join(tmp, "summary.json")
        Path(cfg_path).write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
        env = dict(os.environ, OMP_NUM_THREADS=str(launch["torch_threads"]))
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # --standalone: one machine, gloo pairs on loopback only
        # its own process group: a SIGTERM to ours (timeout, a scheduler stopping the job) reaches torchrun only as
        # this launcher forwards it, to the ranks (_sigterm_to_ranks); Ctrl-C is forwarded below
        proc = subprocess.Popen(torchrun_command(int(launch["workers"]), cfg_path, summary, entry), env=env,
                                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, before exec
                                start_new_session=True)
        watch = HeartbeatWatch(cfg_dict["train"]["out_dir"], float(launch["timeout_s"]), lambda: _kill_tree(proc))
        try:
            with watch, _sigterm_to_ranks(proc):
                rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        if watch.stalled is not None:
            raise watch.stalled
        if rc != 0:
            rank, tb = _first_error(summary)
            if rank is None:  # no traceback: a rank was killed (SIGKILL, OOM killer); the heartbeats say which
                found = heartbeat.beats(cfg_dict["train"]["out_dir"])
                late = heartbeat.behind(found)
                why = (f"; no rank left a traceback, rank {late[0]} is behind ({found[late[0]].where()}): it died"
                       if len(late) == 1 else "")
                raise LaunchError(f"torchrun exited with code {rc} (see the output above){why}",
                                  rank=late[0] if len(late) == 1 else None)
            last = tb.strip().splitlines()[-1] if tb.strip() else "error"
            raise LaunchError(f"rank {rank} failed: {last}", rank=rank, details=tb)
        return json.loads(Path(summary).read_text()) if os.path.exists(summary) else None


def run_job(cfg: Config, entry: str | None = None) -> dict | None:
    """Run a validated config on its launch.backend; returns rank 0's summary (None if it has none)."""
    from sparsetrain.config import to_dict

    entry = entry or os.environ.get(ENTRY_ENV) or DEFAULT_ENTRY
    cfg_dict = to_dict(cfg)
    backend = cfg.launch.backend
    if backend == "inline":
        return run_inline(cfg_dict, entry)
    if backend == "torchrun":
        if cfg.launch.address:
            raise LaunchError("launch.address is a Ray address; launch.backend=torchrun runs on this machine only "
                              "(run torchrun on each node yourself for multi-node, see docs/launching.md)")
        return run_with_restarts(cfg_dict, lambda c: run_torchrun(c, entry))
    if backend == "ray":
        return run_with_restarts(cfg_dict, lambda c: run_ray(c, entry))
    raise LaunchError(f"launch.backend={backend!r}; allowed: ray, torchrun, inline")
