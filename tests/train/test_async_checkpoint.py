"""checkpoint.async: the save is written in the background while training goes on, committed only after the
write finished; a resume from async saves equals an uninterrupted run bit-exactly (2 gloo ranks, file://)."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from sparsetrain.config import config_from_dict
from sparsetrain.model.gpt import build_model
from sparsetrain.train import async_checkpoint
from sparsetrain.train import checkpoint as ckpt
from tests.dist_utils import DistributedError, run_distributed
from tests.parity_utils import small_config
from tests.train.test_checkpoint import _run, _Stop
from tests.train.test_trainer import tiny_cfg


@pytest.mark.unit
def test_training_goes_on_while_writing_and_an_unfinished_save_is_never_loaded(tmp_path, monkeypatch):
    release, real = threading.Event(), async_checkpoint.commit_save

    def commit(root, step, tmp, extra, keep, group=None, before_commit=None):
        if step == 3:  # this write finished but is never committed: the process "dies" before the manifest
            release.wait(60)
            raise RuntimeError("killed while committing step 3")
        return real(root, step, tmp, extra, keep, group, before_commit)

    monkeypatch.setattr(async_checkpoint, "commit_save", commit)
    cfg = tiny_cfg(tmp_path, "checkpoint.every=2", "checkpoint.async=true", "checkpoint.resume=true", steps=8)
    tr = _run(cfg, stop_after=4)  # saves after steps 1 and 3; step 4 ran while step 3 was pending
    assert tr.async_ckpt.pending_step == 3 and [r["step"] for r in tr.history][-2:] == [3, 4]
    root = tmp_path / "checkpoints"
    meta = root / ".tmp-step_00000003" / ".metadata"
    for _ in range(600):  # the background write may still be finishing on a loaded machine
        if meta.is_file():
            break
        time.sleep(0.05)
    assert meta.is_file()  # written, not committed
    assert [p.name for p in ckpt.committed(root)] == ["step_00000001"]
    assert ckpt.latest_checkpoint(root) == root / "step_00000001"
    assert ckpt.load_checkpoint(root / "step_00000001", build_model(cfg), None)["step"] == 1
    release.set()
    with pytest.raises(RuntimeError, match="killed while committing"):
        tr.async_ckpt.close()  # the background error reaches the trainer at the next wait
    assert ckpt.latest_checkpoint(root) == root / "step_00000001"


def _async_body(rank: int, world: int, cfg: dict, base: str) -> dict:
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.train.state import full_model_state
    from sparsetrain.train.trainer import Trainer

    torch.set_num_threads(1)
    os.environ["SPARSETRAIN_LOCAL_DIR"] = f"{base}/mirror"  # the file:// run's local log mirror
    info = init_distributed("cpu")

    def trainer(mode: str) -> Trainer:
        d = {**cfg, "train": {**cfg["train"], "out_dir": f"file://{base}/{mode}" if mode else f"{base}/sync"},
             "checkpoint": {**cfg["checkpoint"], "async_save": bool(mode)}}
        return Trainer(config_from_dict(d), info)

    full = trainer("")
    full.fit()  # synchronous saves, uninterrupted
    first = trainer("async")
    step_fn = first.train_step
    first.train_step = lambda s: (_ for _ in ()).throw(_Stop(s)) if s > 4 else step_fn(s)
    try:
        first.fit()  # async saves after steps 1 and 3, then dies before step 5
    except _Stop:
        first.flush_checkpoint()
    second = trainer("async")
    second.fit()
    ours, ref = full_model_state(second.model), full_model_state(full.model)
    return {"start": second.start_step, "resumed": [r["loss"] for r in second.history],
            "full": [r["loss"] for r in full.history],
            "equal": all(torch.equal(ours[k], ref[k]) for k in ref) and ours.keys() == ref.keys()}


@pytest.mark.distributed
def test_async_resume_equals_uninterrupted_on_two_ranks_over_file_url(tmp_path):
    cfg = small_config("parallel.strategy=fssdp", "checkpoint.every=2", "checkpoint.resume=true",
                       "launch.workers=2", steps=6)
    for res in run_distributed(_async_body, 2, cfg, str(tmp_path)):
        assert res["start"] == 4 and res["resumed"] == res["full"][4:], res
        assert res["equal"], "final parameters differ from the uninterrupted synchronous run"
    assert [p.name for p in ckpt.committed(f"file://{tmp_path}/async/checkpoints")] == \
        ["step_00000003", "step_00000005"]


def _killed_body(rank: int, world: int, cfg: dict, out: str) -> dict:
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.train.trainer import Trainer

    os.environ.update({"SPARSETRAIN_FAULTS": "save_kill@3:0", "SPARSETRAIN_ATTEMPT": "0"})
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    d = {**cfg, "train": {**cfg["train"], "out_dir": out}, "checkpoint": {**cfg["checkpoint"], "async_save": True}}
    Trainer(config_from_dict(d), info).fit()
    return {}


@pytest.mark.distributed
def test_sigkill_during_an_async_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    cfg = small_config("parallel.strategy=fssdp", "checkpoint.every=2", "launch.workers=2", steps=6)
    # rank 0 is SIGKILLed by its commit thread after step 3 was written, before it was committed
    with pytest.raises(DistributedError, match="rank 0 (closed its pipe|exited)"):
        run_distributed(_killed_body, 2, cfg, str(tmp_path))
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step_00000003" / ".metadata").is_file()
    assert [p.name for p in ckpt.committed(root)] == ["step_00000001"]
    assert ckpt.latest_checkpoint(root) == root / "step_00000001"
    assert ckpt.load_checkpoint(root / "step_00000001", build_model(config_from_dict(cfg)), None)["step"] == 1
