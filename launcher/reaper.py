"""Reaper: ends every process a launcher started when the launcher goes away, even by SIGKILL.

`start_reaper()` spawns `python -m sparsetrain.launcher.reaper --owner PID` in its
own session with a pipe on its stdin. While the owner lives, the reaper records
the processes that appear in the owner's process tree twice a second (pid + kernel
start time, so a reused pid is never touched; what the owner had already started
before the reaper is left alone). When the pipe closes (the owner exited, crashed or was killed),
it sends SIGTERM to every recorded process still alive, then SIGKILL after a grace
period, and deletes the files it was given (`--remove`: the local runtime's auth token file). Ray's own
clean-up misses its dashboard and runtime-env agents after a SIGKILL of the driver (they stayed listening for
minutes); this catches them.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import time

from sparsetrain.launcher.procs import alive, descendants, start_time

TICK_S = 0.5
GRACE_S = 3.0


def start_reaper(owner: int | None = None, remove: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start a reaper for `owner` (default: this process) that also deletes the files `remove` when it cleans up;
    close its stdin to make it clean up now."""
    owner = owner or os.getpid()
    files = [a for path in remove for a in ("--remove", path)]
    return subprocess.Popen([sys.executable, "-m", "sparsetrain.launcher.reaper", "--owner", str(owner), *files],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop_reaper(proc: subprocess.Popen | None, timeout_s: float = GRACE_S + 5) -> None:
    """Let the reaper clean up what is left and wait for it."""
    if proc is None:
        return
    try:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()


def _record(owner: int, seen: dict[int, int], before: set[int]) -> None:
    """Add the owner's descendants started since the reaper began (never what it had before, nor us)."""
    me = os.getpid()
    for pid in descendants(owner) - before:
        if pid != me and pid not in seen and (t := start_time(pid)) is not None:
            seen[pid] = t


def reap(seen: dict[int, int], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM then SIGKILL every recorded process that is still the same process; returns those signalled."""
    signalled = alive(seen)
    for pid in signalled:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    left = signalled
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = alive({p: seen[p] for p in left})
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return signalled


def main(argv: list[str] | None = None) -> int:
    """Watch --owner until stdin closes, then end what it started."""
    p = argparse.ArgumentParser(prog="python -m sparsetrain.launcher.reaper")
    p.add_argument("--owner", type=int, required=True)
    p.add_argument("--remove", action="append", default=[], help="a file to delete after the processes are gone")
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the launcher; it closes our pipe when done
    seen: dict[int, int] = {}
    owner_t, before = start_time(args.owner), descendants(args.owner)
    while True:
        _record(args.owner, seen, before)
        ready, _, _ = select.select([sys.stdin], [], [], TICK_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the owner closed the pipe or died
        if start_time(args.owner) != owner_t:
            break
    if start_time(args.owner) == owner_t:  # the owner closed the pipe itself: take a last look at its tree
        _record(args.owner, seen, before)
    reap(seen)
    for path in args.remove:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
