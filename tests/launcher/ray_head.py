"""Test helper: a private `ray start --head` on 127.0.0.1 with its own ports and temp dir, stopped by pid."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sparsetrain.launcher.env import free_port

PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
              "--node-manager-port", "--object-manager-port")


class RayHead:
    """`ray start --head --block` in its own session; `stop()` ends only the processes it started."""

    def __init__(self, temp_dir: Path, num_cpus: int = 2) -> None:
        self.temp_dir = temp_dir
        self.token = secrets.token_hex(32)
        self.ports = {flag: free_port("127.0.0.1") for flag in PORT_FLAGS}
        self.last_status = ""
        self.dashboard = f"http://127.0.0.1:{self.ports['--dashboard-port']}"
        args = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--include-dashboard=true",
                "--temp-dir", str(temp_dir), "--num-cpus", str(num_cpus), "--disable-usage-stats",
                "--min-worker-port", "0", "--max-worker-port", "0"]
        for flag, port in self.ports.items():
            args += [flag, str(port)]
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # jobs run `python`
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, PATH=path)
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            env.pop(k, None)
        self.log = open(temp_dir.parent / "ray-head.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float = 150) -> None:
        """Block until the dashboard's Jobs API accepts connections."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self._log_text()}")
            try:
                import requests

                r = requests.get(self.dashboard + "/api/version", timeout=2,
                                 headers={"Authorization": f"Bearer {self.token}"})
                if r.ok:
                    return
                self.last_status = f"{r.status_code} {r.text[:200]}"
            except (OSError, requests.RequestException):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Ray head not ready after {timeout_s}s ({self.last_status}): {self._log_text()}")

    def _log_text(self) -> str:
        return (self.temp_dir.parent / "ray-head.log").read_text()[-3000:]

    def own_pids(self) -> list[int]:
        """Pids whose command line names this head's temp dir (ours alone)."""
        return pids_mentioning(str(self.temp_dir))

    def stop(self) -> None:
        """SIGTERM `ray start --block` (it stops its processes), then kill any leftover of ours."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        kill_pids(self.own_pids())
        self.log.close()


def port_open(port: int) -> bool:
    """True when something listens on 127.0.0.1:port."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def pids_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text` (reads /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def kill_pids(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM these pids, SIGKILL the ones still alive after `grace_s`."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
