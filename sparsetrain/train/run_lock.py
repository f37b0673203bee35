"""One run per output directory: a lock file naming its holder (host, pid, start time).

`sparsetrain train` takes `<out_dir>/.sparsetrain.lock` before any process or runtime starts and removes it
on exit. The lock is created atomically (a complete temp file hard-linked into place, so nobody ever reads
a half-written lock). A second run on the same directory fails at once naming the holder. A lock left by a
dead process on this host (pid gone, pid reused by another process, or the host rebooted) is taken over
with a log line; a lock held from another host is never taken over (its liveness cannot be checked here).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

LOCK_NAME = ".sparsetrain.lock"


class RunLockError(RuntimeError):
    """The output directory is in use by another run (the message names the holder)."""


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _proc_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (Linux /proc; None elsewhere): tells pid reuse apart."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after the "(comm)" field


def _identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "proc_start": _proc_start(pid),
            "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": uuid.uuid4().hex}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(holder: dict[str, Any]) -> str | None:
    """Why a lock's holder is certainly gone (None when it may be alive, or lives on another host)."""
    if holder.get("host") != socket.gethostname():
        return None
    boot = _read("/proc/sys/kernel/random/boot_id")
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return "this host rebooted since"
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not _alive(pid):
        return "that process is no longer running"
    if holder.get("proc_start") and _proc_start(pid) not in (None, holder["proc_start"]):
        return "that pid now belongs to another process"
    return None


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def _load(path: Path) -> dict[str, Any] | None:
    text = _read(str(path))
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _try_create(path: Path, me: dict[str, Any]) -> bool:
    """Atomically create the lock holding `me` (False when it already exists)."""
    tmp = path.with_name(f"{path.name}.{me['token']}")
    tmp.write_text(json.dumps(me))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def ensure_writable_dir(directory: Path) -> None:
    """Create `directory` (and parents) and prove it writable by creating and removing a probe file.

    Raises the OSError (its caller words it); a probe beats os.access, which root and read-only mounts fool.
    """
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-test-{os.getpid()}"
    probe.touch()
    probe.unlink()


def _acquire(directory: Path, log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    try:
        ensure_writable_dir(directory)
    except OSError as e:
        raise RunLockError(f"output directory {directory} cannot be used: {e.strerror or e} "
                           f"({type(e).__name__}); set train.out_dir / checkpoint.dir to a writable directory") from None
    path, me = directory / LOCK_NAME, _identity()
    for _ in range(5):
        if _try_create(path, me):
            return path, me
        holder = _load(path)
        if holder is None:  # vanished or unreadable: garbage is not a holder we can name
            if path.exists() and time.time() - path.stat().st_mtime > 60:
                holder = {"host": socket.gethostname(), "pid": -1, "started": "unknown (unreadable lock)"}
            else:
                time.sleep(0.2)
                continue
        reason = stale_reason(holder)
        if reason is None:
            raise RunLockError(f"{directory} is in use by another sparsetrain run: {_describe(holder)} "
                               f"(lock {path}); wait for it, stop it, or use another train.out_dir")
        guard = os.open(directory, os.O_RDONLY)  # flock on the directory: one taker at a time on this host
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if _load(path) == holder:
                path.unlink(missing_ok=True)
                log(f"taking over the stale lock {path} of {_describe(holder)}: {reason}")
        finally:
            os.close(guard)
    raise RunLockError(f"could not take the lock {path} (contended); try again")


def _release(path: Path, me: dict[str, Any]) -> None:
    held = _load(path)
    if held is not None and held.get("token") == me["token"]:
        path.unlink(missing_ok=True)


def lock_dirs(d: str | Path) -> list[Path]:
    """The local directories whose lock stands for `d`: itself; for a URL its local mirror (object stores have no
    atomic create-if-absent), and for a file:// URL also the directory it names (the same one as a plain path)."""
    from sparsetrain.train.location import is_url, local_dir

    if not is_url(str(d)):
        return [Path(d).resolve()]
    out = [local_dir(str(d)).resolve()]
    if str(d).startswith("file://"):
        out.append(Path(str(d)[len("file://"):]).resolve())
    return out


@contextmanager
def run_lock(*dirs: str | Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the lock of every directory for the block: out_dir and the checkpoint root, also when the root lies
    inside out_dir (another run pointing checkpoint.dir at it must find it taken)."""
    seen: list[Path] = []
    for d in dirs:
        for p in lock_dirs(d) if d else []:
            if p not in seen:
                seen.append(p)
    with ExitStack() as stack:
        for d in seen:
            path, me = _acquire(d, log)
            stack.callback(_release, path, me)
        yield
