"""Worker entry: the same function runs under Ray, torchrun or in-process."""
from __future__ import annotations

import contextlib
import gc
import os
from typing import Any

import torch
import torch.distributed as dist

from sparsetrain.config import config_from_dict, validate_world
from sparsetrain.parallel.mesh import init_distributed


def train_worker(cfg_dict: dict) -> dict[str, Any] | None:
    """Init the process group from env (RANK, WORLD_SIZE, ...), train, return the summary on rank 0."""
    cfg = config_from_dict(cfg_dict)
    if cfg.launch.torch_threads > 0:
        torch.set_num_threads(cfg.launch.torch_threads)
    info = init_distributed(cfg.train.device, timeout_s=max(int(cfg.launch.timeout_s), 1))
    validate_world(cfg, info.world)
    from sparsetrain.telemetry.gpu import start_sampler, stop_sampler
    from sparsetrain.train.guards import install_sigterm_handler
    from sparsetrain.train.trainer import Trainer

    audit = contextlib.nullcontext()
    if os.environ.get("SPARSETRAIN_AUDIT_COMM") == "1":  # NCCL's device rule enforced on any backend
        from sparsetrain.parallel.comm_audit import audit_collectives

        audit = audit_collectives()
    ok = False
    start_sampler(cfg.train.gpu_telemetry_s if info.device.type == "cuda" else 0.0)
    undo_sigterm = install_sigterm_handler()  # SIGTERM: checkpoint at the end of this step, then stop
    try:
        with audit:
            summary = Trainer(cfg, info).fit()
        ok = True
    finally:
        undo_sigterm()
        stop_sampler()
        shutdown_distributed(clean=ok)
    return summary if info.is_main else None


def shutdown_distributed(clean: bool) -> None:
    """Tear the process groups down; after a clean run, every rank first waits for the others.

    Without the barrier a fast rank closes its gloo sockets while a slower one still
    finishes its last collective, and that rank can abort in gloo's teardown (seen as
    "terminate called without an active exception" under torchrun). The trainer and
    its wrapped modules are already unreferenced here, so nothing holds a group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def run_inline(cfg_dict: dict) -> dict[str, Any] | None:
    """Single-process run without any launcher (world size 1)."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    return train_worker(cfg_dict)
