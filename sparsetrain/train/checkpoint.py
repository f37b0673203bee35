"""Checkpoints with torch.distributed.checkpoint, committed atomically (complete or absent)."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from sparsetrain.train.state import flat_state, set_optimizer_step

EXTRA = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model."""


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def committed(root: str | Path) -> list[Path]:
    """Committed checkpoints under root, oldest first (only complete ones carry the extra file)."""
    r = Path(root)
    if not r.is_dir():
        return []
    return sorted(p for p in r.glob("step_*") if p.is_dir() and (p / EXTRA).exists() and (p / ".metadata").exists())


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any], keep: int = 2) -> Path:
    """Write to a temp dir on every rank, then rank 0 renames it into place after a barrier."""
    root = Path(root)
    final, tmp = step_dir(root, step), root / f".tmp-step_{step:08d}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = {k: v.detach() for k, v in flat_state(model, optimizer).items()}
    with warnings.catch_warnings():  # DCP warns that a single process saves alone: that is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not _is_dist())
    if _rank() == 0:
        (tmp / EXTRA).write_text(json.dumps({"step": step, **extra}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in committed(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load weights (and optimizer state) into the live model in place; returns the trainer extra state."""
    path = Path(path)
    if not (path / ".metadata").exists() or not (path / EXTRA).exists():
        raise CheckpointError(f"checkpoint {path} is incomplete or not a sparsetrain checkpoint "
                              f"(missing .metadata or {EXTRA})")
    try:
        extra = json.loads((path / EXTRA).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {EXTRA}: {e}") from None
    state = flat_state(model, optimizer)
    if optimizer is None:
        state = {k: v for k, v in state.items() if not k.startswith("optim.")}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path), no_dist=not _is_dist())
    except (Exception, CheckpointException) as e:  # DCP raises many types; CheckpointException is a BaseException
        raise CheckpointError(f"checkpoint {path} is corrupt or does not match this model: "
                              f"{_first_cause(e)[:300]}") from e
    if optimizer is not None and "optim.step" in state:
        set_optimizer_step(optimizer, state["optim.step"])
    return extra


def _first_cause(e: BaseException) -> str:
    """One line naming the underlying error (DCP wraps per-rank failures in CheckpointException)."""
    if isinstance(e, CheckpointException) and e.failures:
        exc = next(iter(e.failures.values()))[0]
        return f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def latest_checkpoint(root: str | Path) -> Path | None:
    found = committed(root)
    return found[-1] if found else None
