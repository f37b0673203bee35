"""Trainer on one process: loss goes down, metrics.jsonl, NaN handling, grad accumulation, bf16."""
from __future__ import annotations

import json
import math

import pytest
import torch

from sparsetrain.config import Config, load_config
from sparsetrain.train.trainer import NonFiniteLossError, Trainer

pytestmark = [pytest.mark.unit]

TINY = [
    "launch.workers=1", "parallel.strategy=none", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
    "model.seq_len=32", "moe.num_experts=4", "moe.top_k=2", "moe.d_ffn=32", "data.batch_size=8",
    "data.eval_batches=2", "train.warmup_steps=2", "train.progress=false", "train.eval_every=0",
    "train.log_every=1", "checkpoint.save_final=false", "checkpoint.resume=false", "train.device=cpu",
]


def tiny_cfg(tmp_path, *extra: str, steps: int = 5) -> Config:
    """A CPU-sized single-process config writing under tmp_path."""
    return load_config("tiny", TINY + [f"train.steps={steps}", f"train.out_dir={tmp_path}", *extra])


def _records(path) -> list[dict]:
    return [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_loss_decreases_and_metrics_jsonl(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.log_every=5", "train.eval_every=10", "train.lr=0.01", "train.min_lr=0.001",
                   steps=30)
    tr = Trainer(cfg)
    summary = tr.fit()
    recs = _records(tmp_path)
    assert [r["step"] for r in recs] == [4, 9, 14, 19, 24, 29]
    for r in recs:
        assert {"step", "loss", "tokens_per_s", "lr", "grad_norm", "aux_loss", "z_loss", "step_ms",
                "tflops_per_rank", "peak_memory_mib"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
        # tokens/s and step time describe the same steps: batch x seq tokens per step
        assert r["tokens_per_s"] * r["step_ms"] / 1000 == pytest.approx(8 * 32, rel=1e-6)
        assert len(r["peak_memory_mib"]) == 1 and r["peak_memory_mib"][0] > 0
        assert "mfu" not in r  # CPU without train.peak_tflops: no MFU claimed
        assert ("val_loss" in r) == ((r["step"] + 1) % 10 == 0)
    first, last = recs[0]["loss"], recs[-1]["loss"]
    assert last < first - 0.5, [r["loss"] for r in recs]
    assert recs[-1]["val_loss"] < math.log(256) - 0.5
    assert summary["steps_run"] == 30 and summary["final_loss"] == last
    assert summary["params_total"] == sum(p.numel() for p in tr.model.parameters())  # one process: all of it
    assert summary["params_active"] < summary["params_total"]
    assert "params" not in summary and len(summary["peak_memory_mib"]) == 1
    assert summary["plan_memory_mib"] > 0  # `sparsetrain plan` for this run, beside the measured peak
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 30
    loads = [json.loads(ln) for ln in (tmp_path / "expert_loads.jsonl").read_text().splitlines()]
    assert len(loads) == 30 and len(loads[0]["counts"]) == 2  # one row per step, one list per MoE layer
    assert sum(loads[0]["counts"][0]) == 8 * 32 * 2  # tokens x top_k


def _nan_at(tr: Trainer, bad_step: int) -> None:
    """Make the model's CE loss NaN on `bad_step` (the step is read off the data call)."""
    current = {"step": -1}
    batch, fwd = tr.data.train_batch, tr.model.forward

    def train_batch(step):
        current["step"] = step
        return batch(step)

    def forward(idx, targets=None):
        out = fwd(idx, targets)
        if targets is not None and current["step"] == bad_step and tr.model.training:
            out.loss = out.loss * float("nan")
        return out

    tr.data.train_batch = train_batch
    tr.model.forward = forward


def test_nan_loss_raises_naming_step(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path))
    _nan_at(tr, 2)
    with pytest.raises(NonFiniteLossError, match=r"step 2\b"):
        tr.fit()
    assert [r["step"] for r in tr.history] == [0, 1]


def test_nan_loss_skipped_with_on_nan_skip(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path, "train.on_nan=skip"))
    _nan_at(tr, 2)
    snapshots = {}
    step_fn = tr.train_step

    def train_step(step):
        rec = step_fn(step)
        snapshots[step] = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        return rec

    tr.train_step = train_step
    tr.fit()
    recs = {r["step"]: r for r in _records(tmp_path)}
    assert sorted(recs) == [0, 1, 2, 3, 4]
    assert recs[2].get("skipped") is True and math.isnan(recs[2]["loss"])
    assert all(not recs[s].get("skipped") and math.isfinite(recs[s]["loss"]) for s in (0, 1, 3, 4))
    for n, p in snapshots[2].items():  # the skipped step changed no weight
        assert torch.equal(p, snapshots[1][n]), n
    assert any(not torch.equal(p, snapshots[2][n]) for n, p in snapshots[3].items())
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


@pytest.mark.parametrize("balance,aux_coef,tol", [("aux_loss", 0.0, 1e-5), ("aux_free", 0.0, 1e-5),
                                                   ("aux_loss", 0.01, 1e-4)])
def test_grad_accum_matches_single_micro_batch(tmp_path, balance, aux_coef, tol):
    # CE and z-loss are means over equal micro-batches, so accumulation is exact up to rounding. The Switch aux
    # loss uses f and P of each micro-batch (not linear in the batch), so with it on the match is only close.
    extra = [f"moe.balance={balance}", f"moe.aux_loss_coef={aux_coef}"]
    a = Trainer(tiny_cfg(tmp_path / "a", *extra, "train.grad_accum=1", steps=4))
    a.fit()
    b = Trainer(tiny_cfg(tmp_path / "b", *extra, "train.grad_accum=2", steps=4))
    b.fit()
    la, lb = [r["loss"] for r in a.history], [r["loss"] for r in b.history]
    assert la[0] == pytest.approx(lb[0], rel=1e-6)
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=tol, atol=tol)
    if balance == "aux_free":
        torch.testing.assert_close(b.model.layers[0].ffn.router.expert_bias, a.model.layers[0].ffn.router.expert_bias)
        assert torch.count_nonzero(a.model.layers[0].ffn.router.expert_bias) > 0


def test_bf16_autocast_runs(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path, "train.precision=bf16", "train.eval_every=3", steps=3))
    summary = tr.fit()
    assert all(math.isfinite(r["loss"]) for r in tr.history)
    assert math.isfinite(summary["val_loss"])
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # autocast, fp32 master weights


def test_a_rerun_of_a_finished_run_keeps_its_trained_figures(tmp_path):
    args = ("checkpoint.save_final=true", "checkpoint.resume=true", "train.eval_every=0")
    first = Trainer(tiny_cfg(tmp_path, *args, steps=3)).fit()
    assert first["steps_run"] == 3 and first["step_ms"] > 0
    again = Trainer(tiny_cfg(tmp_path, *args, steps=3)).fit()  # resumes at step 3 of 3: trains nothing
    stored = json.loads((tmp_path / "summary.json").read_text())
    for k in ("steps_run", "step_ms", "tokens_per_s", "final_loss", "peak_memory_mib"):
        assert stored[k] == again[k] == json.loads(json.dumps(first[k])), k
