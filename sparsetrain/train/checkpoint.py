"""Checkpoints with torch.distributed.checkpoint: committed atomically, verified before anything is read.

Save (local directory): every rank writes into `.tmp-step_N`, the files are hashed into `manifest.json`,
then rank 0 renames the directory to `step_N` (the rename is the commit: a kill leaves the previous
checkpoint as it was). Save (fsspec URL: s3://, gs://, file://; object stores have no atomic rename): the
ranks write into `step_N` through DCP's FsspecWriter and `manifest.json` is written last; it is the commit
(a directory without one is never loaded, and resume falls back past it with a line saying so).
Load: the manifest is checked (sizes, SHA-256) before any file is parsed, and DCP's `.metadata` pickle is
read only through `safe_dcp`'s verified readers. Resume takes the newest checkpoint that verifies.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from sparsetrain.train.fingerprint import compare
from sparsetrain.train.location import Location, RemotePath, as_location, join, rmtree
from sparsetrain.train.manifest import (
    MANIFEST,
    METADATA,
    CheckpointError,
    check_file,
    verify_checkpoint,
    write_manifest,
)
from sparsetrain.train.safe_dcp import verified_reader, writer
from sparsetrain.train.state import flat_state, set_optimizer_step

__all__ = ["EXTRA", "CheckpointError", "begin_save", "checkpoint_root", "commit_save", "committed", "fallback_line", "find_resumable", "is_checkpoint_dir",
           "latest_checkpoint", "load_checkpoint", "preflight_resume", "read_extra", "resume_config_changes",
           "save_checkpoint", "save_failed", "step_of", "verify_checkpoint"]

EXTRA = "trainer_state.json"


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier(group: Any = None) -> None:
    if _is_dist():
        dist.barrier(group=group)


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def step_dir(root: Location, step: int) -> Location:
    return root / f"step_{step:08d}"


def step_of(path: Location) -> int:
    """The step number in a `step_N` directory name (-1 when the name carries none)."""
    name = path.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else -1


def committed(root: str | Location) -> list[Location]:
    """Committed checkpoint directories under root (renamed into place), oldest first; not yet verified. Only
    names sparsetrain writes (`step_` and digits): retention deletes among these, never a user's `step_best`."""
    r = as_location(root)
    if not r.is_dir():
        return []
    return sorted((p for p in r.glob("step_*") if step_of(p) >= 0 and p.is_dir()), key=lambda p: (step_of(p), p.name))


def save_checkpoint(root: str | Location, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any], keep: int = 2, before_commit: Callable[[], None] | None = None) -> Location:
    """Write on every rank, hash the files into a manifest, commit (rename, or manifest last for a URL)
    (`before_commit`, a fault-injection hook, runs on every rank after the files are written)."""
    state = {k: v.detach() for k, v in flat_state(model, optimizer).items()}
    tmp = begin_save(root, step)
    try:
        with warnings.catch_warnings():  # DCP warns that a single process saves alone: that is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, storage_writer=writer(tmp), no_dist=not _is_dist())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - any write failure (DCP's is a BaseException): one
        raise save_failed(tmp, step, e) from None  # line, the partial directory not left behind
    return commit_save(root, step, tmp, extra, keep, before_commit=before_commit)


def save_failed(tmp: Location, step: int, error: BaseException) -> CheckpointError:
    """The one-line error for a failed checkpoint write (free space named: a full disk shows as torch's 'unexpected
    pos'). The partial directory is removed at once by a single process, and by rank 0 of a multi-rank save when
    DCP failed collectively (a CheckpointException reaches every rank only after all of them finished writing, so
    no rank writes into it any more); any other multi-rank failure leaves it to the next attempt's `begin_save`
    (another rank may still be writing, and waiting for it would take a collective that hangs if a rank died)."""
    import shutil

    free = ""
    if not isinstance(tmp, RemotePath):
        try:
            free = f"; {shutil.disk_usage(tmp.parent).free / 2**20:.0f} MiB free on that filesystem"
        except OSError:
            pass
        if not _is_dist() or (isinstance(error, CheckpointException) and _rank() == 0):
            rmtree(tmp)
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    cause = _first_cause(error) if isinstance(error, CheckpointException) else f"{type(error).__name__}: {first}"
    return CheckpointError(f"saving checkpoint step {step} into {tmp} failed ({cause}){free}; "
                           "the previous checkpoints are intact")


