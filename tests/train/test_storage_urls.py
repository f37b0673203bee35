"""train.out_dir / checkpoint.dir as fsspec URLs: checkpoints through DCP's fsspec writer/reader with the same
manifest verification, fallback and retention; logs mirrored locally and uploaded at commits."""
from __future__ import annotations

import json
import shutil
import uuid

import fsspec
import pytest

from sparsetrain.config import ConfigError, load_config
from sparsetrain.train import checkpoint as ckpt
from sparsetrain.train.location import RemotePath, check_urls, local_dir
from sparsetrain.train.storage import STORAGE_ROOT_ENV, resolve_job_storage
from tests.train.test_checkpoint import _run
from tests.train.test_trainer import tiny_cfg


@pytest.mark.unit
def test_memory_url_save_resume_fallback_and_retention(tmp_path, monkeypatch, six_steps):
    _, full = six_steps
    monkeypatch.setenv("SPARSETRAIN_LOCAL_DIR", str(tmp_path / "mirror"))
    url = f"memory://sparsetrain-test/{uuid.uuid4().hex}/run"
    cfg = tiny_cfg(tmp_path, "checkpoint.every=3", "checkpoint.resume=true", "moe.num_experts=4",
                   f"train.out_dir={url}", steps=6)
    first = _run(cfg, stop_after=3)  # checkpoint at step 2 committed on the URL, crash before step 4
    root = RemotePath(f"{url}/checkpoints")
    assert first.ckpt_dir == root and [p.name for p in ckpt.committed(root)] == ["step_00000002"]
    fs = fsspec.filesystem("memory")
    assert fs.isfile(f"{root.path}/step_00000002/manifest.json")
    assert fs.isfile(f"{RemotePath(url).path}/metrics.jsonl")  # logs uploaded at the commit
    assert local_dir(url) == tmp_path / "mirror" / "memory" / "sparsetrain-test" / url.split("/")[-2] / "run"
    shutil.rmtree(tmp_path / "mirror")  # a fresh node: the resumed run downloads its logs from the URL
    second = _run(cfg)
    assert second.start_step == 3 and [r["loss"] for r in second.history] == full[3:]  # bit-exact on CPU
    steps = [json.loads(ln)["step"] for ln in fs.cat_file(f"{RemotePath(url).path}/metrics.jsonl").splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5]
    assert [p.name for p in ckpt.committed(root)] == ["step_00000002", "step_00000005"]  # checkpoint.keep=2
    # the newest checkpoint corrupted on the store: resume falls back to the previous one, saying so
    newest = root / "step_00000005"
    data = next(p for p in newest.iterdir() if p.name.endswith(".distcp"))
    fs.pipe_file(data.path, b"\0" * data.stat().st_size)
    good, manifest, refused = ckpt.find_resumable(root)
    assert good == root / "step_00000002" and manifest["step"] == 2
    assert "fails its SHA-256 check" in ckpt.fallback_line(root, good, refused)
    # a write killed before its manifest (the commit) is never loaded
    fs.rm(f"{newest.path}/manifest.json")
    assert ckpt.latest_checkpoint(root) == root / "step_00000002"


@pytest.mark.unit
def test_missing_filesystem_names_the_extra_and_urls_are_never_relative():
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"s3://.*pip install 'sparsetrain\[s3\]'"):
            check_urls("s3://bucket/runs/a")
    with pytest.raises(ConfigError, match="nosuchproto://"):
        check_urls("nosuchproto://x/y")
    cfg = load_config("tiny", ["train.out_dir=gs://bucket/run", "checkpoint.dir=ckpts"])
    changes = resolve_job_storage(cfg, {STORAGE_ROOT_ENV: "s3://bucket/prefix"})
    assert cfg.train.out_dir == "gs://bucket/run" and cfg.checkpoint.dir == "s3://bucket/prefix/ckpts"
    assert changes == ["checkpoint.dir: ckpts -> s3://bucket/prefix/ckpts"]
