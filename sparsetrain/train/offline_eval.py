"""A checkpoint as a single-process model (`eval`, `generate`), and its val loss as the run logged it.

Two things of the run decide what its logged val loss was, beyond the weights: the routing step (routing
workloads move their targets with it; the run evaluated after that step's training) and, in capacity mode
(moe.capacity_factor > 0), how the val batch was cut: each rank applied capacity per training micro-batch of its
slice (world size x grad_accum slices in all).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from sparsetrain.config import Config, ConfigError, to_dict


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_slices(cfg: Config, extra: dict[str, Any]) -> int:
    """Slices of each val batch the run computed apart: in capacity mode its world size times its grad_accum (the
    trainer evaluates each rank's share in training micro-batches), else 1 (dropless routing is per token, so
    the cut does not matter)."""
    if cfg.moe.capacity_factor <= 0:
        return 1
    saved = extra.get("config") if isinstance(extra.get("config"), dict) else {}
    launch, parallel, train = saved.get("launch") or {}, saved.get("parallel") or {}, saved.get("train") or {}
    accum = max(1, int(train.get("grad_accum", cfg.train.grad_accum) or 1))
    if parallel.get("strategy", "none") == "none":
        return accum
    return max(1, int(launch.get("workers", 1) or 1)) * accum


@torch.no_grad()
def val_loss(model: Any, data: Any, batches: int, slices: int = 1) -> float:
    """Mean validation cross entropy over `batches` fixed val batches, each computed as `slices` equal row slices
    (the ranks' shares) whose losses are averaged, as the trainer's all-reduced mean is."""
    total = 0.0
    for i in range(batches):
        x, y = data.val_batch(i)  # [B, S] each
        if x.shape[0] % slices:
            raise ConfigError(f"val batches of {x.shape[0]} rows do not split into the run's {slices} slices "
                              "(world size x train.grad_accum in capacity mode): pass the run's data.batch_size")
        total += sum(float(model(xs, ys).loss) for xs, ys in zip(x.chunk(slices), y.chunk(slices))) / slices
    return total / batches


def single_process_model(cfg: Config, checkpoint: str | None, workload: bool = True,
                         note: Callable[[str], None] = _stderr) -> tuple[Any, Any, dict[str, Any]]:
    """A strategy-free model with weights from a checkpoint (any world size / strategy), and its extra state.

    The N:M schedule keys that decide what the trained model computes (`fingerprint.EVAL_FROM_CHECKPOINT`)
    come from the checkpoint's config, so the masks the run trained with are the ones evaluated."""
    from sparsetrain.model.gpt import build_model
    from sparsetrain.train import checkpoint as ckpt
    from sparsetrain.train.fingerprint import eval_overrides
    from sparsetrain.train.location import as_location

    run_root = ckpt.checkpoint_root(cfg.train.out_dir, cfg.checkpoint.dir)
    root = as_location(checkpoint) if checkpoint else run_root
    if checkpoint and not ckpt.is_checkpoint_dir(root) and "/" not in checkpoint and "://" not in checkpoint:
        named = run_root / checkpoint  # `--checkpoint step_N`
        root = named if ckpt.is_checkpoint_dir(named) else root
    if ckpt.is_checkpoint_dir(root):  # one checkpoint named: verified, refused if bad
        path, manifest = root, None
    else:  # a directory of checkpoints: the newest that verifies
        path, manifest, refused = ckpt.find_resumable(root)
        if refused:
            note(ckpt.fallback_line(root, path, refused, reading=True))
        if path is None:
            raise ckpt.CheckpointError(f"no committed checkpoint under {root}")
    if manifest is None:
        manifest = ckpt.verify_checkpoint(path, required=(ckpt.EXTRA,))  # before its JSON is read
    saved = ckpt.read_extra(path)
    if cfg.sparsity.enabled and isinstance(saved, dict) and isinstance(saved.get("config"), dict):
        for key, value in eval_overrides(saved["config"], to_dict(cfg)).items():
            name = key.split(".")[1]  # sparsity.<name>
            note(f"note: {key}={value} from checkpoint {path.name} (the config says "
                 f"{getattr(cfg.sparsity, name)}): evaluating the model as trained")
            setattr(cfg.sparsity, name, value)
    if not workload and (cfg.moe.router_skew > 0 or cfg.moe.routing_trace):  # generate: routing per token
        note("note: routing workload off (the router's own top-k): a benchmark workload routes by quota "
             "over each forward's tokens, one token at a time with the KV cache")
        cfg.moe.router_skew, cfg.moe.routing_trace, cfg.moe.skew_drift_every = 0.0, "", 0
    model = build_model(cfg)
    if cfg.sparsity.enabled:  # the N:M masks the run trained with (its weights are parametrized originals)
        from sparsetrain.sparsity import apply_sparsity

        apply_sparsity(model, cfg.sparsity)
    extra = ckpt.load_checkpoint(path, model, None, manifest, cfg_dict=to_dict(cfg))
    if cfg.sparsity.enabled:  # schedules (structure / mask decay) where training left them after that step
        from sparsetrain.sparsity import nm_sparsifier

        nm_sparsifier(model).load_state_dict({"step": int(extra["step"]) + 1})
    model.set_routing_step(int(extra["step"]))  # routing workloads: the targets the run evaluated with
    model.eval()
    return model, path, extra
