"""Checkpoints: exact resume, atomic commit, corruption errors, per-expert keys, resharding across world sizes.

Integrity (manifest, crafted pickles, fallback, retention): test_checkpoint_integrity.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sparsetrain.config import config_from_dict, to_dict
from sparsetrain.model.gpt import build_model
from sparsetrain.sparsity import nm_sparsifier
from sparsetrain.train import checkpoint as ckpt
from sparsetrain.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from sparsetrain.train.safe_dcp import load_metadata
from sparsetrain.train.trainer import Trainer
from tests.dist_utils import run_distributed
from tests.parity_utils import small_config
from tests.train.test_trainer import tiny_cfg


class _Stop(Exception):
    pass


def _run(cfg, stop_after: int | None = None) -> Trainer:
    """Train; with stop_after, die right after that step (its checkpoint, if due, is committed)."""
    tr = Trainer(cfg)
    if stop_after is not None:
        step_fn = tr.train_step

        def train_step(step):
            if step > stop_after:
                raise _Stop(step)
            return step_fn(step)

        tr.train_step = train_step
        with pytest.raises(_Stop):
            tr.fit()
    else:
        tr.fit()
    return tr


def _keys(path: Path) -> set[str]:
    return set(load_metadata((path / ".metadata").read_bytes(), str(path)).state_dict_metadata)


@pytest.mark.unit
def test_exact_resume_single_process(tmp_path, six_steps):
    _, full = six_steps
    cfg = tiny_cfg(tmp_path, "checkpoint.every=3", "checkpoint.resume=true", "moe.num_experts=4", steps=6)
    first = _run(cfg, stop_after=3)  # steps 0..3 run, checkpoint at step 2, crash before step 4
    assert [r["step"] for r in first.history] == [0, 1, 2, 3]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000002"
    second = _run(cfg)
    assert second.start_step == 3
    assert [r["step"] for r in second.history] == [3, 4, 5]
    resumed = [r["loss"] for r in second.history]
    assert resumed == full[3:], (resumed, full[3:])  # bit-exact on CPU
    # metrics.jsonl reads like one run: steps past the checkpoint were dropped before appending
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5]
    loads = [json.loads(ln)["step"] for ln in (tmp_path / "expert_loads.jsonl").read_text().splitlines()]
    assert loads == sorted(set(loads)) and loads[-1] == 5  # no redone step twice (a trace replays by line)


@pytest.mark.unit
def test_per_expert_keys_and_keep(six_steps):
    out, _ = six_steps
    root = out / "checkpoints"
    found = [p.name for p in ckpt.committed(root)]
    assert found == ["step_00000002", "step_00000005"]
    keys = _keys(root / "step_00000005")
    assert "model.layers.0.ffn.experts.3.w1" in keys
    assert "optim.layers.0.ffn.experts.3.w1.exp_avg" in keys
    assert "optim.layers.1.ffn.experts.0.w2.exp_avg_sq" in keys
    assert "model.layers.0.ffn.experts.w1" not in keys  # never the stacked tensor
    assert "model.layers.0.ffn.router.expert_bias" in keys and "optim.step" in keys
    extra = json.loads((root / "step_00000005" / ckpt.EXTRA).read_text())
    assert extra["step"] == 5 and config_from_dict(extra["config"]).train.steps == 6


@pytest.mark.unit
def test_keep_prunes_old_checkpoints(tmp_path):
    """Retention keeps the last `keep`; a commit also drops partial writes a killed attempt left (any step)."""
    for step in (1, 7):  # a rank killed mid-save: its .tmp dir would otherwise stay forever
        (tmp_path / "checkpoints" / f".tmp-step_{step:08d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f".tmp-step_{step:08d}" / "__0_0.distcp").write_bytes(b"partial")
    tr = _run(tiny_cfg(tmp_path, "checkpoint.every=1", "checkpoint.keep=2", steps=4))
    assert [p.name for p in ckpt.committed(tr.ckpt_dir)] == ["step_00000002", "step_00000003"]
    assert not list(tr.ckpt_dir.glob(".tmp-*"))


@pytest.mark.unit
def test_uncommitted_dirs_ignored(tmp_path, six_steps):
    out, _ = six_steps
    root = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints" / "step_00000002", root / "step_00000002")
    tmp = root / ".tmp-step_00000009"
    shutil.copytree(out / "checkpoints" / "step_00000005", tmp)  # complete-looking, but never renamed
    half = root / "step_00000007"
    shutil.copytree(out / "checkpoints" / "step_00000005", half)
    (half / ckpt.EXTRA).unlink()  # crashed before the extra file: not committed
    assert latest_checkpoint(root) == root / "step_00000002"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.unit
def test_corrupt_checkpoint_raises_with_path(tmp_path, six_steps):
    out, _ = six_steps
    path = tmp_path / "step_00000005"
    shutil.copytree(out / "checkpoints" / "step_00000005", path)
    cfg = tiny_cfg(tmp_path, "moe.num_experts=4")
    data = sorted(path.glob("*.distcp"))
    assert data
    with open(data[0], "r+b") as f:
        f.truncate(data[0].stat().st_size // 3)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path, build_model(cfg), None)
    assert str(path) in str(ei.value)
    (path / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="file .metadata is missing") as ei:
        load_checkpoint(path, build_model(cfg), None)
    assert str(path) in str(ei.value)
    assert latest_checkpoint(tmp_path) is None


@pytest.mark.unit
def test_checkpoint_of_other_model_shape_raises(tmp_path, six_steps):
    out, _ = six_steps
    path = out / "checkpoints" / "step_00000005"
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path, build_model(tiny_cfg(tmp_path, "moe.num_experts=4", "model.d_model=64")), None)
    assert str(path) in str(ei.value)


# ------------------------------------------------------------------ resharding across world sizes

RESHARD = ["checkpoint.every=3", "checkpoint.resume=true", "model.d_model=32", "moe.d_ffn=32", "model.seq_len=16",
           "parallel.pretend_nodes=0", "parallel.fssdp.overlap_budget=2", "parallel.fssdp.reshard_every=0"]


def _train_body(rank: int, world: int, cfg: dict, out: str) -> dict:
    from tests.parity_utils import train_and_collect

    res = train_and_collect(cfg, out)
    return {"losses": res["losses"]}


def _resume_cfg(cfg: dict, strategy: str, workers: int, ckpt_dir: str) -> dict:
    d = json.loads(json.dumps(cfg))
    d["parallel"]["strategy"] = strategy
    d["launch"]["workers"] = workers
    d["checkpoint"]["dir"] = ckpt_dir
    return to_dict(config_from_dict(d))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ep", "fssdp", "dp"])  # dp: FSDP2 shards the stacked experts (DTensor rows)
def test_resume_on_fewer_ranks(tmp_path, strategy):
    cfg = small_config(f"parallel.strategy={strategy}", *RESHARD, steps=4)
    full = run_distributed(_train_body, 4, cfg, str(tmp_path / "w4"))[0]["losses"]  # saves after step 2
    saved = tmp_path / "w4" / "checkpoints" / "step_00000002"
    assert saved.is_dir()
    keys = _keys(saved)
    assert "model.layers.0.ffn.experts.3.w1" in keys and "optim.layers.0.ffn.experts.3.w1.exp_avg" in keys
    assert "model.layers.1.ffn.experts.7.w3" in keys  # every expert, whichever rank held it
    for workers, strat in ((2, strategy), (1, "none")):
        ck = tmp_path / f"ck{workers}"
        shutil.copytree(saved, ck / saved.name)
        rcfg = _resume_cfg(cfg, strat, workers, str(ck))
        if workers == 1:
            from tests.parity_utils import train_and_collect

            got = train_and_collect(rcfg, str(tmp_path / "w1"))["losses"]
        else:
            got = run_distributed(_train_body, workers, rcfg, str(tmp_path / f"w{workers}"))[0]["losses"]
        assert len(got) == 1, got  # only step 3 ran
        torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(full[3]), rtol=1e-5, atol=1e-6,
                                   msg=f"{strategy} 4 ranks -> {strat} on {workers}: {got[0]} vs {full[3]}")


def _eval_then_save_body(rank: int, world: int, cfg: dict, out: str) -> dict:
    from tests.parity_utils import train_and_collect

    first = train_and_collect(cfg, out)["losses"]
    again = train_and_collect(cfg, out)  # the same command again: finds the finished run
    return {"first": first, "again": again["losses"]}


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["fssdp", "dp"])
def test_checkpoint_after_eval_keeps_adam_state_of_fsdp_root_and_last_block(tmp_path, strategy):
    """An evaluation (forward only) right before a save left FSDP2's root and last block unsharded: their
    parameters were then full views without optimizer state, and the checkpoint silently lacked their Adam
    state, so the next run could not resume (every default final checkpoint: eval runs on the last step)."""
    cfg = small_config(f"parallel.strategy={strategy}", "parallel.dense=fsdp2", "checkpoint.every=2",
                       "checkpoint.resume=true", "train.eval_every=2", "data.eval_batches=1",
                       "parallel.pretend_nodes=0", steps=2)
    res = run_distributed(_eval_then_save_body, 2, cfg, str(tmp_path / "run"))[0]
    saved = tmp_path / "run" / "checkpoints" / "step_00000001"
    keys = _keys(saved)
    last = cfg["model"]["n_layers"] - 1
    params = [n for n, _ in build_model(config_from_dict(cfg), "meta").named_parameters() if ".experts." not in n]
    for want in ("tok_emb.weight", f"layers.{last}.attn.wk.weight", "norm.weight"):
        assert want in params and f"optim.{want}.exp_avg_sq" in keys, want
    assert [p for p in params if f"optim.{p}.exp_avg" not in keys] == []
    assert len(res["first"]) == 2 and res["again"][-1:] != []  # resumed: reported, not a "does not match"


@pytest.mark.unit
def test_flat_state_refuses_trainable_params_the_optimizer_does_not_hold():
    from sparsetrain.train.state import flat_state

    model = build_model(config_from_dict(small_config()))
    held = [p for n, p in model.named_parameters() if not n.startswith("norm.")]
    opt = torch.optim.AdamW(held)
    with pytest.raises(RuntimeError, match="no state for 1 trainable parameter.*norm.weight"):
        flat_state(model, opt)
    assert "optim.norm.weight.exp_avg" in flat_state(model, torch.optim.AdamW(model.parameters()))


@pytest.mark.unit
def test_exact_resume_with_nm_schedules(tmp_path):
    """N:M structure decay (4:8 -> 2:8 at step 3) and mask decay follow the global step: a run resumed after
    step 2 continues their schedules where they were, bit for bit, and `eval` on its checkpoint gives the
    val loss training logged (same masks, same schedule position)."""
    sp = ["sparsity.enabled=true", "sparsity.modules=[experts,attn]", "sparsity.structure_decay=['4:8']",
          "sparsity.structure_decay_every=3", "sparsity.n=2", "sparsity.m=8", "sparsity.mask_decay_steps=2",
          "moe.num_experts=4", "train.eval_every=3", "checkpoint.every=3"]
    full = _run(tiny_cfg(tmp_path / "full", *sp, steps=6))
    cfg = tiny_cfg(tmp_path / "cut", *sp, "checkpoint.resume=true", steps=6)
    _run(cfg, stop_after=3)  # checkpoint after step 2, then dies after step 3
    second = _run(cfg)
    assert second.start_step == 3
    assert [r["loss"] for r in second.history] == [r["loss"] for r in full.history][3:]
    model = _eval_matches_logged(cfg, tmp_path / "cut" / "checkpoints" / "step_00000005", full)
    assert nm_sparsifier(model).state.step == 6


def _eval_matches_logged(cfg, path, full) -> torch.nn.Module:
    """`eval`'s model on checkpoint `path` (step 5) gives the last val loss `full` logged; the model."""
    from sparsetrain.train.offline_eval import single_process_model as _single_process_model

    model, _, extra = _single_process_model(cfg, str(path))
    assert extra["step"] == 5
    logged = [r["val_loss"] for r in full.history if "val_loss" in r][-1]
    data = Trainer(cfg).data
    with torch.no_grad():
        got = sum(float(model(*data.val_batch(i)).loss) for i in range(cfg.data.eval_batches))
    assert got / cfg.data.eval_batches == pytest.approx(logged, rel=1e-6)
    return model


