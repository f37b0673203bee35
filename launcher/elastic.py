"""`launch.min_workers`: continue on fewer ranks when fewer workers can be placed than launch.workers asks for.

Checkpoints are world-size independent (per-expert keys; FSSDP re-derives ownership on another world size),
so a group restarted after a node was lost resumes from the same commit on fewer ranks. The global batch
(data.batch_size) stays: train.grad_accum rises by launch.workers / world, so every rank's micro-batch keeps
its size (same memory) and a step still sees the same tokens (micro-batch k of the small group is ranks'
shares of the same samples; only the summation order of the gradient changes).

A world size w is allowed when launch.workers x train.grad_accum is a multiple of w (integer accumulation) and
the rest of the config accepts w (ep_size, pretend_nodes, experts per rank).
"""
from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sparsetrain.launcher.errors import LaunchError

if TYPE_CHECKING:
    from sparsetrain.config import Config


def _accum_at(cfg: Config, world: int) -> int | None:
    """train.grad_accum that keeps the global batch on `world` ranks (None when not an integer)."""
    total = cfg.launch.workers * cfg.train.grad_accum  # micro-batches x ranks per step
    return total // world if total % world == 0 else None


def world_sizes(cfg: Config) -> list[int]:
    """World sizes an elastic restart may use, largest first: launch.workers down to launch.min_workers."""
    from sparsetrain.config import ConfigError, validate_world

    low = cfg.launch.min_workers or cfg.launch.workers
    out = []
    for w in range(cfg.launch.workers, max(low, 1) - 1, -1):
        accum = _accum_at(cfg, w)
        if accum is None:
            continue
        trial = copy.deepcopy(cfg)
        trial.train.grad_accum, trial.launch.workers = accum, w
        try:
            validate_world(trial, w)
        except ConfigError:
            continue
        out.append(w)
    return out


def check_min_workers(cfg: Config) -> None:
    """Config check: launch.min_workers in [1, launch.workers] and some smaller world size reachable."""
    from sparsetrain.config import ConfigError

    m, n = cfg.launch.min_workers, cfg.launch.workers
    if m == 0:
        return
    if not 1 <= m <= n:
        raise ConfigError(f"launch.min_workers={m} must be in [1, launch.workers={n}] (0 = not elastic)")
    if m == n:
        return
    if cfg.parallel.strategy in ("deepspeed_moe", "megatron_moe"):
        raise ConfigError(f"launch.min_workers={m}: parallel.strategy={cfg.parallel.strategy} has no sparsetrain "
                          f"checkpoints to resume on fewer ranks from; set launch.min_workers=0")
    smaller = [w for w in world_sizes(cfg) if w < n]
    if not smaller:
        total = n * cfg.train.grad_accum
        ok = [w for w in range(1, n) if total % w == 0]
        raise ConfigError(f"launch.min_workers={m}: no world size in [{m}, {n}) keeps the global batch "
                          f"(launch.workers x train.grad_accum = {total} must be a multiple of it and the parallel "
                          f"layout must fit it); sizes below {n} that divide {total}: "
                          f"{', '.join(map(str, ok)) or 'none'}")


def shrink(cfg_dict: dict, placeable: int, log: Callable[[str], None] | None = None) -> dict:
    """The config to run when only `placeable` workers fit: unchanged when all fit, else the largest allowed
    world size <= placeable with grad_accum raised (one log line); LaunchError below launch.min_workers."""
    from sparsetrain.config import config_from_dict, to_dict

    launch = cfg_dict["launch"]
    n, m = int(launch["workers"]), int(launch.get("min_workers", 0) or 0)
    if placeable >= n or not m or m >= n:
        return cfg_dict
    cfg = config_from_dict(cfg_dict)
    fits = [w for w in world_sizes(cfg) if w <= placeable]
    if not fits:
        raise LaunchError(f"only {placeable} of launch.workers={n} worker(s) can be placed; launch.min_workers={m} "
                          f"and the world sizes the config allows are {world_sizes(cfg)}")
    w, accum = fits[0], _accum_at(cfg, fits[0])
    cfg.launch.workers, old_accum, cfg.train.grad_accum = w, cfg.train.grad_accum, accum
    (log or (lambda s: print(s, file=sys.stderr, flush=True)))(
        f"elastic: {placeable} of launch.workers={n} worker(s) can be placed; continuing on {w} rank(s) with "
        f"train.grad_accum {old_accum} -> {accum} (global batch data.batch_size={cfg.data.batch_size} kept)")
    return to_dict(cfg)


ELASTIC_RECHECK_S = 60.0  # Ray marks a lost node dead only after its health checks fail (~30 s): count again


def reserve_elastic(cfg_dict: dict, cpus: int, gpus: int, timeout_s: float, reserve_fn: Callable[[int], Any],
                    placeable_fn: Callable[[], int] | None = None, recheck_s: float = ELASTIC_RECHECK_S
                    ) -> tuple[dict, Any]:
    """(config to run, placement group): the largest allowed world the alive nodes hold. The count is taken again
    every `recheck_s` while the reservation waits: right after a node is lost (a restart) Ray still reports it
    alive, so the first count asks for the old world size. `reserve_fn(n, timeout_s)` reserves n ranks or
    raises LaunchError at its timeout; the whole wait ends at `timeout_s`."""
    placeable_fn = placeable_fn or (lambda: ray_placeable(cpus, gpus))
    start = time.monotonic()
    while True:
        now = shrink(cfg_dict, placeable_fn())
        left = timeout_s - (time.monotonic() - start)
        try:
            return now, reserve_fn(int(now["launch"]["workers"]), max(min(recheck_s, left), 0.01))
        except LaunchError:
            if time.monotonic() - start >= timeout_s:
                raise


def ray_placeable(cpus: int, gpus: int, nodes: list[dict[str, Any]] | None = None) -> int:
    """How many {CPU: cpus, GPU: gpus} bundles the alive nodes of the connected Ray cluster hold in total."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    count = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        fit = int(res.get("CPU", 0) // cpus) if cpus else 1 << 30
        if gpus:
            fit = min(fit, int(res.get("GPU", 0) // gpus))
        count += fit
    return count


def local_placeable(cfg_dict: dict) -> int:
    """Workers a single-node torchrun can place: the visible GPUs on a CUDA run, else launch.workers (CPU ranks
    share the cores)."""
    n, device = int(cfg_dict["launch"]["workers"]), cfg_dict["train"]["device"]
    if device == "cpu":
        return n
    import torch

    if not torch.cuda.is_available():
        return n
    return torch.cuda.device_count()
