"""Fault injection for recovery tests and benchmarks, driven by environment variables the launcher forwards.

SPARSETRAIN_FAIL_RANK=R alone: rank R raises at every step >= 1 (a permanent fault).
With SPARSETRAIN_FAIL_STEP=k: rank R faults once, at step k of the first attempt only (SPARSETRAIN_ATTEMPT
unset or 0), so a restarted group runs through. SPARSETRAIN_FAIL_MODE says how:
  raise (default)  raise RuntimeError
  kill             SIGKILL itself (a dead process, no traceback)
  stall            hang (a heartbeat watcher or the collective timeout launch.timeout_s ends the group)
  delay            sleep SPARSETRAIN_FAIL_DELAY_S (default 2) before the step's collectives, then go on
  nan              poison this rank's gradients and loss with NaN (train.on_nan decides what happens)
  corrupt          overwrite bytes of the newest committed checkpoint's largest file, then raise
  save_kill        SIGKILL itself while writing the checkpoint of step k (after its files, before the commit)

SPARSETRAIN_FAULTS="mode@step:rank,mode@step:rank,..." plans several faults in one run: they fire in order,
each once; a fault that ends its attempt (everything but delay and nan) moves the next ones to the next
attempt. Every fault that fires appends one JSON line to `<out_dir>/faults.jsonl` (mode, rank, step, attempt,
time), which benchmarks/recovery.py reads.
"""
from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FAIL_RANK_ENV = "SPARSETRAIN_FAIL_RANK"
FAIL_STEP_ENV = "SPARSETRAIN_FAIL_STEP"
FAIL_MODE_ENV = "SPARSETRAIN_FAIL_MODE"
FAIL_DELAY_ENV = "SPARSETRAIN_FAIL_DELAY_S"
FAULTS_ENV = "SPARSETRAIN_FAULTS"
ATTEMPT_ENV = "SPARSETRAIN_ATTEMPT"  # set by the launcher: 0 for the first start, n after the n-th restart
MODES = ("raise", "kill", "stall", "delay", "nan", "corrupt", "save_kill")
CONTINUING = ("delay", "nan")  # faults after which the attempt goes on
LOG = "faults.jsonl"


def parse_plan(text: str) -> list[tuple[str, int, int, int]]:
    """'mode@step:rank,...' -> [(mode, step, rank, attempt it fires in)]; ValueError naming a bad entry."""
    out, attempt = [], 0
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            mode, rest = item.split("@")
            step, rank = (int(v) for v in rest.split(":"))
        except ValueError:
            raise ValueError(f"{FAULTS_ENV}: {item!r} is not mode@step:rank") from None
        if mode not in MODES:
            raise ValueError(f"{FAULTS_ENV}: mode {mode!r} in {item!r}; allowed: {', '.join(MODES)}")
        out.append((mode, step, rank, attempt))
        attempt += mode not in CONTINUING
    return out


def _planned(rank: int, step: int, when: str) -> str | None:
    """The mode of the fault planned for this rank, step and attempt at this point ('step' or 'save'), if any."""
    attempt = int(os.environ.get(ATTEMPT_ENV, "0"))
    plan = parse_plan(os.environ.get(FAULTS_ENV, ""))
    if os.environ.get(FAIL_RANK_ENV) is not None and os.environ.get(FAIL_STEP_ENV) is not None:
        plan.append((os.environ.get(FAIL_MODE_ENV, "raise"), int(os.environ[FAIL_STEP_ENV]),
                     int(os.environ[FAIL_RANK_ENV]), 0))
    for mode, at, r, a in plan:
        if (r, at, a) == (rank, step, attempt) and (mode == "save_kill") == (when == "save"):
            return mode
    return None


def _record(out_dir: str | Path | None, mode: str, rank: int, step: int) -> None:
    if out_dir is None:
        return
    rec = {"mode": mode, "rank": rank, "step": step, "attempt": int(os.environ.get(ATTEMPT_ENV, "0")),
           "time": time.time()}
    with (Path(out_dir) / LOG).open("a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def maybe_inject(rank: int, step: int, out_dir: str | Path | None = None,
                 ckpt_dir: str | Path | None = None) -> bool:
    """Fault here when the environment asks this rank to at this step; True means 'poison this step (nan)'."""
    if os.environ.get(FAIL_RANK_ENV) == str(rank) and os.environ.get(FAIL_STEP_ENV) is None and step >= 1:
        raise RuntimeError(f"injected failure on rank {rank}")
    mode = _planned(rank, step, "step")
    if mode is None:
        return False
    _record(out_dir, mode, rank, step)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "stall":
        while True:  # until the launcher tears the group down
            time.sleep(1.0)
    if mode == "delay":
        time.sleep(float(os.environ.get(FAIL_DELAY_ENV, "2")))
        return False
    if mode == "nan":
        return True
    if mode == "corrupt" and ckpt_dir is not None:
        corrupt_newest(ckpt_dir)
    raise RuntimeError(f"injected failure on rank {rank} at step {step}" + (" (after corrupting the newest "
                                                                             "checkpoint)" if mode == "corrupt" else ""))


def maybe_kill_in_save(rank: int, step: int, out_dir: str | Path | None = None) -> None:
    """save_kill: die between writing a checkpoint's files and committing it."""
    if _planned(rank, step, "save") is not None:
        _record(out_dir, "save_kill", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)


def corrupt_newest(ckpt_dir: str | Path) -> Path | None:
    """Overwrite 64 bytes in the middle of the largest file of the newest committed checkpoint (bit rot)."""
    from sparsetrain.train.checkpoint import committed

    dirs = committed(ckpt_dir)
    if not dirs:
        return None
    files = [p for p in dirs[-1].iterdir() if p.is_file() and p.suffix == ".distcp"] or \
        [p for p in dirs[-1].iterdir() if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())  # read, change, rewrite: object stores (URL checkpoint.dir) lack r+b
    mid = len(data) // 2
    data[mid:mid + 64] = b"\xff" * len(data[mid:mid + 64])
    victim.write_bytes(bytes(data))
    return victim


def poison_(params: Iterable[torch.Tensor], stats: torch.Tensor) -> None:
    """Fault 'nan': this rank's loss statistic (stats[0]) and every local gradient become NaN."""
    stats[0] = float("nan")
    for p in params:
        if p.grad is not None:
            (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).fill_(float("nan"))
