"""Fault injection for recovery tests, driven by environment variables the launcher forwards to every rank.

SPARSETRAIN_FAIL_RANK=R alone: rank R raises at every step >= 1 (a permanent fault).
With SPARSETRAIN_FAIL_STEP=k: rank R fails once, at step k of the first attempt only (SPARSETRAIN_ATTEMPT
unset or 0), so a restarted group runs through; SPARSETRAIN_FAIL_MODE=kill makes it SIGKILL itself instead
of raising (a dead process, no traceback); SPARSETRAIN_FAIL_MODE=stall makes it hang (the other ranks'
collectives time out after launch.timeout_s).
"""
from __future__ import annotations

import os
import signal
import time

FAIL_RANK_ENV = "SPARSETRAIN_FAIL_RANK"
FAIL_STEP_ENV = "SPARSETRAIN_FAIL_STEP"
FAIL_MODE_ENV = "SPARSETRAIN_FAIL_MODE"  # raise (default) | kill | stall
ATTEMPT_ENV = "SPARSETRAIN_ATTEMPT"  # set by the launcher: 0 for the first start, n after the n-th restart


def maybe_inject(rank: int, step: int) -> None:
    """Raise or die here when the environment asks this rank to fail at this step."""
    if os.environ.get(FAIL_RANK_ENV) != str(rank):
        return
    at = os.environ.get(FAIL_STEP_ENV)
    if at is None:
        if step >= 1:
            raise RuntimeError(f"injected failure on rank {rank}")
        return
    if step != int(at) or int(os.environ.get(ATTEMPT_ENV, "0")) != 0:
        return
    mode = os.environ.get(FAIL_MODE_ENV, "raise")
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "stall":
        while True:  # until the launcher tears the group down
            time.sleep(1.0)
    raise RuntimeError(f"injected failure on rank {rank} at step {step}")
