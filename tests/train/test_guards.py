"""NaN policy (skip prints each step, max_skipped_steps ends the run, rollback, no non-finite checkpoint) and
the preemption stop request (checkpoint, stop, resume)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from sparsetrain.train import checkpoint as ckpt
from sparsetrain.train.guards import STOP, NonFiniteLossError, request_stop
from sparsetrain.train.trainer import Trainer
from tests.train.test_trainer import tiny_cfg

pytestmark = [pytest.mark.unit]


def _nan_at(tr: Trainer, bad: set[int]) -> None:
    """The CE loss is NaN on the training steps in `bad` (the step is read off the data call)."""
    current = {"step": -1}
    batch, fwd = tr.data.train_batch, tr.model.forward

    def train_batch(step: int):
        current["step"] = step
        return batch(step)

    def forward(idx, targets=None):
        out = fwd(idx, targets)
        if targets is not None and current["step"] in bad and tr.model.training:
            out.loss = out.loss * float("nan")
        return out

    tr.data.train_batch = train_batch
    tr.model.forward = forward


def test_skip_prints_every_skipped_step(tmp_path, capsys: pytest.CaptureFixture) -> None:
    tr = Trainer(tiny_cfg(tmp_path, "train.on_nan=skip", "train.max_skipped_steps=3"))
    _nan_at(tr, {1, 3})
    tr.fit()
    out = capsys.readouterr().out
    assert "step 1: non-finite loss nan; update skipped (1/3" in out
    assert "step 3: non-finite loss nan; update skipped (2/3" in out


def test_too_many_skipped_steps_end_the_run(tmp_path) -> None:
    tr = Trainer(tiny_cfg(tmp_path, "train.on_nan=skip", "train.max_skipped_steps=2", steps=8))
    _nan_at(tr, {1, 2, 3, 4})
    with pytest.raises(NonFiniteLossError, match=r"3 steps \(last: step 3\), more than train.max_skipped_steps=2"):
        tr.fit()


def test_no_checkpoint_from_non_finite_weights(tmp_path, capsys: pytest.CaptureFixture) -> None:
    tr = Trainer(tiny_cfg(tmp_path, "checkpoint.save_final=true", steps=2))
    tr.fit()
    good = ckpt.latest_checkpoint(tr.ckpt_dir)
    assert good is not None
    with torch.no_grad():
        next(tr.model.parameters()).fill_(float("nan"))
    assert tr.save(5) is None
    assert ckpt.latest_checkpoint(tr.ckpt_dir) == good
    assert "weights are not finite; no checkpoint written" in capsys.readouterr().out


def test_rollback_reloads_last_checkpoint_and_goes_on(tmp_path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    from sparsetrain.train import trainer as trainer_mod

    phases = []  # heartbeat phases entered outside the step's beats (the launcher's watcher reads them)
    monkeypatch.setattr(trainer_mod, "enter", lambda out, rank, phase: phases.append(phase))
    tr = Trainer(tiny_cfg(tmp_path, "train.on_nan=rollback", "checkpoint.every=2", steps=6))
    _nan_at(tr, {3})
    saved = {}
    save = tr.save

    def spy(step: int):
        saved[step] = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        return save(step)

    tr.save = spy
    step_fn = tr.train_step
    after = {}

    def train_step(step: int):
        rec = step_fn(step)
        after[step] = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        return rec

    tr.train_step = train_step
    summary = tr.fit()
    out = capsys.readouterr().out
    assert "step 3: non-finite loss nan; rolled back to the last checkpoint" in out
    assert "rolled back to step_00000001; training goes on with the batch of step 4" in out
    for n, t in saved[1].items():  # after the bad step the weights are those of the step-1 checkpoint
        torch.testing.assert_close(after[3][n], t, rtol=0, atol=0)
    assert summary["steps_run"] == 6 and torch.isfinite(torch.tensor(summary["final_loss"]))
    assert phases == ["load"]  # reading the checkpoint back is a long phase: no stall declared meanwhile


def test_the_wait_for_an_async_commit_at_the_end_is_a_long_phase(tmp_path) -> None:
    """The end of a run waits for the async save in flight: a slow store there is no stall for the watcher."""
    from sparsetrain.train import heartbeat

    Trainer(tiny_cfg(tmp_path, "checkpoint.async=true", "checkpoint.every=2", "checkpoint.save_final=false",
                     steps=3)).fit()
    last = heartbeat.beats(tmp_path)[0]
    assert (last.steps, last.phase) == (3, "save") and "save" in heartbeat.LONG_PHASES
    assert [p.name for p in ckpt.committed(tmp_path / "checkpoints")] == ["step_00000001"]


def test_rollback_without_checkpoint_is_an_error(tmp_path) -> None:
    tr = Trainer(tiny_cfg(tmp_path, "train.on_nan=rollback"))
    _nan_at(tr, {1})
    with pytest.raises(NonFiniteLossError, match="no committed checkpoint"):
        tr.fit()


def test_stop_request_checkpoints_and_resume_continues(tmp_path) -> None:
    cfg = tiny_cfg(tmp_path, "checkpoint.resume=true", steps=6)
    tr = Trainer(cfg)
    step_fn = tr.train_step

    def train_step(step: int):
        if step == 2:
            request_stop()  # as the SIGTERM handler / the Ray launcher would
        return step_fn(step)

    tr.train_step = train_step
    try:
        summary = tr.fit()
    finally:
        STOP.clear()
    assert summary["stopped_at_step"] == 2 and summary["steps_run"] == 3
    assert ckpt.latest_checkpoint(tr.ckpt_dir).name == "step_00000002"
    again = Trainer(cfg).fit()
    assert again["steps_run"] == 3 and "stopped_at_step" not in again


@pytest.mark.timeout(240)
def test_sigterm_inline_cli_saves_and_exits_zero(tmp_path) -> None:
    """`sparsetrain train` (one process) on SIGTERM: checkpoint, one line, exit 0."""
    args = [sys.executable, "-m", "sparsetrain.cli", "train", "--config", "tiny", "--set", f"train.out_dir={tmp_path}",
            "--set", "train.steps=100000", "--set", "train.log_every=1", "--set", "train.progress=false",
            "--set", "launch.workers=1", "--set", "parallel.strategy=none", "--set", "train.eval_every=0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step     2"):
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stop requested (SIGTERM)" in out and "Traceback" not in out
    found = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert found is not None
    assert json.loads((tmp_path / "summary.json").read_text())["stopped_at_step"] >= 2


@pytest.mark.timeout(300)
def test_sigterm_torchrun_cli_saves_and_exits_zero(tmp_path) -> None:
    """`sparsetrain train` under torchrun (2 ranks) on SIGTERM to its whole process group (timeout, a scheduler;
    torchrun, in its own group, gets it only as the launcher forwards it to the ranks): every rank checkpoints,
    no traceback, exit 0. torchrun itself answers SIGTERM with a SignalException traceback and a non-zero exit.
    (A SIGTERM to the launcher's pid alone takes the same forwarding path.)"""
    args = [sys.executable, "-m", "sparsetrain.cli", "train", "--config", "tiny", "--set", f"train.out_dir={tmp_path}",
            "--set", "train.steps=100000", "--set", "train.log_every=1", "--set", "train.progress=false",
            "--set", "launch.workers=2", "--set", "launch.backend=torchrun", "--set", "train.eval_every=0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.stdout is not None
    for line in proc.stdout:
        if "step     2" in line:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "stop requested (SIGTERM)" in out and "Traceback" not in out and "SignalException" not in out, out
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") is not None
    assert json.loads((tmp_path / "summary.json").read_text())["stopped_at_step"] >= 2


def test_nan_fault_mode_skip_and_rollback_end_in_the_same_weights(tmp_path, monkeypatch, capsys) -> None:
    """SPARSETRAIN_FAULTS=nan@3:0 poisons step 3's loss and gradients; skip drops the update, rollback reloads
    the step-2 checkpoint: both then continue from the same state, so their final weights are bit-equal."""
    monkeypatch.setenv("SPARSETRAIN_FAULTS", "nan@3:0")
    monkeypatch.delenv("SPARSETRAIN_ATTEMPT", raising=False)
    runs = {}
    for policy, extra in (("skip", ()), ("rollback", ("checkpoint.every=1",))):
        tr = Trainer(tiny_cfg(tmp_path / policy, f"train.on_nan={policy}", *extra, steps=5))
        summary = tr.fit()
        assert tr.nan_guard.skipped == [3] and summary["steps_run"] == 5, policy
        runs[policy] = dict(tr.model.named_parameters())
    out = capsys.readouterr().out
    assert "step 3: non-finite loss nan; update skipped" in out and "rolled back to step_00000002" in out
    for name, p in runs["skip"].items():
        assert torch.isfinite(p).all() and torch.equal(p, runs["rollback"][name]), name
    faults = [json.loads(ln) for ln in (tmp_path / "skip" / "faults.jsonl").read_text().splitlines()]
    assert faults[0]["mode"] == "nan" and faults[0]["step"] == 3



@pytest.mark.distributed
def test_rollback_under_fssdp_after_ownership_moved(tmp_path, monkeypatch) -> None:
    """FSSDP re-shards expert ownership after step 2, then step 3's loss is NaN: the rollback to step 1's checkpoint
    restores its owners before its weights and rebuilds the optimizer over them, as a resume does, and training
    matches the single-process run with the same rollback (fp64: skewed routing has near-tied scores). Loading the
    weights first left zeroed, frozen experts (the optimizer held the replaced parameters; the next save refused)."""
    from tests.dist_utils import run_distributed
    from tests.parity_utils import _parity_body, assert_same_training, run_reference, small_config

    cfg = small_config("parallel.strategy=fssdp", "train.on_nan=rollback", "checkpoint.every=2", "moe.router_skew=1.5",
                       "parallel.fssdp.reshard_every=3", "parallel.fssdp.cost_gate=false",
                       "parallel.fssdp.planner=none", steps=6)
    fault = {"SPARSETRAIN_FAULTS": "nan@3:0", "SPARSETRAIN_ATTEMPT": "0"}
    # to the ranks only: a forkserver started now would hand this environment to every later test's ranks
    got = run_distributed(_parity_body, 2, cfg, str(tmp_path / "fssdp"), True, env=fault, timeout=300)[0]
    for k, v in fault.items():
        monkeypatch.setenv(k, v)  # the single-process reference runs here
    assert got["reshards"] >= 1 and got["reshard_moves"] > 0, got["reshards"]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref = run_reference(cfg, str(tmp_path / "none"))
    finally:
        torch.set_default_dtype(default)
    assert len(got["losses"]) == len(ref["losses"]) == 6 and torch.isnan(torch.tensor(got["losses"][3]))
    for r in (ref, got):
        r["losses"] = r["losses"][:3] + r["losses"][4:]  # step 3's NaN: the step rolled back
    assert_same_training(ref, got)


def test_a_skipped_step_leaves_no_routing_counts_for_the_bias_update(tmp_path) -> None:
    """moe.balance=aux_free: the counts a skipped step routed are dropped with it (they were added to the next
    successful step's bias update)."""
    tr = Trainer(tiny_cfg(tmp_path, "train.on_nan=skip", "moe.balance=aux_free", steps=4))
    _nan_at(tr, {3})
    tr.fit()
    assert tr.nan_guard.skipped == [3]
    assert all(float(m.router._pending_counts.sum()) == 0 for m in tr.model.moe_layers())