def begin_save(root: str | Location, step: int) -> Location:
    """The emptied directory the ranks write step `step` into (step_N itself for a URL). Collective."""
    root = as_location(root)
    final = step_dir(root, step)
    tmp = final if isinstance(root, RemotePath) else root / f".tmp-step_{step:08d}"
    if _rank() == 0:
        rmtree(tmp)  # an earlier attempt's partial write of this step (or, for a URL, its old commit)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def commit_save(root: str | Location, step: int, tmp: Location, extra: dict[str, Any], keep: int,
                group: Any = None, before_commit: Callable[[], None] | None = None) -> Location:
    """After every rank's DCP write into `tmp`: trainer state, manifest, commit, prune. Collective over `group`."""
    root = as_location(root)
    final = step_dir(root, step)
    if _rank() == 0:
        (tmp / EXTRA).write_text(json.dumps({"step": step, **extra}))
    _barrier(group)
    if before_commit is not None and tmp == final:  # a URL: the manifest is the commit, so the hook runs before it
        before_commit()
    write_manifest(tmp, step, group)  # collective: every rank hashes its share; for a URL the manifest commits
    if before_commit is not None and tmp != final:
        before_commit()
    if _rank() == 0:
        if tmp != final:
            rmtree(final)
            os.replace(tmp, final)
        _prune(root, keep, final)
    _barrier(group)
    return final


def _prune(root: Location, keep: int, newest_good: Location) -> None:
    """Keep the last `keep` checkpoints, and always the one just written (the newest known-good one),
    even when checkpoints with higher step numbers (left by an earlier attempt, maybe bad) take the slots;
    drop partial writes (`.tmp-step_*`) left by dead attempts."""
    if not isinstance(root, RemotePath):  # at most one save is in flight, and this one just committed: every
        for part in root.glob(".tmp-step_*"):  # other partial write is a dead attempt's (a rank killed mid-save)
            rmtree(part)
    if keep <= 0:
        return
    for old in committed(root)[:-keep]:
        if old != newest_good:
            rmtree(old)


def read_extra(path: Location) -> dict[str, Any]:
    """The trainer state JSON of a checkpoint (call after verify_checkpoint)."""
    try:
        return json.loads((path / EXTRA).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {EXTRA}: {e}") from None


def load_checkpoint(path: str | Location, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    manifest: dict[str, Any] | None = None, cfg_dict: dict[str, Any] | None = None) -> dict:
    """Verify (unless `manifest` says it already was), then load weights (and optimizer state) in place.

    With `cfg_dict`, a checkpoint of another model (model-defining keys differ) is refused listing the keys.
    Returns the trainer extra state. Collective when a process group is up (every rank calls it).
    """
    path = as_location(path)
    if manifest is None:
        manifest = verify_checkpoint(path, required=(EXTRA,))
    extra = read_extra(path)
    if cfg_dict is not None:
        resume_config_changes(extra, cfg_dict, path, hint="use the config it was trained with (in its "
                                                          f"{EXTRA})")
    reader = verified_reader(path, manifest)
    saved = reader.read_metadata().state_dict_metadata  # a refused .metadata raises CheckpointError here, before
    state = flat_state(model, optimizer)  # DCP logs its own fallback
    if optimizer is None:
        state = {k: v for k, v in state.items() if not k.startswith("optim.")}
    # N:M masks in use (sparsity.refresh_every > 1): a checkpoint without them (older, or saved with masks
    # recomputed every step) loads as before; the masks are then recomputed from the weights
    state = {k: v for k, v in state.items() if k in saved or ".nm_masks." not in f".{k}"}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=not _is_dist())
    except (Exception, CheckpointException) as e:  # DCP raises many types; CheckpointException is a BaseException
        cause = _first_cause(e)
        hint = ""
        if "Missing key in checkpoint state_dict: optim." in cause and any(k.startswith("model.") for k in state):
            hint = ("; its optimizer state is incomplete (sparsetrain before 2026-12-03 dropped FSDP2's root and "
                    "last block's Adam state from saves right after an evaluation): resume from an earlier "
                    "checkpoint of the run, or use `sparsetrain eval`/`generate`, which read weights only")
        raise CheckpointError(f"checkpoint {path} does not match this model: {cause[:300]}{hint}") from e
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


RESUME_SINCE_ENV = "SPARSETRAIN_RESUME_SINCE"  # set by the launcher's restart of a checkpoint.resume=false run


def committed_at(path: Location) -> float:
    """When checkpoint `path` was committed: its manifest's mtime, else the directory's (epoch seconds; 0.0 when
    the store records none)."""
    for p in (path / MANIFEST, path):
        try:
            return float(p.stat().st_mtime)
        except OSError:
            continue
    return 0.0


def find_resumable(root: str | Location, since: float | None = None) -> tuple[Location | None, dict[str, Any] | None,
                                                                      list[tuple[Location, str]]]:
    """Newest checkpoint under root that verifies: (path, manifest, [(refused newer path, reason), ...]);
    committed at or after `since` (epoch seconds; default: RESUME_SINCE_ENV, else any time), so a restarted run
    that began with checkpoint.resume=false never resumes from an earlier run's checkpoint in its directory.

    Collective when a process group is up. (None, None, refused) when nothing under root verifies.
    """
    since = float(os.environ.get(RESUME_SINCE_ENV) or 0.0) if since is None else since
    refused: list[tuple[Location, str]] = []
    for path in reversed(committed(root)):
        if since and committed_at(path) < since:
            continue
        try:
            return path, verify_checkpoint(path, required=(EXTRA,)), refused
        except CheckpointError as e:
            refused.append((path, str(e)))
    return None, None, refused


