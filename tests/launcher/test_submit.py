"""Cluster path end to end: a private `ray start --head` (token auth on), submit, wait, logs, jobs CLI."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sparsetrain.launcher import LaunchError
from sparsetrain.launcher.jobs import client, jobs_app, submit
from typer.testing import CliRunner

from tests.launcher.ray_head import RayHead

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

TINY = ["train.steps=3", "train.log_every=1", "train.eval_every=0", "checkpoint.save_final=false",
        "parallel.strategy=dp", "parallel.pretend_nodes=0"]


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    """One head for the module, on 127.0.0.1 with its own ports, temp dir and token; stopped by pid."""
    root = Path(tempfile.mkdtemp(prefix="st-h-", dir="/tmp"))
    (root / "r").mkdir()
    h = RayHead(root / "r")
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()
        left = h.own_pids()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"head processes left: {left}"


def test_submit_tiny_and_read_logs(head: RayHead, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)  # the client finds the token the way a user's shell would
    job_id = submit(head.dashboard, "tiny", [*TINY, f"train.out_dir={tmp_path}/run"], workers=1, wait=True,
                    timeout_s=200)
    assert job_id.startswith("sparsetrain-")
    runner = CliRunner()
    status = runner.invoke(jobs_app, ["status", job_id, "--address", head.dashboard])
    assert status.exit_code == 0 and "SUCCEEDED" in status.output
    logs = runner.invoke(jobs_app, ["logs", job_id, "--address", head.dashboard])
    assert logs.exit_code == 0
    assert any(ln.startswith("(rank 0) ") and "loss" in ln for ln in logs.output.splitlines()), logs.output
    stop = runner.invoke(jobs_app, ["stop", job_id, "--address", head.dashboard])
    assert stop.exit_code == 0 and "already finished" in stop.output


def test_wrong_token_is_rejected_clearly(head: RayHead) -> None:
    with pytest.raises(LaunchError, match="rejected the request"):
        client(head.dashboard, token="0" * 64).list_jobs()


def test_unknown_job_id_exits_nonzero(head: RayHead, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    res = CliRunner().invoke(jobs_app, ["status", "no-such-job", "--address", head.dashboard])
    assert res.exit_code == 1 and "error:" in res.output
