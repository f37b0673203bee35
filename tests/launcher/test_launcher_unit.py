"""Pure pieces of the launcher: rank assignment, env, log prefixes, runtime env, tokens, dispatch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sparsetrain.launcher import LaunchError
from sparsetrain.launcher.env import (
    PROGRESS_ENV,
    LinePrefixer,
    PrefixedStream,
    RankSlot,
    assign_ranks,
    forwarded_env,
    patched_env,
    rank_env,
    visible_devices,
)
from sparsetrain.launcher.jobs import (
    auth_headers,
    build_runtime_env,
    job_config,
    job_entrypoint,
    normalize_address,
    resolve_token,
    stage_project,
)
from sparsetrain.launcher.ray_runtime import load_entry, local_num_cpus
from sparsetrain.launcher.run import run_inline, torchrun_command

pytestmark = pytest.mark.unit


def test_assign_ranks_contiguous_per_node_in_first_seen_order() -> None:
    slots = assign_ranks(["b", "a", "b", "a", "b"])
    assert [s.rank for s in slots] == [0, 3, 1, 4, 2]
    assert [s.local_rank for s in slots] == [0, 0, 1, 1, 2]
    assert [s.local_world_size for s in slots] == [3, 2, 3, 2, 3]


def test_assign_ranks_single_node() -> None:
    slots = assign_ranks(["n"] * 4)
    assert [(s.rank, s.local_rank, s.local_world_size) for s in slots] == [(i, i, 4) for i in range(4)]


def test_rank_env_has_everything_train_worker_needs() -> None:
    env = rank_env(RankSlot(2, 0, 2, "n1"), 4, "10.0.0.1", 29500, 3)
    assert env["RANK"] == "2" and env["WORLD_SIZE"] == "4"
    assert env["LOCAL_RANK"] == "0" and env["LOCAL_WORLD_SIZE"] == "2"
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
    assert env["OMP_NUM_THREADS"] == "3"
    assert env[PROGRESS_ENV] == "0"
    assert rank_env(RankSlot(0, 0, 2, "n0"), 4, "h", 1, 1)[PROGRESS_ENV] == "1"


def test_forwarded_env_only_sparsetrain_vars() -> None:
    env = {"SPARSETRAIN_FAIL_RANK": "1", "HOME": "/root", PROGRESS_ENV: "1"}
    assert forwarded_env(env) == {"SPARSETRAIN_FAIL_RANK": "1"}


def test_patched_env_restores_old_values_and_removes_new_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("SPARSETRAIN_RF_OLD", "before")
    monkeypatch.delenv("SPARSETRAIN_RF_NEW", raising=False)
    with pytest.raises(RuntimeError), patched_env({"SPARSETRAIN_RF_OLD": "during", "SPARSETRAIN_RF_NEW": "x"}):
        assert os.environ["SPARSETRAIN_RF_OLD"] == "during" and os.environ["SPARSETRAIN_RF_NEW"] == "x"
        raise RuntimeError("the block fails")
    assert os.environ["SPARSETRAIN_RF_OLD"] == "before" and "SPARSETRAIN_RF_NEW" not in os.environ


def test_visible_devices_orders_by_local_rank() -> None:
    assert visible_devices(["3"], [["1"], ["3"], ["0"]]) == "1,3,0"
    with pytest.raises(ValueError, match="not among"):
        visible_devices(["7"], [["1"]])


def test_local_num_cpus_fits_workers_on_small_machine() -> None:
    assert local_num_cpus(4, 1, 2) == 4
    assert local_num_cpus(2, 1, 16) == 16
    assert local_num_cpus(1, 1, None) == 1


def test_prefixer_splits_partial_lines() -> None:
    p = LinePrefixer(2)
    assert p.feed("hello wo") == ""
    assert p.feed("rld\nnext") == "(rank 2) hello world\n"
    assert p.flush() == "(rank 2) next\n"
    assert p.flush() == ""


def test_prefixer_keeps_progress_bar_frames_on_terminals() -> None:
    p = LinePrefixer(0, keep_cr=True)
    assert p.feed("\r 10%|#\r 20%|##") == "(rank 0)  10%|#\r"
    assert p.feed("\rdone\r\n") == "(rank 0)  20%|##\r(rank 0) done\n"


def test_prefixer_drops_progress_frames_for_files() -> None:
    p = LinePrefixer(1, keep_cr=False)
    assert p.feed("\r 10%|#\r 20%|##\rloss 1.0\n") == "(rank 1) loss 1.0\n"


def test_prefixer_crlf_split_across_chunks() -> None:
    p = LinePrefixer(0)
    assert p.feed("line\r") == ""
    assert p.feed("\nnext\n") == "(rank 0) line\n(rank 0) next\n"


def test_prefixed_stream_prefixes_print_and_keeps_partial_lines() -> None:
    import io

    base = io.StringIO()
    s = PrefixedStream(base, 3)
    print("step 1 | loss 2.0", file=s)
    s.write("tail without newline")
    assert base.getvalue() == "(rank 3) step 1 | loss 2.0\n"
    s.close_rest()
    assert base.getvalue().endswith("(rank 3) tail without newline\n")


def test_normalize_address() -> None:
    assert normalize_address("head:8265") == "http://head:8265"
    assert normalize_address("https://h:1/") == "https://h:1"
    assert normalize_address("") == "http://127.0.0.1:8265"
    with pytest.raises(LaunchError, match="dashboard"):
        normalize_address("ray://head:10001")
    for bad in ("http://[::1", "http://head:99999", "http://head:port", "http://:8265"):  # one line, no traceback
        with pytest.raises(LaunchError, match="job address"):
            normalize_address(bad)
    assert normalize_address("http://[::1]:8265") == "http://[::1]:8265"


def test_resolve_token_order(tmp_path: Path) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("filetoken\n")
    other = tmp_path / "tok"
    other.write_text("pathtoken")
    assert resolve_token("explicit", {"RAY_AUTH_TOKEN": "env"}, tmp_path) == "explicit"
    assert resolve_token(None, {"RAY_AUTH_TOKEN": "env ", "RAY_AUTH_TOKEN_PATH": str(other)}, tmp_path) == "env"
    assert resolve_token(None, {"RAY_AUTH_TOKEN_PATH": str(other)}, tmp_path) == "pathtoken"
    assert resolve_token(None, {}, tmp_path) == "filetoken"
    assert resolve_token(None, {}, tmp_path / "nohome") is None


def test_auth_headers() -> None:
    assert auth_headers("abc") == {"Authorization": "Bearer abc"}
    assert auth_headers(None) == {}


def test_runtime_env_and_entrypoint() -> None:
    env = build_runtime_env("/stage", {"X": "1"}, "sparsetrain.launcher.smoke:smoke_worker")
    assert env["working_dir"] == "/stage"
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "X": "1",
                               "SPARSETRAIN_ENTRY": "sparsetrain.launcher.smoke:smoke_worker"}
    assert "--config job.yaml" in job_entrypoint() and "launch.address=auto" in job_entrypoint()


def test_job_config_validates_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSETRAIN_STORAGE_ROOT", "/shared")  # the preset's relative out_dir goes under it
    cfg = job_config("tiny", ["train.steps=3"], workers=2)
    assert cfg["train"]["out_dir"] == "/shared/runs/tiny"
    assert cfg["launch"]["workers"] == 2 and cfg["launch"]["backend"] == "ray"
    assert cfg["launch"]["address"] == "auto" and cfg["train"]["steps"] == 3
    with pytest.raises(LaunchError, match="nonsense"):
        job_config("tiny", ["train.nonsense=1"], None)


def test_stage_project_is_importable_without_install(tmp_path: Path) -> None:
    cfg = job_config("tiny", ["train.steps=2", f"train.out_dir={tmp_path}/run"], 1)
    stage = stage_project(cfg, tmp_path / "stage")
    for rel in ("sparsetrain/cli.py", "sparsetrain/launcher/jobs.py", "sparsetrain/kernels/__init__.py",
                "configs/tiny.yaml", "job.yaml"):
        assert (stage / rel).is_file(), rel
    assert not list(stage.rglob("__pycache__"))
    code = ("import sparsetrain.launcher.env, sparsetrain.config as c; "
            "print(sparsetrain.launcher.env.__file__); print(c.load_config('job.yaml').train.steps)")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=stage, capture_output=True, text=True,
                         env={"PYTHONPATH": str(stage)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(stage / "sparsetrain/launcher/env.py"), "2"]


def test_load_entry() -> None:
    assert load_entry("os.path:join")("a", "b") == "a/b"
    with pytest.raises(ValueError, match="module:function"):
        load_entry("os.path.join")


def test_inline_sets_one_rank_world_and_restores_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SPARSETRAIN_STORAGE_ROOT", "/shared")
    cfg = job_config("tiny", [], 1)
    seen = run_inline(cfg, "tests.launcher.test_launcher_unit:_env_probe")
    assert seen["RANK"] == "0" and seen["WORLD_SIZE"] == "1" and seen["LOCAL_WORLD_SIZE"] == "1"
    assert seen["MASTER_ADDR"] == "127.0.0.1" and int(seen["MASTER_PORT"]) > 0
    import os

    assert "RANK" not in os.environ
    with pytest.raises(LaunchError, match="inline runs one process"):
        run_inline(job_config("tiny", [], 2), "tests.launcher.test_launcher_unit:_env_probe")


def _env_probe(cfg_dict: dict) -> dict:
    import os

    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


def test_torchrun_command() -> None:
    cmd = torchrun_command(4, "/c.yaml", "/s.json")
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in cmd and "sparsetrain.launcher.torchrun_entry" in cmd


def test_import_launcher_does_not_import_ray() -> None:
    code = ("import sys, sparsetrain.launcher, sparsetrain.launcher.jobs, sparsetrain.launcher.torchrun_entry; "
            "print('ray' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_root_cause_prefers_own_error_then_dead_then_peer_echo() -> None:
    from sparsetrain.launcher.env import Failure, is_peer_error, root_cause

    echo = Failure(0, "rank 0 failed", "RuntimeError: ... Connection reset by peer ...", time=1.0)
    own = Failure(1, "rank 1 failed", "RuntimeError: injected failure on rank 1", time=2.0)
    dead = Failure(2, "rank 2 died", "ActorDiedError", time=1.5, died=True)
    assert is_peer_error(echo.details) and not is_peer_error(own.details)
    assert root_cause([echo, own, dead]).rank == 1
    assert root_cause([echo, dead]).rank == 2
    assert root_cause([echo]).rank == 0


def test_a_peer_echo_prints_one_line_and_keeps_the_traceback_for_the_driver() -> None:
    from sparsetrain.launcher.ray_runtime import console_report

    echo = ("Traceback (most recent call last):\n  File \"trainer.py\", line 1, in step\n"
            "torch.distributed.DistBackendError: [gloo/transport/tcp/pair.cc:534] Connection closed by peer "
            "[127.0.0.1]:4242\n")
    own = "Traceback (most recent call last):\n  File \"x.py\", line 3, in f\nValueError: injected on rank 1\n"
    line = console_report(echo)
    assert "\n" not in line and "Traceback" not in line
    assert "lost a peer" in line and "Connection closed by peer [127.0.0.1]:4242" in line
    assert console_report(own) == own.rstrip("\n")  # the cause keeps its whole traceback


def test_unreachable_address_is_a_clear_error() -> None:
    from sparsetrain.launcher.env import free_port
    from sparsetrain.launcher.jobs import client

    port = free_port("127.0.0.1")
    with pytest.raises(LaunchError, match=f"cannot reach the Ray dashboard at http://127.0.0.1:{port}"):
        client(f"127.0.0.1:{port}")


def test_split_host_port() -> None:
    from sparsetrain.launcher.env import split_host_port

    assert split_host_port("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert split_host_port("auto") is None and split_host_port("ray://h:10001") is None


def test_unreachable_ray_address_fails_fast() -> None:
    from sparsetrain.launcher import run_job
    from sparsetrain.launcher.env import free_port

    from sparsetrain.config import load_config

    port = free_port("127.0.0.1")
    with pytest.raises(LaunchError, match=f"cannot reach the Ray cluster at launch.address='127.0.0.1:{port}'"):
        run_job(load_config("tiny", ["launch.workers=2", f"launch.address=127.0.0.1:{port}"]))


def test_local_ray_temp_dir_is_private(tmp_path: Path) -> None:
    """The local runtime's temp dir (its sockets, session files) is created 0700, an open one is closed, and a
    symlink in its place is refused."""
    import os
    import stat

    from sparsetrain.launcher.local_ray import private_dir

    d = tmp_path / "st-ray"
    private_dir(str(d))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    d.chmod(0o777)
    private_dir(str(d))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    link = tmp_path / "link"
    os.symlink(d, link)
    with pytest.raises(LaunchError, match="symlink or belongs to another user"):
        private_dir(str(link))
