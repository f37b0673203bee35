"""`launch.max_failures`: restart the worker group after a rank dies or raises, resuming from the last commit.

The CLI holds the out_dir lock for the whole run, across restarts (the workers never take it), so a
restarted group does not trip over its own lock. Each attempt gets SPARSETRAIN_ATTEMPT=n (forwarded to
every rank); the ranks' heartbeats (sparsetrain.train.heartbeat) say how far the failed attempt got.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable

from sparsetrain.launcher.errors import LaunchError

from sparsetrain.train import heartbeat
from sparsetrain.train.faults import ATTEMPT_ENV
from sparsetrain.train.location import Location, local_dir

# errors a rank reports that a restart would only repeat (bad config / data / checkpoint, diverged loss)
NOT_RETRIED = ("ConfigError", "DataError", "CheckpointError", "NonFiniteLossError", "RunLockError")


def _checkpoint_root(cfg_dict: dict) -> Location:
    from sparsetrain.train.checkpoint import checkpoint_root

    return checkpoint_root(cfg_dict["train"]["out_dir"], cfg_dict["checkpoint"]["dir"])


def committed_steps(root: Location, since: float = 0.0) -> int | None:
    """Steps done at the newest committed checkpoint under root (step_N holds N+1 steps) that is whole by
    `checkpoint.quick_check` (files present at their recorded sizes, trainer state intact) and was committed after
    `since` (epoch seconds, `checkpoint.committed_at`); None when there is none. No shard is hashed here: the
    ranks verify before loading, and fall back to an older one, saying so, past one whose hashes fail."""
    from sparsetrain.train.checkpoint import CheckpointError, committed, committed_at, quick_check, step_of

    for p in reversed(committed(root)):
        if since and committed_at(p) < since:
            continue
        try:
            quick_check(p)
        except CheckpointError:
            continue
        return step_of(p) + 1
    return None


def run_with_restarts(cfg_dict: dict, attempt: Callable[[dict], dict | None],
                      log: Callable[[str], None] | None = None) -> dict | None:
    """Call `attempt(cfg_dict)`; on LaunchError restart up to launch.max_failures times, resuming."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    max_failures = int(cfg_dict["launch"].get("max_failures", 0))
    out_dir, root = local_dir(cfg_dict["train"]["out_dir"]), _checkpoint_root(cfg_dict)  # heartbeats: local
    started, cfg, failures = time.time() - 1.0, cfg_dict, 0
    from sparsetrain.train.checkpoint import RESUME_SINCE_ENV

    while True:
        heartbeat.clear(out_dir)
        old, old_since = os.environ.get(ATTEMPT_ENV), os.environ.get(RESUME_SINCE_ENV)
        os.environ[ATTEMPT_ENV] = str(failures)
        if failures and not cfg_dict["checkpoint"]["resume"]:  # the ranks resume only from this run's commits
            os.environ[RESUME_SINCE_ENV] = repr(started)
        try:
            return attempt(cfg)
        except LaunchError as e:
            if failures >= max_failures or _user_error(e):
                if failures:
                    raise LaunchError(f"{_first_line(e)} (after {failures} restart(s), launch.max_failures="
                                      f"{max_failures})", rank=e.rank, details=e.details) from None
                raise
            failures += 1
            reached = max(heartbeat.steps_done(out_dir).values(), default=0)
            # resume=false started this run afresh: only checkpoints it committed itself count
            done = committed_steps(root, 0.0 if cfg_dict["checkpoint"]["resume"] else started)
            if done is not None and not cfg["checkpoint"]["resume"]:
                cfg = copy.deepcopy(cfg)
                cfg["checkpoint"]["resume"] = True
            where = f"from the checkpoint at {done} steps" if done is not None else "from the start (no checkpoint)"
            why = _first_line(e)
            if _timed_out(e):
                _, what = heartbeat.stall_report(heartbeat.beats(out_dir))
                why += f" (a collective waited launch.timeout_s={cfg_dict['launch'].get('timeout_s')}s: {what})"
            log(f"restart {failures}/{max_failures}: {why}; the group had completed {reached} "
                f"step(s); resuming {where}, {max(reached - (done or 0), 0)} step(s) redone")
        finally:
            for key, value in ((ATTEMPT_ENV, old), (RESUME_SINCE_ENV, old_since)):
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _timed_out(e: LaunchError) -> bool:
    """Whether the failure reads like a collective timeout (gloo 'Timed out', NCCL watchdog)."""
    text = f"{e}\n{e.details}".lower()
    return "timed out" in text or "watchdog caught collective operation timeout" in text


def _user_error(e: LaunchError) -> bool:
    """Whether the failing rank reported a user error (retrying would fail the same way)."""
    head = _first_line(e)
    return any(f": {name}" in head or head.startswith(name) for name in NOT_RETRIED)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
