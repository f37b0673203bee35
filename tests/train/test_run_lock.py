"""One run per out_dir: a held lock names its holder, a stale one is taken over, two CLI runs collide fast."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsetrain.train.run_lock import (
    LOCK_NAME,
    RunLockError,
    _identity,
    _proc_start,
    ensure_writable_dir,
    run_lock,
)
from tests.test_cli import ROOT, TINY, _sets, cli

pytestmark = [pytest.mark.unit]


def _holder(pid: int, **kw) -> dict:
    return {**_identity(), "pid": pid, "proc_start": _proc_start(pid), "started": "2026-12-01 10:00:00 UTC", **kw}


def test_live_holder_refused_with_host_pid_start(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps(_holder(sleeper.pid)))
        with pytest.raises(RunLockError) as ei, run_lock(tmp_path):
            pass
        msg = str(ei.value)
        assert f"pid {sleeper.pid} on {socket.gethostname()}, started 2026-12-01 10:00:00 UTC" in msg
        assert str(tmp_path) in msg and "\n" not in msg
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == sleeper.pid  # left alone
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("case", ["dead", "pid_reused", "rebooted"])
def test_stale_lock_taken_over_with_a_line(tmp_path, case):
    if case == "dead":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        holder, why = _holder(gone.pid), "no longer running"
    elif case == "pid_reused":  # our own (live) pid, but recorded with another start time
        holder, why = _holder(os.getpid(), proc_start="1"), "belongs to another process"
    else:
        holder, why = _holder(os.getpid(), boot_id="another-boot"), "rebooted"
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
    lines: list[str] = []
    with run_lock(tmp_path, log=lines.append):
        mine = json.loads((tmp_path / LOCK_NAME).read_text())
        assert mine["pid"] == os.getpid() and mine["token"] != holder["token"]
    assert len(lines) == 1 and "taking over the stale lock" in lines[0] and why in lines[0]
    assert f"pid {holder['pid']}" in lines[0]
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp files left behind


@pytest.fixture
def short_lease(monkeypatch):
    from sparsetrain.train import run_lock as rl

    monkeypatch.setattr(rl, "LEASE_RENEW_S", 0.1)
    monkeypatch.setattr(rl, "LEASE_S", 1.0)
    return rl


def test_another_hosts_lock_is_a_lease(tmp_path, short_lease):
    """Another host's pid cannot be checked: a lock it renews is refused (after one renewal), one it stopped
    renewing for LEASE_S is taken over with a line (a lost head pod whose job is resubmitted elsewhere)."""
    import threading

    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps(_holder(999999, host="elsewhere")))
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(0.1):
            os.utime(lock)

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    lines: list[str] = []
    try:
        with pytest.raises(RunLockError, match="pid 999999 on elsewhere"), run_lock(tmp_path, log=lines.append):
            pass
    finally:
        stop.set()
        renewer.join()
    assert len(lines) == 1 and "waiting up to 1 s" in lines[0] and lock.exists()
    past = time.time() - 5
    os.utime(lock, (past, past))
    lines.clear()
    with run_lock(tmp_path, log=lines.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert len(lines) == 1 and "taking over the stale lock" in lines[0] and "not renewed for 5 s" in lines[0]


def test_the_holder_renews_its_lease(tmp_path, short_lease):
    lock = tmp_path / LOCK_NAME
    with run_lock(tmp_path):
        past = time.time() - 50
        os.utime(lock, (past, past))
        time.sleep(0.5)
        assert time.time() - lock.stat().st_mtime < 5
    assert not lock.exists()


@pytest.mark.parametrize("content", ["", "{garbage", "[1, 2]", '{"host": "HOST", "pid": "abc"}'])
def test_an_unreadable_stale_lock_is_taken_over(tmp_path, content):
    """An empty lock (a host crash before the file reached disk), garbage, or a pid that is not a number: once
    older than a minute it is taken over, not refused as contended forever."""
    lock = tmp_path / LOCK_NAME
    lock.write_text(content.replace("HOST", socket.gethostname()))
    past = time.time() - 120
    os.utime(lock, (past, past))
    lines: list[str] = []
    with run_lock(tmp_path, log=lines.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert len(lines) == 1 and "taking over the stale lock" in lines[0]


def test_lock_write_failure_and_symlink_loop_are_one_line(tmp_path, monkeypatch):
    from sparsetrain.train import run_lock as rl

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(RunLockError, match="cannot be used"), run_lock(loop / "out"):
        pass

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rl.os, "fsync", full)
    with pytest.raises(RunLockError, match=r"cannot create the run lock .*No space left on device"), \
            run_lock(tmp_path / "ok"):
        pass
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == []  # no temp file left behind


def test_nested_and_released_on_error(tmp_path):
    ck = tmp_path / "ck"
    with pytest.raises(ValueError), run_lock(tmp_path / "out", ck):
        assert (tmp_path / "out" / LOCK_NAME).exists() and (ck / LOCK_NAME).exists()
        with pytest.raises(RunLockError, match=f"pid {os.getpid()}"), run_lock(ck):
            pass
        raise ValueError
    assert not (tmp_path / "out" / LOCK_NAME).exists() and not (ck / LOCK_NAME).exists()
    with run_lock(tmp_path / "out", tmp_path / "out" / "checkpoints"):  # inside out_dir: locked too, so another
        assert (tmp_path / "out" / "checkpoints" / LOCK_NAME).exists()  # run's checkpoint.dir cannot point here
        with pytest.raises(RunLockError, match="checkpoints is in use"), run_lock(tmp_path / "b",
                                                                                  tmp_path / "out" / "checkpoints"):
            pass
    assert not (tmp_path / "out" / "checkpoints" / LOCK_NAME).exists()


def test_a_file_url_locks_the_directory_it_names(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSETRAIN_LOCAL_DIR", str(tmp_path / "mirror"))
    with run_lock(tmp_path / "fu"), pytest.raises(RunLockError, match="is in use"), \
            run_lock(f"file://{tmp_path / 'fu'}"):
        pass


def test_two_cli_runs_on_one_out_dir(tmp_path):
    out = tmp_path / "run"
    sets = _sets(TINY) + ["--set", f"train.out_dir={out}"]
    env = {**os.environ, "SPARSETRAIN_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "sparsetrain.cli", "train", "-c", "tiny", *sets,
                              "--set", "train.steps=100000", "--set", "checkpoint.save_final=false"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        r = cli("train", "-c", "tiny", *sets, "--set", "train.steps=1")
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert f"pid {first.pid} on {socket.gethostname()}" in lines[0] and "in use" in lines[0]
        assert not (out / "metrics.jsonl").exists() or first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock
        first.wait()
    r = cli("train", "-c", "tiny", *sets, "--set", "train.steps=1", "--set", "checkpoint.resume=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"taking over the stale lock {out / LOCK_NAME} of pid {first.pid}" in r.stderr
    assert not (out / LOCK_NAME).exists()


def test_an_unusable_output_directory_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(RunLockError, match=f"output directory {bad} cannot be used"), run_lock(bad):
            pass


def test_one_writability_check_for_the_lock_and_the_cli_outputs(tmp_path: Path) -> None:
    from sparsetrain.cli import _writable_dir

    ensure_writable_dir(tmp_path / "a" / "b")  # created with its parents, the probe removed
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(OSError):
        ensure_writable_dir(tmp_path / "afile")
    with pytest.raises(ValueError, match=rf"^--out {tmp_path / 'afile'}: not a writable directory \("):
        _writable_dir(tmp_path / "afile", "--out")