def latest_checkpoint(root: str | Location) -> Location | None:
    """The newest checkpoint under root that verifies (None if none does). Collective like find_resumable."""
    return find_resumable(root)[0]


def fallback_line(root: str | Location, good: Location | None, refused: list[tuple[Location, str]],
                  reading: bool = False) -> str:
    """One line saying which checkpoints were refused and what resuming from `good` costs (`reading`: eval /
    generate, which read `good` instead and train nothing).

    Raises CheckpointError when nothing verifies: starting over silently would lose the run.
    """
    newest, reason = refused[0]
    more = f" (and {len(refused) - 1} more refused)" if len(refused) > 1 else ""
    if good is None:
        raise CheckpointError(f"no checkpoint under {root} verifies: {reason}{more}; move the bad ones away "
                              f"or start over in another train.out_dir")
    lost = step_of(newest) - step_of(good)
    steps = f"{lost} step{'s' if lost != 1 else ''} earlier"
    if reading:
        return f"checkpoint refused: {reason}{more}; reading {good.name} instead, {steps}"
    return f"checkpoint refused: {reason}{more}; resuming from {good.name} instead, {steps} (trained again)"


def is_checkpoint_dir(path: str | Location) -> bool:
    """Whether `path` is one checkpoint (as opposed to a directory of them)."""
    path = as_location(path)
    return (path / MANIFEST).exists() or (path / METADATA).exists() or (path / EXTRA).exists()


def checkpoint_root(out_dir: str, directory: str = "") -> Location:
    """checkpoint.dir, or <train.out_dir>/checkpoints: a local Path or a RemotePath for a URL."""
    return as_location(directory or join(str(out_dir), "checkpoints"))


RESUME_HINT = "resume with the checkpoint's values, or start a new run in another train.out_dir"


def resume_config_changes(extra: dict[str, Any], cfg_dict: dict[str, Any], path: Location,
                          hint: str = RESUME_HINT) -> list[str]:
    """Run-control keys that differ from the checkpoint's config ('key old -> new'); CheckpointError listing
    every model-defining key that differs (sizes, vocab, experts, top_k, sparsity structure)."""
    refused, changed = compare(extra.get("config") or {}, cfg_dict)
    if refused:
        raise CheckpointError(f"checkpoint {path} belongs to a different model: {', '.join(refused)}; {hint}")
    return changed


def quick_check(path: Location) -> Any:
    """A look at checkpoint `path` before any process starts: its manifest, every file's presence and size, and the
    JSON trainer state, hashed and parsed (nothing unpickled, no shard hashed); returns that state. Raises
    CheckpointError naming the first problem. Not a verification: the ranks hash every file of the one they
    resume from, and fall back (saying so) past one that fails."""
    manifest = verify_checkpoint(path, required=(EXTRA,), collective=False, hashes=False)
    reason = check_file(path, EXTRA, manifest["files"][EXTRA])  # small: hashed here
    if reason:
        raise CheckpointError(reason)
    return read_extra(path)


def preflight_resume(cfg_dict: dict[str, Any]) -> None:
    """Before any process starts: refuse when no checkpoint is whole, the newest whole one is of another model, or
    a fresh run (resume off) would write into the checkpoint directory of an earlier one (it would replace that
    run's step_N, metrics and summary, and leave a mix that a later resume reads as one run).

    Cheap: manifests, file presence and sizes, and the JSON trainer state (hashed; nothing unpickled, no shard
    hashed); the ranks verify the SHA-256 of the checkpoint they resume from and check the config again.
    """
    root = checkpoint_root(cfg_dict["train"]["out_dir"], cfg_dict["checkpoint"]["dir"])
    if not cfg_dict["checkpoint"]["resume"]:
        old = committed(root)
        if old:
            raise CheckpointError(f"checkpoint.resume=false, but {root} already holds checkpoints of an earlier run "
                                  f"(up to {old[-1].name}) that a fresh run would overwrite: use a fresh "
                                  "train.out_dir, remove the earlier run, or set checkpoint.resume=true")
        return
    refused: list[tuple[Location, str]] = []
    for path in reversed(committed(root)):
        try:
            extra = quick_check(path)
        except CheckpointError as e:
            refused.append((path, str(e)))
            continue
        if isinstance(extra, dict):
            resume_config_changes(extra, cfg_dict, path)
        return
    if refused:
        fallback_line(root, None, refused)  # raises: nothing to resume from
