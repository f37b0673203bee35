"""Checkpoints with torch.distributed.checkpoint: committed atomically, verified before anything is read.

Save: every rank writes into `.tmp-step_N`, the files are hashed into `manifest.json`, then rank 0 renames
the directory to `step_N` (the rename is the commit: a kill leaves the previous checkpoint as it was).
Load: the manifest is checked (sizes, SHA-256) before any file is parsed, and DCP's `.metadata` pickle is
read only through `safe_dcp.VerifiedReader`. Resume takes the newest checkpoint that verifies.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from sparsetrain.train.fingerprint import compare
from sparsetrain.train.manifest import MANIFEST, METADATA, CheckpointError, verify_checkpoint, write_manifest
from sparsetrain.train.safe_dcp import VerifiedReader
from sparsetrain.train.state import flat_state, set_optimizer_step

__all__ = ["EXTRA", "CheckpointError", "committed", "fallback_line", "find_resumable", "is_checkpoint_dir",
           "latest_checkpoint", "load_checkpoint", "preflight_resume", "read_extra", "resume_config_changes",
           "save_checkpoint", "step_of", "verify_checkpoint"]

EXTRA = "trainer_state.json"


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def step_of(path: Path) -> int:
    """The step number in a `step_N` directory name (-1 when the name carries none)."""
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def committed(root: str | Path) -> list[Path]:
    """Committed checkpoint directories under root (renamed into place), oldest first; not yet verified."""
    r = Path(root)
    if not r.is_dir():
        return []
    return sorted((p for p in r.glob("step_*") if p.is_dir()), key=lambda p: (step_of(p), p.name))


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any], keep: int = 2, before_commit: Callable[[], None] | None = None) -> Path:
    """Write to a temp dir on every rank, hash it into a manifest, then rank 0 renames it into place
    (`before_commit`, a fault-injection hook, runs on every rank after the files are written)."""
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
    _barrier()
    write_manifest(tmp, step)  # collective: every rank hashes its share of the files
    if before_commit is not None:
        before_commit()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(root, keep, final)
    _barrier()
    return final


def _prune(root: Path, keep: int, newest_good: Path) -> None:
    """Keep the last `keep` checkpoints, and always the one just written (the newest known-good one),
    even when checkpoints with higher step numbers (left by an earlier attempt, maybe bad) take the slots."""
    if keep <= 0:
        return
    for old in committed(root)[:-keep]:
        if old != newest_good:
            shutil.rmtree(old, ignore_errors=True)


def read_extra(path: Path) -> dict[str, Any]:
    """The trainer state JSON of a checkpoint (call after verify_checkpoint)."""
    try:
        return json.loads((path / EXTRA).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {EXTRA}: {e}") from None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    manifest: dict[str, Any] | None = None, cfg_dict: dict[str, Any] | None = None) -> dict:
    """Verify (unless `manifest` says it already was), then load weights (and optimizer state) in place.

    With `cfg_dict`, a checkpoint of another model (model-defining keys differ) is refused listing the keys.
    Returns the trainer extra state. Collective when a process group is up (every rank calls it).
    """
    path = Path(path)
    if manifest is None:
        manifest = verify_checkpoint(path, required=(EXTRA,))
    extra = read_extra(path)
    if cfg_dict is not None:
        resume_config_changes(extra, cfg_dict, path, hint="use the config it was trained with (in its "
                                                          f"{EXTRA})")
    reader = VerifiedReader(path, manifest)
    reader.read_metadata()  # a refused .metadata raises CheckpointError here, before DCP logs its own fallback
    state = flat_state(model, optimizer)
    if optimizer is None:
        state = {k: v for k, v in state.items() if not k.startswith("optim.")}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=not _is_dist())
    except (Exception, CheckpointException) as e:  # DCP raises many types; CheckpointException is a BaseException
        raise CheckpointError(f"checkpoint {path} does not match this model: {_first_cause(e)[:300]}") from e
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


def find_resumable(root: str | Path) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, str]]]:
    """Newest checkpoint under root that verifies: (path, manifest, [(refused newer path, reason), ...]).

    Collective when a process group is up. (None, None, refused) when nothing under root verifies.
    """
    refused: list[tuple[Path, str]] = []
    for path in reversed(committed(root)):
        try:
            return path, verify_checkpoint(path, required=(EXTRA,)), refused
        except CheckpointError as e:
            refused.append((path, str(e)))
    return None, None, refused


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under root that verifies (None if none does). Collective like find_resumable."""
    return find_resumable(root)[0]


def fallback_line(root: str | Path, good: Path | None, refused: list[tuple[Path, str]]) -> str:
    """One line saying which checkpoints were refused and what resuming from `good` costs.

    Raises CheckpointError when nothing verifies: starting over silently would lose the run.
    """
    newest, reason = refused[0]
    more = f" (and {len(refused) - 1} more refused)" if len(refused) > 1 else ""
    if good is None:
        raise CheckpointError(f"no checkpoint under {root} verifies: {reason}{more}; move the bad ones away "
                              f"or set checkpoint.resume=false to start over")
    lost = step_of(newest) - step_of(good)
    return (f"checkpoint refused: {reason}{more}; resuming from {good.name} instead, "
            f"{lost} step{'s' if lost != 1 else ''} earlier (trained again)")


def is_checkpoint_dir(path: Path) -> bool:
    """Whether `path` is one checkpoint (as opposed to a directory of them)."""
    return (path / MANIFEST).exists() or (path / METADATA).exists() or (path / EXTRA).exists()


RESUME_HINT = ("resume with the checkpoint's values, or start a new run (another train.out_dir, or "
               "checkpoint.resume=false)")


def resume_config_changes(extra: dict[str, Any], cfg_dict: dict[str, Any], path: Path,
                          hint: str = RESUME_HINT) -> list[str]:
    """Run-control keys that differ from the checkpoint's config ('key old -> new'); CheckpointError listing
    every model-defining key that differs (sizes, vocab, experts, top_k, sparsity structure)."""
    refused, changed = compare(extra.get("config") or {}, cfg_dict)
    if refused:
        raise CheckpointError(f"checkpoint {path} belongs to a different model: {', '.join(refused)}; {hint}")
    return changed


def preflight_resume(cfg_dict: dict[str, Any]) -> None:
    """Before any process starts: refuse when no checkpoint is whole, or the newest whole one is of another model.

    Cheap: manifests, file presence and sizes, and the JSON trainer state (nothing unpickled, nothing hashed);
    the ranks verify the SHA-256 of the checkpoint they resume from and check the config again.
    """
    if not cfg_dict["checkpoint"]["resume"]:
        return
    root = Path(cfg_dict["checkpoint"]["dir"] or Path(cfg_dict["train"]["out_dir"]) / "checkpoints")
    refused: list[tuple[Path, str]] = []
    for path in reversed(committed(root)):
        try:
            verify_checkpoint(path, required=(EXTRA,), collective=False, hashes=False)
            extra = read_extra(path)
        except CheckpointError as e:
            refused.append((path, str(e)))
            continue
        if isinstance(extra, dict):
            resume_config_changes(extra, cfg_dict, path)
        return
    if refused:
        fallback_line(root, None, refused)  # raises: nothing to resume from
