"""Checkpoint integrity: manifest verified before anything is read, no code from `.metadata`, fallback, retention."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from torch.distributed.checkpoint.api import CheckpointException

from sparsetrain.config import to_dict
from sparsetrain.model.gpt import build_model
from sparsetrain.train import checkpoint as ckpt
from sparsetrain.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from sparsetrain.train.manifest import MANIFEST, sha256_file
from sparsetrain.train.safe_dcp import load_metadata
from tests.test_cli import TINY, _sets, cli
from tests.train.test_checkpoint import _run
from tests.train.test_trainer import tiny_cfg

pytestmark = [pytest.mark.unit]

RESUME = ["checkpoint.every=3", "checkpoint.resume=true", "moe.num_experts=4"]


def _copy(src_run: Path, dst: Path, *steps: int) -> Path:
    root = dst / "checkpoints"
    for s in steps:
        shutil.copytree(src_run / "checkpoints" / f"step_{s:08d}", root / f"step_{s:08d}")
    return root


def _biggest_shard(path: Path) -> Path:
    return max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _flip_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))


def _reseal(path: Path, name: str) -> None:
    """Rewrite the manifest entry of `name` to match the file (what an attacker who controls both can do)."""
    man = json.loads((path / MANIFEST).read_text())
    man["files"][name] = {"sha256": sha256_file(path / name), "bytes": (path / name).stat().st_size}
    (path / MANIFEST).write_text(json.dumps(man))


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_manifest_hashes_every_file(six_steps):
    out, _ = six_steps
    path = out / "checkpoints" / "step_00000005"
    man = json.loads((path / MANIFEST).read_text())
    on_disk = sorted(p.name for p in path.iterdir() if p.name != MANIFEST)
    assert sorted(man["files"]) == on_disk and ".metadata" in on_disk and ckpt.EXTRA in on_disk
    for name, entry in man["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert man["step"] == 5
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_flipped_byte_refused_and_resume_falls_back(tmp_path, six_steps, capsys):
    out, full = six_steps
    root = _copy(out, tmp_path, 2, 5)
    shard = _biggest_shard(root / "step_00000005")
    _flip_byte(shard)
    with pytest.raises(CheckpointError, match=f"file {shard.name} fails its SHA-256") as ei:
        load_checkpoint(root / "step_00000005", build_model(tiny_cfg(tmp_path, *RESUME)), None)
    assert str(root / "step_00000005") in str(ei.value) and "\n" not in str(ei.value)
    assert latest_checkpoint(root) == root / "step_00000002"
    tr = _run(tiny_cfg(tmp_path, *RESUME, steps=6))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("checkpoint refused")]
    assert len(lines) == 1, lines
    assert shard.name in lines[0] and "resuming from step_00000002" in lines[0] and "3 steps earlier" in lines[0]
    assert tr.start_step == 3
    assert [r["loss"] for r in tr.history] == full[3:]  # the good checkpoint resumes bit-exact


@pytest.mark.parametrize("damage", ["truncate", "delete_shard", "delete_metadata", "delete_manifest"])
def test_damaged_checkpoint_named_and_skipped(tmp_path, six_steps, damage):
    out, _ = six_steps
    root = _copy(out, tmp_path, 2, 5)
    path = root / "step_00000005"
    shard = _biggest_shard(path)
    if damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 3)
        want = f"file {shard.name} has {shard.stat().st_size} bytes"
    elif damage == "delete_shard":
        shard.unlink()
        want = f"file {shard.name} is missing"
    elif damage == "delete_metadata":
        (path / ".metadata").unlink()
        want = "file .metadata is missing"
    else:
        (path / MANIFEST).unlink()
        want = f"has no {MANIFEST}"
    with pytest.raises(CheckpointError, match=want):
        load_checkpoint(path, build_model(tiny_cfg(tmp_path, *RESUME)), None)
    good, _, refused = ckpt.find_resumable(root)
    assert good == root / "step_00000002"
    assert [p for p, _ in refused] == [path] and want in refused[0][1]


def test_nothing_verifies_is_an_error_not_a_fresh_start(tmp_path, six_steps):
    out, _ = six_steps
    root = _copy(out, tmp_path, 5)
    (root / "step_00000005" / ".metadata").unlink()
    cfg = tiny_cfg(tmp_path, *RESUME, steps=6)
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies.*start over in another train.out_dir"):
        ckpt.preflight_resume(to_dict(cfg))  # what `sparsetrain train` checks before any process starts
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies.*start over in another train.out_dir"):
        _run(cfg)  # and the ranks: refused before a single step is trained
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("resealed", [False, True])
def test_crafted_metadata_pickle_never_runs(tmp_path, six_steps, resealed):
    out, _ = six_steps
    path = _copy(out, tmp_path, 5) / "step_00000005"
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsCommand(f"touch {marker}"))
    size = (path / ".metadata").stat().st_size  # padded to the original size: only the SHA-256 can tell
    (path / ".metadata").write_bytes(payload + b"\0" * (size - len(payload)))
    if resealed:  # the manifest vouches for the crafted file: the restricted unpickler still refuses it
        _reseal(path, ".metadata")
        want = "posix.system is not allowed in checkpoint metadata"
    else:
        want = "file .metadata fails its SHA-256"
    with pytest.raises(CheckpointError, match=want):
        load_checkpoint(path, build_model(tiny_cfg(tmp_path, *RESUME)), None)
    assert not marker.exists()
    if not resealed:
        return
    # the same checkpoint through the command line: a one-line error, nothing run
    r = cli("eval", "--config", "tiny", *_sets(TINY), "--checkpoint", str(path))
    assert r.returncode == 1 and not marker.exists()
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and ".metadata" in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_metadata_unpickler_reads_real_metadata(six_steps):
    out, _ = six_steps
    md = load_metadata((out / "checkpoints" / "step_00000005" / ".metadata").read_bytes(), "test")
    assert "model.layers.0.ffn.experts.3.w1" in md.state_dict_metadata
    with pytest.raises(CheckpointError, match="builtins.eval is not allowed"):
        load_metadata(pickle.dumps(_Eval()), "test")


class _Eval:
    def __reduce__(self):
        return (eval, ("1",))


def test_retention_keeps_last_good_when_newer_are_bad(tmp_path, six_steps):
    out, _ = six_steps
    root = tmp_path / "checkpoints"
    bad = root / "step_00000099"
    shutil.copytree(out / "checkpoints" / "step_00000005", bad)
    _flip_byte(_biggest_shard(bad))  # a newer, bad checkpoint left by an earlier attempt
    tr = _run(tiny_cfg(tmp_path, "checkpoint.every=1", "checkpoint.keep=1", "checkpoint.resume=false",
                       "moe.num_experts=4", steps=3))
    assert [p.name for p in ckpt.committed(tr.ckpt_dir)] == ["step_00000002", "step_00000099"]
    assert latest_checkpoint(root) == root / "step_00000002"


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, six_steps, monkeypatch):
    out, _ = six_steps
    root = _copy(out, tmp_path, 2)
    cfg = tiny_cfg(tmp_path, *RESUME, steps=6)
    from sparsetrain.train.trainer import Trainer

    tr = Trainer(cfg)

    def killed(*a, **k):
        raise KeyboardInterrupt  # dies after the shards are written, before the manifest and rename

    monkeypatch.setattr(ckpt, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        tr.save(5)
    assert (root / ".tmp-step_00000005").is_dir() and not (root / "step_00000005").exists()
    assert latest_checkpoint(root) == root / "step_00000002"
    load_checkpoint(root / "step_00000002", build_model(cfg), None)


def test_metadata_pointing_outside_the_checkpoint_refused(tmp_path, six_steps):
    out, _ = six_steps
    path = _copy(out, tmp_path, 5) / "step_00000005"
    md = load_metadata((path / ".metadata").read_bytes(), "test")
    info = next(iter(md.storage_data.values()))
    info.relative_path = "../../outside.distcp"  # a resealed manifest cannot make DCP read beyond the listed files
    (path / ".metadata").write_bytes(pickle.dumps(md))
    _reseal(path, ".metadata")
    with pytest.raises(CheckpointError, match="points at '../../outside.distcp', which manifest.json does not list"):
        load_checkpoint(path, build_model(tiny_cfg(tmp_path, *RESUME)), None)


def test_pickled_byte_item_in_resealed_metadata_refused(tmp_path, six_steps):
    """DCP reads a BytesStorageMetadata item with torch.load(weights_only=False): a resealed .metadata that
    declares one (pointing at a pickle appended to a shard) is refused before DCP reads anything."""
    import io

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    out, _ = six_steps
    path = _copy(out, tmp_path, 5) / "step_00000005"
    marker = tmp_path / "pwned"
    md = load_metadata((path / ".metadata").read_bytes(), "test")
    fqn = next(iter(md.state_dict_metadata))
    buf = io.BytesIO()
    torch.save(_RunsCommand(f"touch {marker}"), buf)
    shard = _biggest_shard(path)
    offset = shard.stat().st_size
    with shard.open("ab") as f:
        f.write(buf.getvalue())
    md.state_dict_metadata[fqn] = BytesStorageMetadata()
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != fqn}
    md.storage_data[MetadataIndex(fqn)] = _StorageInfo(shard.name, offset, len(buf.getvalue()))
    (path / ".metadata").write_bytes(pickle.dumps(md))
    _reseal(path, ".metadata")
    _reseal(path, shard.name)
    with pytest.raises(CheckpointError, match="declares 1 non-tensor item.*refused"):
        load_checkpoint(path, build_model(tiny_cfg(tmp_path, *RESUME)), None)
    assert not marker.exists()


def test_retention_and_resume_see_only_their_own_step_dirs(tmp_path, six_steps):
    out, _ = six_steps
    root = _copy(out, tmp_path, 2, 5)
    for name in ("step_best", "step_00000005_backup"):
        shutil.copytree(root / "step_00000005", root / name)
    assert [p.name for p in ckpt.committed(root)] == ["step_00000002", "step_00000005"]
    ckpt._prune(root, 1, root / "step_00000005")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000005", "step_00000005_backup", "step_best"]


def test_a_renamed_checkpoint_is_refused(tmp_path, six_steps):
    out, _ = six_steps
    root = _copy(out, tmp_path, 2)
    (root / "step_00000002").rename(root / "step_00000099")
    with pytest.raises(CheckpointError, match="records step 2, the directory name step 99"):
        load_checkpoint(root / "step_00000099", build_model(tiny_cfg(tmp_path, *RESUME)), None)
    assert latest_checkpoint(root) is None


def test_preflight_hashes_the_trainer_state_and_refuses_a_fresh_run_over_an_old_one(tmp_path, six_steps):
    """A bit flip in trainer_state.json falls back to the older checkpoint before start (it used to read as
    'a different model'); resume=false on a directory with checkpoints is refused (it would overwrite them)."""
    out, _ = six_steps
    _copy(out, tmp_path, 2, 5)
    state = tmp_path / "checkpoints" / "step_00000005" / "trainer_state.json"
    state.write_text(state.read_text().replace('"n_layers": 2', '"n_layers": 3'))
    cfg = to_dict(tiny_cfg(tmp_path, *RESUME))
    ckpt.preflight_resume(cfg)  # step_00000002 verifies and matches: no error
    cfg["checkpoint"]["resume"] = False
    with pytest.raises(CheckpointError, match=r"already holds checkpoints of an earlier run \(up to step_00000005\) "
                       "that a fresh run would overwrite"):
        ckpt.preflight_resume(cfg)


def test_eval_reads_a_checkpoint_named_by_its_step_dir(tmp_path, six_steps):
    out, _ = six_steps
    _copy(out, tmp_path, 2, 5)
    _flip_byte(_biggest_shard(tmp_path / "checkpoints" / "step_00000005"))
    r = cli("eval", "--config", "tiny", *_sets(TINY), "--set", f"train.out_dir={tmp_path}")
    assert r.returncode == 0 and "reading step_00000002 instead, 3 steps earlier" in r.stderr, r.stderr
    assert "trained again" not in r.stderr
    r = cli("eval", "--config", "tiny", *_sets(TINY), "--set", f"train.out_dir={tmp_path}",
            "--checkpoint", "step_00000002")
    assert r.returncode == 0, r.stderr


def test_a_failed_write_is_one_line_and_leaves_no_partial_directory(tmp_path, monkeypatch):
    """A full disk surfaces from DCP as torch's 'unexpected pos' RuntimeError: the save names the step, the
    directory and the free space instead, and removes its partial .tmp directory (single process)."""
    cfg = tiny_cfg(tmp_path, *RESUME)
    model = build_model(cfg)

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt.dcp, "save", full)
    with pytest.raises(CheckpointError, match=r"saving checkpoint step 4 into .*\.tmp-step_00000004 failed "
                                              r"\(RuntimeError: .*unexpected pos.*MiB free on that filesystem"):
        ckpt.save_checkpoint(tmp_path / "checkpoints", 4, model, torch_optimizer(model), {})
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000004").exists()


def torch_optimizer(model):
    import torch

    return torch.optim.AdamW(model.parameters())


def test_a_failed_async_write_is_the_same_one_line(tmp_path, monkeypatch):
    """checkpoint.async: DCP's background write failing surfaces at the next wait as the synchronous save's line."""
    from concurrent.futures import Future

    from sparsetrain.train import async_checkpoint

    def full(*a, **k):
        f: Future = Future()
        f.set_exception(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
        return f

    monkeypatch.setattr(async_checkpoint.dcp, "async_save", full)
    model = build_model(tiny_cfg(tmp_path, *RESUME))
    saver = async_checkpoint.AsyncCheckpointer()
    saver.save(tmp_path / "checkpoints", 4, model, torch_optimizer(model), {}, keep=2)
    with pytest.raises(CheckpointError, match=r"saving checkpoint step 4 into .*\.tmp-step_00000004 failed "
                                              r"\(RuntimeError: .*unexpected pos.*MiB free on that filesystem"):
        saver.close()
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000004").exists()


def test_single_process_model_resolves_a_step_name_a_path_and_the_default(tmp_path: Path, six_steps) -> None:
    from sparsetrain.train.offline_eval import single_process_model as _single_process_model

    out, _ = six_steps
    root = _copy(out, tmp_path, 2, 5)
    cfg = tiny_cfg(tmp_path, *RESUME)
    assert _single_process_model(cfg, "step_00000002")[1] == root / "step_00000002"  # a name under the run's root
    assert _single_process_model(cfg, None)[1] == root / "step_00000005"  # the newest that verifies
    assert _single_process_model(cfg, str(out / "checkpoints"))[1] == out / "checkpoints" / "step_00000005"


@pytest.mark.parametrize(("rank", "error", "removed"), [
    (0, CheckpointException("write", {}), True),  # DCP failed collectively: every rank is done writing
    (1, CheckpointException("write", {}), False),  # only rank 0 removes the directory
    (0, RuntimeError("local"), False),  # another rank may still write: left to the next begin_save
])
def test_a_failed_multi_rank_write_is_cleaned_by_rank_0_only_after_dcp_failed_everywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: int, error: BaseException, removed: bool) -> None:
    tmp = tmp_path / "checkpoints" / ".tmp-step_00000004"
    tmp.mkdir(parents=True)
    (tmp / f"__{rank}_0.distcp").write_bytes(b"partial")
    monkeypatch.setattr(ckpt, "_is_dist", lambda: True)
    monkeypatch.setattr(ckpt, "_rank", lambda: rank)
    err = ckpt.save_failed(tmp, 4, error)
    assert tmp.exists() is not removed
    assert f"saving checkpoint step 4 into {tmp} failed" in str(err) and "\n" not in str(err)


def test_a_real_dcp_write_failure_is_the_same_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DCP raises CheckpointException, a BaseException: the save still reports it in one line and cleans up."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Full(FileSystemWriter):
        def write_data(self, plan: object, planner: object) -> object:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "writer", lambda path: Full(str(path)))
    model = build_model(tiny_cfg(tmp_path, *RESUME))
    with pytest.raises(CheckpointError, match=r"step 4 into .* failed \(OSError: \[Errno 28\] No space left"):
        ckpt.save_checkpoint(tmp_path / "checkpoints", 4, model, torch_optimizer(model), {})
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000004").exists()
