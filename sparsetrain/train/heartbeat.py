"""Per-rank progress files: `<out_dir>/.heartbeat/rank<R>` holds the steps a rank has completed, where it is in
the current step, and when it got there.

Phases of step k (in order): `data` (fetching the batch), `compute` (forward/backward), `sync` (the step's
gradient collectives), then `done` with k+1 steps completed; `eval` / `save` / `load` mark evaluation,
checkpoint writing (or the wait for an async save to commit) and a rollback's reading of one, which may
legitimately take long. The launcher reads the beats after a failure to say at which step
the group was and how many steps a restart redoes (a SIGKILLed rank leaves no traceback, but its last beat),
and its watcher (sparsetrain.launcher.watchdog) names the rank that is behind when the group stops moving:
the others wait for it in a collective.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

DIR = ".heartbeat"
PHASES = ("done", "data", "compute", "sync", "eval", "save", "load")  # order within a step (done = before the next)
# no stall is declared while a rank is in one (collective timeouts still apply): evaluation, writing a checkpoint or
# waiting for an async one to commit (at the end of a run, on SIGTERM), reading one back (on_nan=rollback)
LONG_PHASES = ("eval", "save", "load")


@dataclass(frozen=True)
class Beat:
    """A rank's last beat: completed steps, phase of the step in progress, wall time (epoch seconds)."""

    steps: int
    phase: str
    time: float
    pid: int = 0  # the rank's process and host: a stopped process (SIGSTOP) on this host is named as such
    host: str = ""

    def order(self) -> tuple[int, int]:
        """Sort key of progress: later steps, then later phases, are further along."""
        return self.steps, PHASES.index(self.phase) if self.phase in PHASES else 0

    def where(self) -> str:
        """'in step 3 (sync)' (the step in progress and its phase) or 'after step 2'."""
        return f"in step {self.steps} ({self.phase})" if self.phase != "done" else f"after step {self.steps - 1}"


def _dir(out_dir: str | Path) -> Path:
    """The heartbeat directory: under out_dir, or under its local mirror for a URL (sparsetrain.train.location)."""
    from sparsetrain.train.location import local_dir

    return local_dir(str(out_dir)) / DIR


def beat(out_dir: str | Path, rank: int, steps_done: int, phase: str = "done") -> None:
    """Record that `rank` has completed `steps_done` steps and is now in `phase` (atomic replace; a few bytes)."""
    d = _dir(out_dir)
    if not d.is_dir():
        d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".rank{rank}.tmp"
    tmp.write_text(f"{steps_done} {time.time():.3f} {phase} {os.getpid()} {socket.gethostname()}\n")
    os.replace(tmp, d / f"rank{rank}")


def beats(out_dir: str | Path) -> dict[int, Beat]:
    """{rank: last Beat} (empty when none were written)."""
    found = {int(p.name[4:]): _read(p) for p in _dir(out_dir).glob("rank*") if p.name[4:].isdigit()}
    return {r: b for r, b in found.items() if b is not None}


def _read(path: Path) -> Beat | None:
    """One rank's beat file parsed (None when unreadable or malformed)."""
    try:
        parts = path.read_text().split()
        return Beat(int(parts[0]), parts[2] if len(parts) > 2 else "done", float(parts[1]),
                    int(parts[3]) if len(parts) > 3 else 0, parts[4] if len(parts) > 4 else "")
    except (OSError, ValueError, IndexError):
        return None


def enter(out_dir: str | Path, rank: int, phase: str) -> None:
    """Record that `rank` is now in `phase`, its completed steps unchanged (0 before its first beat)."""
    last = _read(_dir(out_dir) / f"rank{rank}")
    beat(out_dir, rank, last.steps if last is not None else 0, phase)


def steps_done(out_dir: str | Path) -> dict[int, int]:
    """{rank: completed steps} from the last beats (empty when none were written)."""
    return {r: b.steps for r, b in beats(out_dir).items()}


def behind(found: dict[int, Beat]) -> list[int]:
    """The ranks furthest behind when some rank is further along (empty when all are at the same point)."""
    if len(found) < 2:
        return []
    low = min(b.order() for b in found.values())
    if all(b.order() == low for b in found.values()):
        return []
    return sorted(r for r, b in found.items() if b.order() == low)


def stopped(b: Beat) -> bool:
    """Whether the rank's process runs on this host and is stopped (SIGSTOP / SIGTSTP, or a tracer: state T/t)."""
    if not b.pid or b.host != socket.gethostname():
        return False
    try:
        stat = Path(f"/proc/{b.pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] in ("T", "t")  # the field after '(comm)'


def stall_report(found: dict[int, Beat], now: float | None = None) -> tuple[int | None, str]:
    """(the stalled rank or None, one phrase naming it and where the others are) from the last beats."""
    if not found:
        return None, "no rank had written a heartbeat"
    now = time.time() if now is None else now
    halted = sorted(r for r, b in found.items() if stopped(b))
    if halted:
        b = found[halted[0]]
        return halted[0], (f"rank{'s' if len(halted) > 1 else ''} {', '.join(map(str, halted))} (pid {b.pid}) "
                           f"is stopped (SIGSTOP or a debugger: process state T) {b.where()}")
    late = behind(found) or (list(found) if len(found) == 1 else [])
    if not late:
        b = next(iter(found.values()))
        idle = now - max(x.time for x in found.values())
        return None, f"every rank stopped {b.where()} {idle:.0f}s ago (none is behind: a collective or the network hangs)"
    first = found[late[0]]
    ahead = max(found.values(), key=Beat.order)
    names = ", ".join(map(str, late))
    others = f" while the others are {ahead.where()}" if len(found) > 1 else ""
    return late[0], f"rank{'s' if len(late) > 1 else ''} {names} stalled {first.where()} for {now - first.time:.0f}s{others}"


def clear(out_dir: str | Path) -> None:
    """Forget the beats of an earlier attempt."""
    shutil.rmtree(_dir(out_dir), ignore_errors=True)
