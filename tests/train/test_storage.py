"""Durable outputs for cluster jobs: a relative out_dir inside a Ray job is resolved against
SPARSETRAIN_STORAGE_ROOT or refused with one line, before anything starts."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sparsetrain.launcher.errors import LaunchError
from sparsetrain.launcher.jobs import job_config

from sparsetrain.config import ConfigError, load_config
from sparsetrain.train.storage import RAY_JOB_ENV, STORAGE_ROOT_ENV, in_ray_job, resolve_job_storage


def test_relative_paths_join_the_storage_root_and_absolute_ones_stay():
    cfg = load_config("tiny", ["train.out_dir=runs/a", "checkpoint.dir=/abs/ckpt"])
    changes = resolve_job_storage(cfg, {STORAGE_ROOT_ENV: "/mnt/shared"})
    assert cfg.train.out_dir == "/mnt/shared/runs/a" and cfg.checkpoint.dir == "/abs/ckpt"
    assert changes == ["train.out_dir: runs/a -> /mnt/shared/runs/a"]
    cfg = load_config("tiny", ["train.out_dir=/data/run"])
    assert resolve_job_storage(cfg, {}) == [] and cfg.train.out_dir == "/data/run"


def test_relative_path_without_root_is_refused_naming_the_key():
    cfg = load_config("tiny", ["train.out_dir=/data/run", "checkpoint.dir=ckpts"])
    with pytest.raises(ConfigError, match=r"checkpoint.dir='ckpts' is relative.*SPARSETRAIN_STORAGE_ROOT"):
        resolve_job_storage(cfg, {})
    with pytest.raises(ConfigError, match="must be an absolute path"):
        resolve_job_storage(load_config("tiny", []), {STORAGE_ROOT_ENV: "shared"})


def test_relative_corpus_is_refused_for_a_job():
    """The job's working directory holds code and configs only: `gpt-moe-s`'s data/openwebtext is not there."""
    cfg = load_config("gpt-moe-s", ["train.out_dir=/fsx/run"])
    with pytest.raises(ConfigError, match=r"data.corpus='data/openwebtext' is relative.*data.corpus=/shared/data/"):
        resolve_job_storage(cfg, {STORAGE_ROOT_ENV: "/fsx"})
    for corpus in ("/shared/data/openwebtext", "stdlib", "s3://bucket/owt"):
        resolve_job_storage(load_config("gpt-moe-s", ["train.out_dir=/fsx/run", f"data.corpus={corpus}"]), {})


def test_submit_resolves_or_refuses_before_uploading(monkeypatch):
    monkeypatch.delenv(STORAGE_ROOT_ENV, raising=False)
    with pytest.raises(LaunchError, match="train.out_dir='runs/tiny' is relative"):
        job_config("tiny", [], None)
    monkeypatch.setenv(STORAGE_ROOT_ENV, "/fsx")
    assert job_config("tiny", [], None)["train"]["out_dir"] == "/fsx/runs/tiny"


def test_train_inside_a_ray_job_refuses_a_relative_out_dir_in_one_line(tmp_path):
    assert in_ray_job({RAY_JOB_ENV: "{}"}) and not in_ray_job({})
    env = {k: v for k, v in os.environ.items() if k != STORAGE_ROOT_ENV} | {RAY_JOB_ENV: "{}"}
    r = subprocess.run([sys.executable, "-m", "sparsetrain.cli", "train", "--config", "tiny",
                        "--set", "train.out_dir=runs/x", "--set", "launch.workers=1"],
                       cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "train.out_dir='runs/x' is relative" in lines[0] and not (tmp_path / "runs").exists()
