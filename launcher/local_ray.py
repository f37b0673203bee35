"""A private single-machine Ray runtime: every port on 127.0.0.1, none fixed, nothing left after its owner.

Measured on Ray 2.60 (`ss -ltnp` during a run): `ray.init(_node_ip_address="127.0.0.1")`
does not give a loopback node, because `ray.init` "resolves" 127.0.0.1 to the
machine's routable address; the GCS, raylet, object manager and worker gRPC servers
then listen on all interfaces, the dashboard and runtime-env agents on the node
address, and the agent's HTTP port is fixed at 52365 (two runtimes on one host
collide). The metrics servers of the autoscaler monitor and the dashboard head use
fixed ports 44217 / 44227 on 0.0.0.0. So a local runtime here is started with
the node address really set to 127.0.0.1 (Ray's C++ servers then bind loopback
only), the agent's HTTP port and both metrics ports chosen by the kernel, and a
reaper (sparsetrain.launcher.reaper) that ends every process of the runtime when
the launcher dies, even by SIGKILL. Loopback ports are still reachable by every user of the host, so the
runtime also runs Ray's token authentication (`RAY_AUTH_MODE=token`) with a fresh random token per runtime in
a 0600 file inside the 0700 temp dir: another local user's client is refused (measured: `InvalidAuthToken`
from the GCS for no token and for a wrong one).
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sparsetrain.launcher.env import patched_env
from sparsetrain.launcher.errors import LaunchError
from sparsetrain.launcher.reaper import start_reaper, stop_reaper

LOOPBACK = "127.0.0.1"
# Environment of a local runtime's processes (inherited from the driver): token auth (the token file is added
# per runtime: `runtime_env`); the two metrics servers Ray starts on fixed ports get kernel-chosen ones.
LOCAL_ENV = {"RAY_AUTH_MODE": "token", "AUTOSCALER_METRIC_PORT": "0", "DASHBOARD_METRIC_PORT": "0"}
# RayParams fields ray.init(address="local") does not expose: the node address as given (not resolved
# to the routable one) and a kernel-chosen dashboard-agent HTTP port instead of the fixed 52365.
LOCAL_PARAMS = {"node_ip_address": LOOPBACK, "dashboard_agent_listen_port": 0}


@contextlib.contextmanager
def _loopback_params() -> Iterator[None]:
    """While ray.init builds its RayParams, force LOCAL_PARAMS into them."""
    from ray._private import parameter

    orig = parameter.RayParams.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        orig(self, *args, **(kwargs | LOCAL_PARAMS))

    parameter.RayParams.__init__ = init
    try:
        yield
    finally:
        parameter.RayParams.__init__ = orig


def new_token_file(directory: str) -> str:
    """A fresh random token (256 bits) in a new file of `directory`, mode 0600 from creation; its path."""
    path = os.path.join(directory, f"auth_token.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
    finally:
        os.close(fd)
    return path


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def runtime_env(token_path: str) -> dict[str, str]:
    """LOCAL_ENV with the runtime's token file (a RAY_AUTH_TOKEN already set wins, as in Ray: then that one)."""
    return LOCAL_ENV | {"RAY_AUTH_TOKEN_PATH": token_path}


def reload_auth_settings() -> None:
    """Ray reads RAY_AUTH_MODE and the token once per process: make this process see the current environment
    (after the runtime's is set, and again after it is restored, for a later ray.init elsewhere)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token auth: the variables mean nothing to it
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@dataclass
class LocalRay:
    """A started local runtime: shut it down with `stop()`."""

    reaper: subprocess.Popen | None
    env: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def stop(self) -> None:
        """ray.shutdown(), then the reaper ends whatever is left; restores the environment."""
        import ray

        try:
            ray.shutdown()
        finally:
            stop_reaper(self.reaper)
            self.env.close()


START_ATTEMPTS = 3  # Ray gives its raylet a fixed 30 s to register; a busy machine can miss that


def private_dir(path: str) -> str:
    """Create `path` (mode 0700) or check an existing one: ours, not a symlink, closed to other users (it holds the
    runtime's sockets and session files; loopback ports are reachable by every local user, the sockets then not)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if os.path.islink(path) or st.st_uid != os.getuid():
        raise LaunchError(f"Ray temp dir {path} is a symlink or belongs to another user (uid {st.st_uid}); remove it "
                          "or set SPARSETRAIN_RAY_TMPDIR to a directory of your own")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def start_local_ray(num_cpus: int, temp_dir: str) -> LocalRay:
    """ray.init a private runtime on 127.0.0.1 (its temp dir private to this user) with a reaper watching this
    process."""
    import sys

    import ray

    ray_dir = os.path.join(private_dir(temp_dir), "r")  # Ray makes its own dirs world-writable (0777): under ours

    for attempt in range(1, START_ATTEMPTS + 1):
        token = new_token_file(os.path.dirname(ray_dir))
        handle = LocalRay(reaper=start_reaper(remove=(token,)))  # deletes it too, even after a SIGKILL of ours
        handle.env.callback(_remove, token)  # unwound last: after the environment is restored and reloaded
        handle.env.callback(reload_auth_settings)
        handle.env.enter_context(patched_env(runtime_env(token)))
        reload_auth_settings()
        try:
            with _loopback_params():
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, _temp_dir=ray_dir)
            return handle
        except Exception as e:
            handle.stop()
            if "timed out during startup" not in str(e):
                raise
            if attempt == START_ATTEMPTS:
                load = os.getloadavg()[0]
                raise LaunchError(f"could not start a local Ray runtime: its raylet missed Ray's 30 s registration "
                                  f"window {START_ATTEMPTS} times (load average {load:.0f} on {os.cpu_count()} CPUs); "
                                  f"retry when the machine is less busy, or use launch.backend=torchrun") from None
            print(f"Ray's node did not register within its 30 s (machine busy?); retrying ({attempt}/"
                  f"{START_ATTEMPTS - 1})", file=sys.stderr, flush=True)
        except BaseException:
            handle.stop()
            raise
    raise AssertionError("unreachable")
