"""Cluster jobs through the Ray Jobs API: `sparsetrain submit` and `sparsetrain jobs status|logs|stop`.

The project is shipped as the job's working_dir, staged first: kernels/ and
launcher/ are installed as sparsetrain.kernels / sparsetrain.launcher
(setuptools package-dir), so a raw copy of the repo root would not import on the
cluster. The stage holds sparsetrain/ with both mapped in, configs/, and the fully
resolved config as job.yaml (validated here, before anything is uploaded).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import typer
import yaml
from sparsetrain.launcher.env import ENTRY_ENV, tcp_error
from sparsetrain.launcher.errors import LaunchError, require_ray

from sparsetrain.rendezvous import is_loopback

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # same lookup order as `ray job`
PLAINTEXT_ENV = "SPARSETRAIN_ALLOW_PLAINTEXT_TOKEN"  # =1: send the token over remote plain http anyway
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", ".mypy_cache", "runs")


def normalize_address(address: str) -> str:
    """Dashboard address as an http(s) URL: 'head:8265' -> 'http://head:8265'."""
    address = (address or "").strip().rstrip("/")
    if not address:
        return DEFAULT_ADDRESS
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise LaunchError(f"job address must be the Ray dashboard's http(s)://host:port (e.g. {DEFAULT_ADDRESS}), "
                          f"got {address!r}")
    try:
        url = urlparse(address)
        url.port  # noqa: B018 - parses the port: raises ValueError when it is not a number in range
    except ValueError as e:
        raise LaunchError(f"job address {address!r} is not a valid URL ({e}); expected http(s)://host:port") from None
    if not url.hostname:
        raise LaunchError(f"job address {address!r} names no host; expected http(s)://host:port")
    return address


def default_address() -> str:
    """Address from RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else the local dashboard."""
    for k in ADDRESS_ENV:
        if os.environ.get(k):
            return os.environ[k]
    return DEFAULT_ADDRESS


def cleartext_warning(address: str) -> str | None:
    """A warning when requests (and the token) to `address` would cross the network unencrypted."""
    url = urlparse(normalize_address(address))
    if url.scheme != "http" or is_loopback(url.hostname or ""):
        return None
    return (f"warning: {address} is plain http: the Ray token and the job travel unencrypted; use https:// "
            f"(a TLS proxy in front of the dashboard) or an SSH tunnel to 127.0.0.1")


def resolve_token(explicit: str | None = None, environ: dict[str, str] | None = None,
                  home: Path | None = None, token_file: str | None = None) -> str | None:
    """Ray auth token: explicit > RAY_AUTH_TOKEN > token_file > RAY_AUTH_TOKEN_PATH > ~/.ray/auth_token."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit.strip()
    if env.get("RAY_AUTH_TOKEN"):
        return env["RAY_AUTH_TOKEN"].strip()
    path = Path(token_file or env.get("RAY_AUTH_TOKEN_PATH") or (home or Path.home()) / ".ray" / "auth_token")
    if token_file and not path.is_file():
        raise LaunchError(f"--token-file {token_file}: no such file")
    if path.is_file():
        text = path.read_text().strip()
        return text or None
    return None


def auth_headers(token: str | None) -> dict[str, str]:
    """HTTP headers for the Jobs API; a cluster with auth off ignores them."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with the address in the message, when nothing listens there."""
    url = urlparse(address)
    port = url.port or (443 if url.scheme == "https" else 80)
    if why := tcp_error(url.hostname or "", port, timeout_s):
        raise LaunchError(f"cannot reach the Ray dashboard at {address} ({why}); is the head running "
                          "(`ray start --head`) and its dashboard reachable from here (an SSH tunnel to the head's "
                          "127.0.0.1:8265, or a TLS proxy: docs/launching.md)?")