@pytest.mark.unit
def test_resume_and_eval_use_the_masks_in_use_with_refresh_every(tmp_path):
    """sparsity.refresh_every=4: masks are cached up to 3 steps; a checkpoint saves them, so a run resumed after
    step 2 continues with the same masks (bit for bit) and `eval` on the last checkpoint gives the val loss training
    logged (before the fix both recomputed masks from the checkpoint's weights)."""
    sp = ["sparsity.enabled=true", "sparsity.modules=[experts,attn]", "sparsity.refresh_every=4", "train.lr=0.01",
          "train.warmup_steps=0", "moe.num_experts=4", "train.eval_every=6", "checkpoint.every=3"]
    full = _run(tiny_cfg(tmp_path / "full", *sp, steps=6))
    cfg = tiny_cfg(tmp_path / "cut", *sp, "checkpoint.resume=true", steps=6)
    _run(cfg, stop_after=3)  # checkpoint after step 2 (masks of step 0), then dies after step 3
    assert any(k.startswith("model.nm_masks.") for k in _keys(tmp_path / "cut" / "checkpoints" / "step_00000002"))
    second = _run(cfg)
    assert second.start_step == 3
    assert [r["loss"] for r in second.history] == [r["loss"] for r in full.history][3:]
    _eval_matches_logged(cfg, tmp_path / "full" / "checkpoints" / "step_00000005", full)  # masks of step 4 in use
    # `eval` with a config that recomputes masks every step still evaluates the masks the run trained with
    other = tiny_cfg(tmp_path / "cut", *sp, "sparsity.refresh_every=1", steps=6)
    model = _eval_matches_logged(other, tmp_path / "full" / "checkpoints" / "step_00000005", full)
    assert nm_sparsifier(model).cfg.refresh_every == 4


@pytest.mark.unit
def test_checkpoint_without_masks_still_loads(tmp_path):
    """A checkpoint written without mask entries (before they were saved, or with refresh_every=1) loads into a
    run with refresh_every > 1: its masks are recomputed from the weights."""
    sp = ["sparsity.enabled=true", "sparsity.modules=[experts,attn]", "moe.num_experts=4", "checkpoint.every=3"]
    _run(tiny_cfg(tmp_path, *sp, steps=3))
    path = tmp_path / "checkpoints" / "step_00000002"
    assert not any("nm_masks" in k for k in _keys(path))
    from sparsetrain.train.offline_eval import single_process_model as _single_process_model

    cfg = tiny_cfg(tmp_path, *sp, "sparsity.refresh_every=4", steps=3)
    model, _, _ = _single_process_model(cfg, str(path))
    sp_ = nm_sparsifier(model)
    assert not sp_.slots
    x, y = Trainer(cfg).data.val_batch(0)
    with torch.no_grad():
        assert torch.isfinite(model(x, y).loss)
