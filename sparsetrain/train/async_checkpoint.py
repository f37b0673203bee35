"""checkpoint.async: training goes on while a checkpoint is written; the commit follows the write.

`save` stages the state to host memory and hands it to `torch.distributed.checkpoint.async_save` (DCP
copies every tensor before returning, so the next optimizer steps cannot reach what is being written),
then a background thread waits for the write and commits it exactly as a synchronous save does: trainer
state, SHA-256 manifest, rename (or, for a URL, the manifest written last), retention. A manifest therefore
never points at a half-written checkpoint; a run killed mid-write leaves the previous checkpoint as the
newest loadable one. At most one save is in flight: the next `save`, the end of training, a stop request
(SIGTERM) and an `on_nan` rollback all `wait()` for it first. The background collectives (DCP's plan
exchange, the manifest's hashing split) run on a gloo process group of their own, so they never interleave
with the training collectives of the main thread (the approach torchtitan takes).
"""
from __future__ import annotations

import datetime
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from sparsetrain.train.checkpoint import begin_save, commit_save, save_failed
from sparsetrain.train.location import Location
from sparsetrain.train.safe_dcp import writer
from sparsetrain.train.state import flat_state


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


class AsyncCheckpointer:
    """Asynchronous checkpoint saves with deferred commit; at most one in flight."""

    def __init__(self, timeout_s: float = 300.0) -> None:
        self.timeout = datetime.timedelta(seconds=max(timeout_s, 1.0))
        self.group: Any = None  # gloo group for the background collectives (created on the first save)
        self.pending: Future | None = None
        self.pending_step: int | None = None
        self._pool: ThreadPoolExecutor | None = None

    def save(self, root: str | Location, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             extra: dict[str, Any], keep: int, before_commit: Callable[[], None] | None = None) -> Location | None:
        """Wait for the previous save, then start writing this step and return at once (the previous commit's
        path, or None). Collective: every rank calls it at the same step."""
        done = self.wait()
        if _is_dist() and self.group is None:
            self.group = dist.new_group(backend="gloo", timeout=self.timeout)
        tmp = begin_save(root, step)
        state = {k: v.detach() for k, v in flat_state(model, optimizer).items()}
        if not _is_dist():  # DCP warns from its writer thread that one process saves alone: intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        written = dcp.async_save(state, storage_writer=writer(tmp), process_group=self.group, no_dist=not _is_dist())
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparsetrain-ckpt-commit")
        self.pending_step = step
        self.pending = self._pool.submit(self._commit, written, root, step, tmp, extra, keep, before_commit)
        return done

    def _commit(self, written: Future, root: str | Location, step: int, tmp: Location, extra: dict[str, Any],
                keep: int, before_commit: Callable[[], None] | None) -> Location:
        try:
            written.result()  # DCP's write (every rank's files and .metadata) has finished
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - as a synchronous save: one line naming step,
            # directory, free space (DCP's own failure is a CheckpointException, a BaseException)
            raise save_failed(tmp, step, e) from None
        return commit_save(root, step, tmp, extra, keep, self.group, before_commit)

    def wait(self) -> Location | None:
        """Block until the save in flight is committed (re-raising its error); its path, or None if none."""
        if self.pending is None:
            return None
        pending, self.pending, self.pending_step = self.pending, None, None
        return pending.result()

    def close(self) -> None:
        """Wait for the save in flight and stop the commit thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
