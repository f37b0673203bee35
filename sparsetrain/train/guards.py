"""Run guards: the non-finite-loss policy and the preemption (SIGTERM) stop request.

NaN policy (`train.on_nan`): `error` stops at the first non-finite loss; `skip`
drops that step's update and prints it; `rollback` reloads the newest committed
checkpoint (weights, optimizer, strategy state) and goes on with the next batch
(the offending batch and those since the checkpoint are not replayed). Under
skip/rollback more than `train.max_skipped_steps` such steps end the run with
NonFiniteLossError (non-zero exit). A checkpoint is never written from weights
that are not finite.

Preemption: a SIGTERM (torchrun / inline: the rank's own handler; Ray: the
launcher calls `request_stop` in every rank) sets STOP; at the end of the step in
which any rank saw it, all ranks agree (the flag travels in the step's stats
all-reduce), save a checkpoint and return normally.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import torch

STOP = threading.Event()


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf (or did so too often); the message names the step."""


def request_stop() -> None:
    """Ask the training loop of this process to checkpoint and stop after the current step."""
    STOP.set()


def stop_flag() -> float:
    """1.0 when a stop was requested in this process (summed over ranks in the step's stats)."""
    return 1.0 if STOP.is_set() else 0.0


def install_sigterm_handler() -> Callable[[], None]:
    """SIGTERM -> request_stop (main thread only; elsewhere the launcher calls request_stop); returns an undo."""
    STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = signal.signal(signal.SIGTERM, lambda *_: request_stop())
    return lambda: signal.signal(signal.SIGTERM, old)


def all_finite(params: Any) -> bool:
    """True when every (local shard of every) tensor is finite, on every rank."""
    from sparsetrain.parallel.comm import all_reduce_host

    bad: torch.Tensor | float = 0.0
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        bad = bad + (~torch.isfinite(local.detach())).sum().float()  # on the params' device: no host sync
    return float(all_reduce_host([float(bad)])[0]) == 0.0  # one collective, on the comm device


class NanGuard:
    """Counts non-finite steps and decides what the trainer does with one."""

    def __init__(self, on_nan: str, max_skipped: int, say: Callable[[str], None]) -> None:
        self.on_nan, self.max_skipped, self.say = on_nan, max_skipped, say
        self.skipped: list[int] = []

    def handle(self, step: int, loss: float) -> str:
        """Decision for a non-finite step: 'skip' or 'rollback'; raises under on_nan=error or over the budget."""
        if self.on_nan == "error":
            raise NonFiniteLossError(f"non-finite loss {loss} at step {step} (train.on_nan=error; "
                                     f"set train.on_nan=skip or rollback to survive such steps)")
        self.skipped.append(step)
        if len(self.skipped) > self.max_skipped:
            raise NonFiniteLossError(f"non-finite loss at {len(self.skipped)} steps (last: step {step}), more than "
                                     f"train.max_skipped_steps={self.max_skipped}; the run diverged: lower train.lr "
                                     f"or resume from an earlier checkpoint")
        action = "rolled back to the last checkpoint" if self.on_nan == "rollback" else "update skipped"
        self.say(f"step {step}: non-finite loss {loss}; {action} "
                 f"({len(self.skipped)}/{self.max_skipped} allowed by train.max_skipped_steps)")
        return self.on_nan
