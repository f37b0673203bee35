"""One run per output directory: a lock file naming its holder (host, pid, start time).

`sparsetrain train` takes `<out_dir>/.sparsetrain.lock` before any process or runtime starts and removes it
on exit. The lock is created atomically (a complete temp file hard-linked into place, so nobody ever reads
a half-written lock). A second run on the same directory fails at once naming the holder. A lock left by a
dead process on this host (pid gone, pid reused by another process, or the host rebooted) is taken over
with a log line. Its pid cannot be checked from another host, so the holder renews the lock's mtime every
LEASE_RENEW_S (a lease): a lock of another host not renewed for LEASE_S is taken over (a head pod lost on a
cluster, its job resubmitted on a new one). A run finding a fresh lock of another host waits for the next
renewal (then refuses) or for the lease to run out (then takes over), so it waits at most LEASE_S.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

LOCK_NAME = ".sparsetrain.lock"
LEASE_RENEW_S = 20.0  # the holder touches its lock this often
RETRY = ""  # _wait_for_lease: the lock was released or replaced, try again
LEASE_S = 120.0  # a lock of another host not touched for this long is stale (6 renewals missed; clock skew margin)


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


def _age_s(path: Path) -> float | None:
    """Seconds since the lock was last written or renewed (None when it is gone)."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return None


def stale_reason(holder: dict[str, Any], age_s: float | None = None) -> str | None:
    """Why a lock's holder is certainly gone (None when it may be alive); another host's by its lease only,
    given the lock's age `age_s`."""
    if holder.get("host") != socket.gethostname():
        if age_s is not None and age_s > LEASE_S:
            return f"not renewed for {age_s:.0f} s (its holder renews it every {LEASE_RENEW_S:.0f} s)"
        return None
    boot = _read("/proc/sys/kernel/random/boot_id")
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return "this host rebooted since"
    try:
        pid = int(holder.get("pid", -1))
    except (TypeError, ValueError):
        return "its pid is not a number (a damaged lock)"
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
    try:
        with open(tmp, "w") as f:  # flushed to disk before it is linked: a crash leaves no empty lock
            f.write(json.dumps(me))
            f.flush()
            os.fsync(f.fileno())
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
        try:
            if _try_create(path, me):
                return path, me
        except OSError as e:
            raise RunLockError(f"cannot create the run lock {path}: {e.strerror or e} ({type(e).__name__}); "
                               "free space or use another train.out_dir") from None
        text = _read(str(path))
        holder = _load(path)
        if holder is None:  # vanished or unreadable: garbage is not a holder we can name
            age = _age_s(path)
            if age is not None and age > 60:
                holder = {"host": socket.gethostname(), "pid": -1, "started": "unknown (unreadable lock)"}
            else:
                time.sleep(0.2)
                continue
        reason = stale_reason(holder, _age_s(path))
        if reason is None and holder.get("host") != socket.gethostname():
            reason = _wait_for_lease(path, text, holder, log)
            if reason == RETRY:
                continue
        if reason is None:
            raise RunLockError(f"{directory} is in use by another sparsetrain run: {_describe(holder)} "
                               f"(lock {path}); wait for it, stop it, or use another train.out_dir")
        guard = os.open(directory, os.O_RDONLY)  # flock on the directory: one taker at a time on this host
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if _read(str(path)) == text:  # still the lock judged stale (raw text: an unreadable one compares too)
                path.unlink(missing_ok=True)
                log(f"taking over the stale lock {path} of {_describe(holder)}: {reason}")
        finally:
            os.close(guard)
    raise RunLockError(f"could not take the lock {path} (contended); try again")


def _wait_for_lease(path: Path, text: str | None, holder: dict[str, Any], log: Callable[[str], None]) -> str | None:
    """Another host's fresh lock: None as soon as it is renewed (its holder lives), RETRY when it is released or
    replaced, or the stale reason once its lease runs out."""
    try:
        seen = path.stat().st_mtime
    except OSError:
        return RETRY
    log(f"{path} is held by {_describe(holder)}: waiting up to {LEASE_S:.0f} s for it to renew its lease")
    while True:
        time.sleep(min(2.0, LEASE_RENEW_S / 4))
        try:
            now = path.stat().st_mtime
        except OSError:
            return RETRY
        if _read(str(path)) != text:
            return RETRY
        if now != seen:
            return None
        reason = stale_reason(holder, _age_s(path))
        if reason is not None:
            return reason


def _renew(held: list[tuple[Path, dict[str, Any]]], stop: threading.Event) -> None:
    """Touch every lock still ours every LEASE_RENEW_S until `stop` (a daemon thread of the holder)."""
    while not stop.wait(LEASE_RENEW_S):
        for path, me in held:
            cur = _load(path)
            if cur is not None and cur.get("token") == me["token"]:
                try:
                    os.utime(path)
                except OSError:
                    pass  # a missed renewal: the next one, or a stale verdict LEASE_S later


def _release(path: Path, me: dict[str, Any]) -> None:
    held = _load(path)
    if held is not None and held.get("token") == me["token"]:
        path.unlink(missing_ok=True)


def lock_dirs(d: str | Path) -> list[Path]:
    """The local directories whose lock stands for `d`: itself; for a URL its local mirror (object stores have no
    atomic create-if-absent), and for a file:// URL also the directory it names (the same one as a plain path)."""
    from sparsetrain.train.location import is_url, local_dir

    try:
        if not is_url(str(d)):
            return [Path(d).resolve()]
        out = [local_dir(str(d)).resolve()]
        if str(d).startswith("file://"):
            out.append(Path(str(d)[len("file://"):]).resolve())
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Path.resolve)
        raise RunLockError(f"output directory {d} cannot be used: {e}") from None
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
    held: list[tuple[Path, dict[str, Any]]] = []
    stop = threading.Event()
    with ExitStack() as stack:
        for d in seen:
            path, me = _acquire(d, log)
            stack.callback(_release, path, me)
            held.append((path, me))
        renewer = threading.Thread(target=_renew, args=(held, stop), name="run-lock-lease", daemon=True)
        renewer.start()
        stack.callback(stop.set)  # runs before the releases
        yield
