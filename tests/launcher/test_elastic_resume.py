"""launch.min_workers end to end: a 4-rank run loses a rank, the restarted group finds room for only 2 and resumes
on 2 ranks with grad_accum 2 from the same checkpoint; the final parameters match an uninterrupted run's within
float tolerance (gloo, CPU)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from sparsetrain.launcher import elastic
from sparsetrain.launcher.restart import run_with_restarts
from sparsetrain.launcher.run import run_torchrun

from sparsetrain.config import load_config, to_dict
from sparsetrain.model.gpt import build_model
from sparsetrain.train.checkpoint import load_checkpoint

# aux_loss_coef=0: the load-balancing loss is a product of per-micro-batch means, so it changes with the
# micro-batch size; CE and z-loss are per-token means (equal micro-batches: the same gradient, other sums)
RUN = ["model.d_model=64", "model.n_layers=2", "model.seq_len=32", "moe.d_ffn=64", "moe.aux_loss_coef=0",
       "data.batch_size=8", "train.steps=5", "train.log_every=1", "train.eval_every=0", "train.warmup_steps=2",
       "checkpoint.every=2", "parallel.strategy=fssdp", "parallel.pretend_nodes=0", "launch.torch_threads=1",
       "launch.backend=torchrun"]
FAULT_ENV = ("SPARSETRAIN_FAIL_RANK", "SPARSETRAIN_FAIL_STEP", "SPARSETRAIN_FAIL_MODE", "SPARSETRAIN_ATTEMPT")
# Measured max |diff| 6.8e-7 (fp32 Adam, 5 steps): the gradient is summed in another order (2 micro-batches x
# 2 ranks instead of 1 x 2), so bit equality is not expected; the bound leaves two orders of magnitude.
ATOL, RTOL = 2e-5, 1e-4


def _final(out_dir: Path) -> dict[str, torch.Tensor]:
    model = build_model(load_config("tiny", [*RUN, f"train.out_dir={out_dir}"]))
    load_checkpoint(out_dir / "checkpoints" / "step_00000004", model, None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_ranks_lose_two_and_resume_on_two_with_grad_accum(tmp_path, monkeypatch, capfd):
    for k in FAULT_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SPARSETRAIN_PROGRESS", "0")
    ref = tmp_path / "ref"
    run_torchrun(to_dict(load_config("tiny", [*RUN, f"train.out_dir={ref}", "launch.workers=2"])))

    for k, v in {"SPARSETRAIN_FAIL_RANK": "3", "SPARSETRAIN_FAIL_STEP": "3", "SPARSETRAIN_FAIL_MODE": "kill"}.items():
        monkeypatch.setenv(k, v)
    # a node with 2 of the 4 ranks is gone after the failure: the restart can place only 2 workers
    monkeypatch.setattr(elastic, "local_placeable", lambda c: 4 if os.environ["SPARSETRAIN_ATTEMPT"] == "0" else 2)
    out = tmp_path / "elastic"
    cfg = to_dict(load_config("tiny", [*RUN, f"train.out_dir={out}", "launch.workers=4", "launch.min_workers=2",
                                       "launch.max_failures=1"]))
    logs: list[str] = []
    summary = run_with_restarts(cfg, run_torchrun, logs.append)
    assert summary is not None and summary["world"] == 2
    assert len(logs) == 1 and logs[0].endswith("resuming from the checkpoint at 2 steps, 1 step(s) redone"), logs
    cap = capfd.readouterr()
    err = cap.out + cap.err
    assert ("elastic: 2 of launch.workers=4 worker(s) can be placed; continuing on 2 rank(s) with "
            "train.grad_accum 1 -> 2 (global batch data.batch_size=8 kept)") in err
    assert "config changed since step_00000001 (run control, allowed): launch.workers 4 -> 2" in err
    got, want = _final(out), _final(ref)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"elastic 4 -> 2 vs uninterrupted 2-rank: max |diff| {worst:.3g}")
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=ATOL, rtol=RTOL, msg=k)
