"""A local Ray run listens on loopback only, on no fixed port, and a SIGKILLed launcher leaves nothing listening."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sparsetrain.launcher.procs import Listener, _hex_addr, alive, descendants, listening_sockets
from sparsetrain.launcher.reaper import reap, start_time

from tests.launcher.ray_head import kill_pids

SMOKE = "sparsetrain.launcher.smoke:smoke_worker"
RAY_FIXED_PORTS = {52365, 44217, 44227, 8265, 6379, 10001}  # Ray's defaults: agent, metrics x2, dashboard, GCS, client


def test_hex_addr_decodes_proc_net_tcp() -> None:
    assert _hex_addr("0100007F:1F90") == ("127.0.0.1", 8080)
    assert _hex_addr("00000000:0050") == ("0.0.0.0", 80)
    assert _hex_addr("00000000000000000000000001000000:0016") == ("::1", 22)
    assert _hex_addr("0000000000000000FFFF00000100007F:0016") == ("::ffff:7f00:1", 22)  # ::ffff:127.0.0.1


def test_listener_loopback_classification() -> None:
    assert Listener("127.0.0.1", 1, ()).loopback and Listener("127.8.0.1", 1, ()).loopback
    assert Listener("::1", 1, ()).loopback and Listener("::ffff:127.0.0.1", 1, ()).loopback
    assert not Listener("0.0.0.0", 1, ()).loopback and not Listener("::", 1, ()).loopback
    assert not Listener("192.0.2.2", 1, ()).loopback


def test_reaper_kills_only_what_it_recorded() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        t = start_time(child.pid)
        assert t is not None
        assert reap({child.pid: t + 1}, grace_s=0.5) == []  # another start time: a reused pid, never touched
        assert child.poll() is None
        assert reap({child.pid: t}, grace_s=2) == [child.pid]
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        child.kill()


def _run_owned(tmp: str) -> subprocess.Popen:
    code = ("from sparsetrain.config import load_config; from sparsetrain.launcher import run_job; "
            f"run_job(load_config('tiny', ['launch.workers=2', 'train.steps=100000']), entry={SMOKE!r})")
    env = dict(os.environ, SPARSETRAIN_SMOKE_SLEEP="0.1", PYTHONUNBUFFERED="1", SPARSETRAIN_RAY_TMPDIR=tmp)
    for k in ("RAY_ADDRESS", "SPARSETRAIN_FAIL_RANK"):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen, prefix: str) -> list[str]:
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return seen
    pytest.fail("launcher ended before its workers ran:\n" + "".join(seen[-40:]))


def _gcs_answers(port: int, **auth: str) -> str:
    """Ask the local runtime's GCS for its nodes from a fresh process with only `auth` as Ray auth settings:
    'ok', or the error's last line."""
    code = ("from ray._raylet import GcsClient; "
            f"print('NODES', len(GcsClient(address='127.0.0.1:{port}').get_all_node_info(timeout=20)))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | auth
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    return "ok" if r.returncode == 0 and "NODES 1" in r.stdout else (r.stderr.strip().splitlines() or ["?"])[-1]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_run_listens_on_loopback_only_and_sigkill_leaves_nothing() -> None:
    tmp = f"/tmp/st-pr-{uuid.uuid4().hex[:8]}"
    proc = _run_owned(tmp)
    tree: dict[int, int | None] = {}
    try:
        _wait_for(proc, "(rank 1) step 3")
        tree = _snapshot(descendants(proc.pid) | {proc.pid})
        ours = _listeners_of(tree)
        assert len(ours) >= 5, f"expected the runtime's listeners (GCS, raylet, workers, store): {ours}"
        exposed = [s for s in ours if not s[0].loopback]
        assert not exposed, f"listening beyond loopback: {exposed}"
        fixed = [s for s in ours if s[0].port in RAY_FIXED_PORTS]
        assert not fixed, f"fixed ports that collide between two runtimes on one host: {fixed}"
        # loopback ports are open to every local user: the runtime requires its token (0600, in the 0700 dir)
        (token,) = Path(tmp).glob("auth_token.*")
        assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64
        (port_file,) = (Path(tmp) / "r" / "session_latest").glob("gcs_server_port_*")
        port = int(port_file.read_text().strip())
        assert "InvalidAuthToken" in _gcs_answers(port)
        assert "InvalidAuthToken" in _gcs_answers(port, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
        assert _gcs_answers(port, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token)) == "ok"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = _listeners_of(tree)
            running = [p for p in alive(tree) if p != proc.pid]
            if not left and not running:
                break
            time.sleep(0.5)
        assert not left, f"still listening after the launcher was SIGKILLed: {left}"
        assert not running, f"processes of the run left after SIGKILL: {running}"
        assert not list(Path(tmp).glob("auth_token.*")), "the runtime's token file outlived it"
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_pids([p for p in alive(tree) if p != proc.pid])
        subprocess.run(["rm", "-rf", tmp], check=False)


def _snapshot(pids: set[int]) -> dict[int, int | None]:
    """{pid: kernel start time}: a pid is the run's only while its start time matches (pids are reused; this host's
    pid_max is 32768 and a busy test run starts thousands of processes)."""
    return {p: start_time(p) for p in pids}


def _listeners_of(tree: dict[int, int | None]) -> list[tuple[Listener, list[str]]]:
    """The listening sockets held by a live process of `tree`, each with its holders' command lines."""
    live = set(alive(tree))
    return [(s, [_cmdline(p) for p in s.pids]) for s in listening_sockets() if set(s.pids) & live]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()[:160]
    except OSError:
        return "?"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("target", ["launcher", "worker"])
def test_sigterm_to_ray_launcher_checkpoints_and_exits_zero(tmp_path, target: str) -> None:
    """Preemption of a 2-rank Ray run: SIGTERM to the launcher, or to rank 1's worker process (a preempted node's
    processes; its Ray actor runs the training off the main thread) -> ranks agree, checkpoint, exit 0."""
    tmp = f"/tmp/st-pr-{uuid.uuid4().hex[:8]}"
    out_dir = tmp_path / "run"
    args = [sys.executable, "-m", "sparsetrain.cli", "train", "--config", "tiny"]
    for kv in ("launch.workers=2", "parallel.strategy=dp", "train.steps=100000", "train.log_every=1",
               "train.eval_every=0", "train.progress=false", f"train.out_dir={out_dir}"):
        args += ["--set", kv]
    env = dict(os.environ, PYTHONUNBUFFERED="1", SPARSETRAIN_RAY_TMPDIR=tmp)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree: dict[int, int | None] = {}
    try:
        seen = _wait_for(proc, "(rank 0) step     2")
        tree = _snapshot(descendants(proc.pid))
        if target == "launcher":
            proc.send_signal(signal.SIGTERM)
        else:  # .heartbeat/rank1: "step time phase pid host"
            os.kill(int((out_dir / ".heartbeat" / "rank1").read_text().split()[3]), signal.SIGTERM)
        rest, _ = proc.communicate(timeout=240)
        text = "".join(seen) + rest
        assert proc.returncode == 0, text[-3000:]
        assert ("SIGTERM: asking 2 worker(s) to checkpoint and stop" if target == "launcher" else
                "(rank 1) SIGTERM: checkpointing at the end of this step and stopping") in text
        assert "(rank 0) stop requested (SIGTERM)" in text and "Traceback" not in text
        assert list((out_dir / "checkpoints").glob("step_*")), "no checkpoint written on SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_pids(alive(tree))
        subprocess.run(["rm", "-rf", tmp], check=False)
