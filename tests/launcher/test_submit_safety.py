"""`submit` / `jobs`: clear-text warning for remote http://, https accepted, the token from env or file only."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
from sparsetrain.launcher import LaunchError
from sparsetrain.launcher.jobs import cleartext_warning, jobs_app, normalize_address, resolve_token
from typer.testing import CliRunner

pytestmark = pytest.mark.unit


def test_cleartext_warning_only_for_remote_http() -> None:
    assert "unencrypted" in (cleartext_warning("http://10.0.0.5:8265") or "")
    assert "unencrypted" in (cleartext_warning("head.example.com:8265") or "")  # bare host:port means http
    assert cleartext_warning("https://head.example.com:8443") is None
    assert cleartext_warning("http://127.0.0.1:8265") is None
    assert cleartext_warning("http://localhost:8265") is None


def test_https_address_is_kept() -> None:
    assert normalize_address("https://head:8443/") == "https://head:8443"


def test_token_file_option_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "tok"
    f.write_text("secret\n")
    assert resolve_token(None, {}, tmp_path, token_file=str(f)) == "secret"
    assert resolve_token(None, {"RAY_AUTH_TOKEN": "env"}, tmp_path, token_file=str(f)) == "env"
    with pytest.raises(LaunchError, match="--token-file .*no such file"):
        resolve_token(None, {}, tmp_path, token_file=str(tmp_path / "nope"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_token_on_command_line_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    res = CliRunner().invoke(jobs_app, ["status", "x", "--address", f"http://127.0.0.1:{_closed_port()}",
                                        "--token", "abc"])
    assert res.exit_code == 2
    assert res.output.startswith("error: --token puts the Ray token on the command line") and "abc" not in res.output
    assert "cannot reach" not in res.output  # refused before any connection


def _no_traffic(address: str, timeout_s: float = 5.0) -> None:  # tests send nothing beyond loopback
    raise LaunchError(f"not connecting to {address} in a test")


def test_remote_http_warns_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sparsetrain.launcher.jobs.check_reachable", _no_traffic)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/nonexistent/token")
    res = CliRunner().invoke(jobs_app, ["status", "x", "--address", "http://192.0.2.123:8265"])
    assert res.exit_code == 1 and "plain http" in res.output and "not connecting" in res.output  # no token: warned


def test_a_token_is_never_sent_over_remote_plain_http(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = []
    monkeypatch.setattr("sparsetrain.launcher.jobs.check_reachable", lambda a, timeout_s=5.0: sent.append(a))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "SUPERSECRET")
    for cmd in (["status", "x"], ["logs", "x"], ["stop", "x"]):
        res = CliRunner().invoke(jobs_app, [*cmd, "--address", "http://192.0.2.123:8265"])
        assert res.exit_code == 1 and res.output.startswith("error: refusing to send the Ray token to http://192.0"), \
            res.output
        assert "SUPERSECRET" not in res.output
    assert sent == []  # refused before any connection
    monkeypatch.setenv("SPARSETRAIN_ALLOW_PLAINTEXT_TOKEN", "1")  # the user's explicit choice: warned, then sent
    monkeypatch.setattr("sparsetrain.launcher.jobs.check_reachable", _no_traffic)
    res = CliRunner().invoke(jobs_app, ["status", "x", "--address", "http://192.0.2.123:8265"])
    assert "plain http" in res.output and "not connecting" in res.output


@pytest.mark.unit
def test_submit_waits_for_the_job_agent_then_gives_one_line(monkeypatch):
    """Ray answers 500 "No available agent to submit job, please try again later" while a fresh or busy head's
    job agent comes up (the job is not created): submit retries, then says so in one line."""
    from sparsetrain.launcher.jobs import submit_when_agent_ready

    monkeypatch.setattr("sparsetrain.launcher.jobs.time.sleep", lambda s: None)
    calls = []

    class Flaky:
        def __init__(self, fails: int) -> None:
            self.fails = fails

        def submit_job(self, **job):
            calls.append(job["submission_id"])
            if len(calls) <= self.fails:
                raise RuntimeError("Request failed with status code 500: No available agent to submit job, "
                                   "please try again later..")
            return job["submission_id"]

    assert submit_when_agent_ready(Flaky(2), submission_id="sparsetrain-x") == "sparsetrain-x"
    assert calls == ["sparsetrain-x"] * 3  # the same id each time: at most one job
    calls.clear()
    with pytest.raises(LaunchError, match="no job agent ready after 0 s"):
        submit_when_agent_ready(Flaky(99), wait_s=0, submission_id="sparsetrain-y")

    class Broken:
        def submit_job(self, **job):
            raise RuntimeError("Request failed with status code 400: bad runtime_env")

    with pytest.raises(RuntimeError, match="bad runtime_env"):  # other errors are not retried
        submit_when_agent_ready(Broken(), submission_id="z")