def client(address: str | None = None, token: str | None = None, token_file: str | None = None) -> Any:
    """A JobSubmissionClient for `address` carrying the auth token (if one is found)."""
    require_ray()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    addr = normalize_address(address or default_address())
    secret = resolve_token(token, token_file=token_file)
    if warning := cleartext_warning(addr):
        if secret and os.environ.get(PLAINTEXT_ENV) != "1":  # refused before a byte is sent
            raise LaunchError(f"refusing to send the Ray token to {addr} over plain http (anyone on the path can "
                              "read it): use https:// (a TLS proxy in front of the dashboard) or an SSH tunnel to "
                              f"127.0.0.1; {PLAINTEXT_ENV}=1 sends it anyway")
        print(warning, file=sys.stderr, flush=True)
    check_reachable(addr)
    try:
        return JobSubmissionClient(addr, headers=auth_headers(secret))
    except AuthenticationError as e:
        raise LaunchError(f"the Ray cluster at {addr} rejected the request: {e}\nPut the head's token "
                          "(`ray get-auth-token` on the head) in RAY_AUTH_TOKEN or ~/.ray/auth_token.") from None
    except ConnectionError as e:
        raise LaunchError(f"cannot talk to the Ray Jobs API at {addr}: {e}") from None
    except RuntimeError as e:  # something answers there, but not a Ray dashboard (e.g. 'Version check returned 404')
        raise LaunchError(f"{addr} answered, but not as a Ray Jobs API (is it the head's dashboard port, "
                          f"8265 by default?): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _package_dir(name: str) -> Path:
    """Source directory of an importable package, without importing it (beyond its parents)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError(f"cannot locate package {name} to ship with the job")
    return Path(next(iter(spec.submodule_search_locations)))


def stage_project(cfg_dict: dict, dest: Path) -> Path:
    """Copy the importable project into `dest` (sparsetrain/ with kernels+launcher, configs/, job.yaml)."""
    from sparsetrain.config import CONFIG_DIR

    pkg = dest / "sparsetrain"
    shutil.copytree(_package_dir("sparsetrain"), pkg, ignore=_IGNORE)
    for sub in ("kernels", "launcher"):
        if not (pkg / sub).exists():
            shutil.copytree(_package_dir(f"sparsetrain.{sub}"), pkg / sub, ignore=_IGNORE)
    if CONFIG_DIR.is_dir():
        shutil.copytree(CONFIG_DIR, dest / "configs", ignore=_IGNORE)
    (dest / "job.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    return dest


def job_entrypoint() -> str:
    """The command the job driver runs on the head (cwd = the staged working_dir)."""
    return "python -m sparsetrain.cli train --config job.yaml --set launch.address=auto"


def build_runtime_env(working_dir: str, env_vars: dict[str, str] | None = None, entry: str | None = None) -> dict:
    """runtime_env of the job: the staged project, unbuffered output, extra env vars, optional worker entry."""
    env = {"PYTHONUNBUFFERED": "1", **(env_vars or {})}
    if entry:  # another worker function, e.g. sparsetrain.launcher.smoke:smoke_worker
        env[ENTRY_ENV] = entry
    return {"working_dir": working_dir, "env_vars": env}


def job_config(config: str, overrides: list[str] | None, workers: int | None) -> dict:
    """Resolve and validate the config locally; the job always runs the Ray backend."""
    from sparsetrain.config import ConfigError, load_config, to_dict

    extra = list(overrides or []) + ([f"launch.workers={workers}"] if workers else [])
    extra += ["launch.backend=ray", "launch.address=auto"]
    from sparsetrain.train.storage import resolve_job_storage

    try:
        cfg = load_config(config, extra)
        for change in resolve_job_storage(cfg):  # relative out_dir: under SPARSETRAIN_STORAGE_ROOT, or refused
            print(f"storage: {change}", file=sys.stderr, flush=True)
        return to_dict(cfg)
    except ConfigError as e:
        raise LaunchError(f"invalid config: {e}") from None


def wait_for_job(jc: Any, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0,
                 echo: bool = True) -> str:
    """Poll until the job ends, echoing new log text; returns the final status name."""
    shown, start = 0, time.monotonic()
    while True:
        status = str(jc.get_job_status(job_id).value)
        if echo:
            logs = jc.get_job_logs(job_id)
            if len(logs) > shown:
                print(logs[shown:], end="", flush=True)
                shown = len(logs)
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise LaunchError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


AGENT_WAIT_S = 90.0  # a head that just started (or is busy) answers "No available agent" until its job agent is up
NO_AGENT = "No available agent to submit job"


def submit_when_agent_ready(jc: Any, wait_s: float = AGENT_WAIT_S, poll_s: float = 2.0, **job: Any) -> str:
    """`submit_job`, retried while Ray answers that no job agent is available yet ("please try again later": the
    job was not created), for up to `wait_s`; then one line."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return jc.submit_job(**job)
        except RuntimeError as e:
            if NO_AGENT not in str(e):
                raise
            if time.monotonic() >= deadline:
                raise LaunchError(f"the cluster has no job agent ready after {wait_s:.0f} s (Ray: {NO_AGENT}); "
                                  "check the head node, then submit again") from None
            print(f"waiting for the cluster's job agent ({NO_AGENT.lower()})", file=sys.stderr, flush=True)
            time.sleep(poll_s)


def submit(address: str, config: str, overrides: list[str] | None = None, workers: int | None = None,
           wait: bool = False, token: str | None = None, env_vars: dict[str, str] | None = None,
           entry: str | None = None, timeout_s: float | None = None, token_file: str | None = None) -> str:
    """Submit a training job to a Ray cluster; returns the job id (wait: also stream logs until it ends)."""
    cfg_dict = job_config(config, overrides, workers)
    jc = client(address, token, token_file)
    with tempfile.TemporaryDirectory(prefix="st-submit-") as tmp:
        stage = stage_project(cfg_dict, Path(tmp))
        job_id = submit_when_agent_ready(
            jc, entrypoint=job_entrypoint(), submission_id=f"sparsetrain-{uuid.uuid4().hex[:10]}",
            runtime_env=build_runtime_env(str(stage), env_vars, entry),
            metadata={"sparsetrain_config": str(config), "workers": str(cfg_dict["launch"]["workers"])})
    print(f"submitted job {job_id} to {normalize_address(address)}", file=sys.stderr, flush=True)
    if wait:
        try:
            status = wait_for_job(jc, job_id, timeout_s)
        except KeyboardInterrupt:
            print(f"\nstopped waiting; the job keeps running (sparsetrain jobs stop {job_id})", file=sys.stderr)
            raise
        if status != "SUCCEEDED":
            info = jc.get_job_info(job_id)
            raise LaunchError(f"job {job_id} ended {status}: {info.message or ''}".rstrip(": "))
    return job_id


jobs_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Status, logs or stop of a submitted Ray job.")
AddressOpt = typer.Option(None, "--address", "-a", help=f"Ray dashboard address (env RAY_API_SERVER_ADDRESS / "
                          f"RAY_ADDRESS, default {DEFAULT_ADDRESS})")
TokenOpt = typer.Option(None, "--token", hidden=True, help="refused: visible in `ps`; use RAY_AUTH_TOKEN or --token-file")
TokenFileOpt = typer.Option(None, "--token-file", help="file holding the Ray auth token (default: RAY_AUTH_TOKEN, "
                            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
ConfigOpt = typer.Option("tiny", "--config", "-c", help="YAML preset path or name under configs/")
SetOpt = typer.Option(None, "--set", "-s", help="override a.b=value (repeatable)")
WorkersOpt = typer.Option(None, "--workers", "-n", help="launch.workers for the job")
WaitOpt = typer.Option(False, "--wait", "-w", help="stream the job's logs until it ends; non-zero exit if it fails")
FollowOpt = typer.Option(False, "--follow", "-f", help="keep printing until the job ends")


def _refuse_token_option(token: str | None) -> None:
    """--token is refused (exit 2): a token on a command line is readable by every user with `ps`."""
    if token:
        typer.echo("error: --token puts the Ray token on the command line (any user can read it with `ps`); put "
                   "it in RAY_AUTH_TOKEN or a file (--token-file, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)", err=True)
        raise typer.Exit(2)


def _cli(fn: Any) -> Any:
    """Run fn; turn LaunchError (and Jobs API RuntimeErrors, e.g. unknown id) into 'error: ...', exit 1."""
    try:
        return fn()
    except RuntimeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@jobs_app.command("status")
def status_command(job_id: str, address: str | None = AddressOpt, token: str | None = TokenOpt,
                   token_file: str | None = TokenFileOpt) -> None:
    """Print a job's status and message."""
    _refuse_token_option(token)
    info = _cli(lambda: client(address, token, token_file).get_job_info(job_id))
    typer.echo(f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))


@jobs_app.command("logs")
def logs_command(job_id: str, address: str | None = AddressOpt, token: str | None = TokenOpt,
                 follow: bool = FollowOpt, token_file: str | None = TokenFileOpt) -> None:
    """Print a job's driver output (all ranks, prefixed)."""
    _refuse_token_option(token)
    jc = _cli(lambda: client(address, token, token_file))
    if follow:
        status = wait_for_job(jc, job_id)
        raise typer.Exit(0 if status == "SUCCEEDED" else 1)
    typer.echo(jc.get_job_logs(job_id), nl=False)


@jobs_app.command("stop")
def stop_command(job_id: str, address: str | None = AddressOpt, token: str | None = TokenOpt,
                 token_file: str | None = TokenFileOpt) -> None:
    """Ask Ray to stop a job (Ray sends its driver SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S)."""
    _refuse_token_option(token)
    stopped = _cli(lambda: client(address, token, token_file).stop_job(job_id))
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


def submit_command(config: str = ConfigOpt, overrides: list[str] | None = SetOpt,
                   address: str | None = AddressOpt, workers: int | None = WorkersOpt,
                   wait: bool = WaitOpt, token: str | None = TokenOpt, token_file: str | None = TokenFileOpt) -> None:
    """Submit a training job to a Ray cluster (Ray Jobs API); prints the job id."""
    _refuse_token_option(token)
    job_id = _cli(lambda: submit(address or default_address(), config, overrides, workers, wait, token,
                                 token_file=token_file))
    typer.echo(job_id)
