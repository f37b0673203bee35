"""Reserving the ranks' resources on a Ray cluster, saying what is missing while it waits.

A job asking for more than the cluster has (GPUs on a CPU cluster, 16 ranks on 8 GPUs while the autoscaler
is still adding nodes) would otherwise sit silently. Every `every_s` seconds the wait prints one line: what
it asked for, what the cluster has and has free; after `launch.resource_timeout_s` it fails with that line.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from sparsetrain.launcher.errors import LaunchError

REPORT_EVERY_S = 30.0


def _short(resources: dict[str, float]) -> str:
    """'CPU 16, GPU 0, memory 24.0 GiB' (the keys a rank asks for, plus memory)."""
    parts = [f"{k} {resources.get(k, 0):g}" for k in ("CPU", "GPU")]
    if "memory" in resources:
        parts.append(f"memory {resources['memory'] / 2**30:.1f} GiB")
    return ", ".join(parts)


def wait_line(workers: int, bundle: dict[str, float], waited_s: float, timeout_s: float,
              total: dict[str, float], free: dict[str, float], nodes: int) -> str:
    """One line: what the job asked for and what the cluster has."""
    ask = ", ".join(f"{k} {v:g}" for k, v in bundle.items())
    need = ", ".join(f"{k} {v * workers:g}" for k, v in bundle.items())
    return (f"waiting for resources {waited_s:.0f}s (launch.resource_timeout_s={timeout_s:g}): asked for "
            f"{workers} rank(s) x {{{ask}}} = {need}; the cluster has {nodes} node(s) with {_short(total)} "
            f"({_short(free)} free)")


def reserve(workers: int, cpus: int, gpus: int, timeout_s: float, local: bool,
            every_s: float = REPORT_EVERY_S, log: Callable[[str], None] | None = None) -> Any:
    """Reserve one bundle per rank (PACK: as few nodes as possible); report while waiting, fail at timeout_s."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    bundle = {"CPU": float(cpus)} | ({"GPU": float(gpus)} if gpus else {})
    total = ray.cluster_resources()
    if local and gpus and total.get("GPU", 0) < workers * gpus:
        raise LaunchError(f"launch.gpus_per_worker={gpus} x launch.workers={workers} needs {workers * gpus} GPUs; "
                          f"the Ray cluster has {total.get('GPU', 0):g} (set launch.gpus_per_worker=0 for CPU)")
    pg = placement_group([bundle] * workers, strategy="PACK", name=f"sparsetrain-{os.getpid()}")
    start = time.monotonic()
    while True:
        left = timeout_s - (time.monotonic() - start)
        try:
            ray.get(pg.ready(), timeout=max(min(every_s, left), 0.01))
            return pg
        except ray.exceptions.GetTimeoutError:
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            line = wait_line(workers, bundle, time.monotonic() - start, timeout_s, ray.cluster_resources(),
                             ray.available_resources(), nodes)
            if time.monotonic() - start >= timeout_s:
                remove_placement_group(pg)
                raise LaunchError(f"gave up {line}") from None
            log(line)
