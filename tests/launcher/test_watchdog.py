"""The heartbeat watcher: names the rank that is behind when the group stops moving, and tears the group down."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from sparsetrain.launcher.watchdog import HeartbeatWatch

from sparsetrain.train import heartbeat

pytestmark = [pytest.mark.unit]


def _write(out, rank: int, steps: int, phase: str, t: float) -> None:
    d = out / heartbeat.DIR
    d.mkdir(parents=True, exist_ok=True)
    (d / f"rank{rank}").write_text(f"{steps} {t:.3f} {phase}\n")


def test_stalled_rank_is_the_one_behind(tmp_path):
    now = 1000.0
    for r in (0, 2, 3):
        _write(tmp_path, r, 3, "sync", now - 20)  # waiting in step 3's gradient collectives
    _write(tmp_path, 1, 3, "compute", now - 25)  # never got there
    w = HeartbeatWatch(tmp_path, 15, lambda: None)
    err = w.check(now)
    assert err is not None and err.rank == 1
    assert str(err) == ("rank 1 stalled: no progress for launch.timeout_s=15s: rank 1 stalled in step 3 (compute) "
                        "for 25s while the others are in step 3 (sync); stopping the group")
    assert w.check(now - 6) is None  # the newest beat is 14 s old: not yet


def test_no_rank_behind_and_long_phases(tmp_path):
    now = 1000.0
    for r in (0, 1):
        _write(tmp_path, r, 4, "done", now - 30)
    err = HeartbeatWatch(tmp_path, 15, lambda: None).check(now)
    assert err is not None and err.rank is None
    assert "every rank stopped after step 3 30s ago (none is behind" in str(err)
    _write(tmp_path, 1, 5, "save", now - 30)  # writing a checkpoint may take long: no stall declared
    assert HeartbeatWatch(tmp_path, 15, lambda: None).check(now) is None
    assert HeartbeatWatch(tmp_path / "none", 15, lambda: None).check(now) is None  # no beat yet: not watched


def test_a_single_rank_stalled_outside_collectives_is_named_and_stopped(tmp_path):
    """One rank, no collective to time out: only the watcher sees the stall; its stop() ends the process."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    heartbeat.beat(tmp_path, 0, 2, "compute")
    with HeartbeatWatch(tmp_path, 1, proc.kill, poll_s=0.1) as w:
        rc = proc.wait(timeout=30)
    assert rc != 0 and w.stalled is not None and w.stalled.rank == 0
    assert str(w.stalled).startswith("rank 0 stalled: no progress for launch.timeout_s=1s: rank 0 stalled in "
                                     "step 2 (compute) for ")
    assert heartbeat.steps_done(tmp_path) == {0: 2}
    t0 = time.time()
    heartbeat.beat(tmp_path, 0, 3)
    assert heartbeat.beats(tmp_path)[0].time >= int(t0)


def test_a_stopped_rank_is_named_even_when_all_ranks_are_at_the_same_point(tmp_path):
    """SIGSTOP (or a debugger) freezes a rank mid-step; the others wait for it in a collective at the same step and
    phase, so no rank is behind. A rank process on this host in state T is named instead of blaming the network."""
    import signal
    import socket

    now = 1000.0
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc.send_signal(signal.SIGSTOP)
        for _ in range(100):  # the stop is delivered asynchronously
            if heartbeat.stopped(heartbeat.Beat(0, "compute", now, proc.pid, socket.gethostname())):
                break
            time.sleep(0.02)
        d = tmp_path / heartbeat.DIR
        d.mkdir()
        (d / "rank0").write_text(f"7 {now - 30:.3f} compute 1 {socket.gethostname()}\n")  # pid 1: running
        (d / "rank1").write_text(f"7 {now - 30:.3f} compute {proc.pid} {socket.gethostname()}\n")
        err = HeartbeatWatch(tmp_path, 15, lambda: None).check(now)
        assert err is not None and err.rank == 1, err
        assert f"rank 1 (pid {proc.pid}) is stopped (SIGSTOP or a debugger: process state T) in step 7" in str(err)
        (d / "rank1").write_text(f"7 {now - 30:.3f} compute {proc.pid} another-host\n")  # not ours to inspect
        assert HeartbeatWatch(tmp_path, 15, lambda: None).check(now).rank is None
    finally:
        proc.kill()
        proc.wait()
