"""Run a few Trainer steps per config on the current process group; collect losses, grads, offload stats."""
from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sparsetrain.config import config_from_dict
from tests.parity_utils import small_config


def variant(*overrides: str, steps: int = 4) -> dict:
    """A small-config dict (2 layers, 8 experts) with a fixed FSSDP overlap budget (placements repeat exactly)."""
    return small_config("parallel.fssdp.overlap_budget=2", *overrides, steps=steps)


def run_steps(cfg_dict: dict, out_dir: str) -> dict[str, Any]:
    """train_step for train.steps steps; grads captured right before every optimizer step (local shards)."""
    from sparsetrain.offload.meter import ActivationMeter
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.telemetry.comm import COMM
    from sparsetrain.train.trainer import Trainer

    cfg = config_from_dict({**cfg_dict, "train": {**cfg_dict["train"], "out_dir": out_dir}})
    torch.set_num_threads(1)
    tr = Trainer(cfg, init_distributed("cpu"))
    grads: list[dict[str, torch.Tensor]] = []

    def capture(opt: Any, args: Any, kwargs: Any) -> None:
        grads.append({n: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).detach().clone()
                      for n, p in tr.model.named_parameters() if p.grad is not None})

    handle = register_optimizer_step_pre_hook(capture)
    losses, offload, comm = [], [], []
    meter = ActivationMeter(tr.model)
    try:
        for step in range(cfg.train.steps):
            COMM.reset()
            if step == 0:
                with meter:  # saved activation bytes per block, as they reach the block's stack level
                    losses.append(tr.train_step(step)["loss"])
            else:
                losses.append(tr.train_step(step)["loss"])
            comm.append(COMM.snapshot())
            if tr.offload is not None:
                offload.append(tr.offload.stats())
                tr.offload.reset_stats()
    finally:
        handle.remove()
    return {"losses": losses, "grads": grads, "offload": offload, "comm": comm,
            "saved_bytes_by_block": dict(meter.bytes_by_block),
            "reshard_moves": getattr(tr.strategy, "reshard_moves", 0)}


def run_variants(rank: int, world: int, variants: dict[str, dict], out_dir: str) -> dict[str, dict]:
    """Every named variant in turn on this rank (same process group)."""
    return {name: run_steps(cfg, f"{out_dir}/{name}") for name, cfg in variants.items()}


def assert_grads_equal(ref: dict, got: dict, what: str) -> None:
    """Same number of steps, same parameter names, bitwise-equal gradients at every step."""
    assert len(ref["grads"]) == len(got["grads"]) > 0, what
    for step, (a, b) in enumerate(zip(ref["grads"], got["grads"])):
        assert a.keys() == b.keys(), (what, step, sorted(set(a) ^ set(b))[:5])
        bad = [n for n in a if not torch.equal(a[n], b[n])]
        assert not bad, f"{what}: step {step} gradients differ: {bad[:5]}"
