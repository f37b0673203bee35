"""The run's numbers for people: throughput over an interval (step time, tokens/s, TFLOP/s, MFU) and the
end-of-run summary table / summary.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sparsetrain.config import Config
from sparsetrain.telemetry.flops import model_size, peak_tflops, train_flops_per_token
from sparsetrain.telemetry.memory import gather_peak_mib
from sparsetrain.telemetry.metrics import placement_table, summary_table
from sparsetrain.train.location import upload_logs

__all__ = ["run_summary", "throughput"]


def throughput(cfg: Config, device: torch.device, world: int, seconds: float, steps: int) -> dict[str, float]:
    """Step time, global tokens/s, model TFLOP/s per rank and MFU over `steps` training steps."""
    tokens = cfg.data.batch_size * cfg.model.seq_len * steps
    tok_s = tokens / max(seconds, 1e-9)
    tflops = train_flops_per_token(cfg) * tok_s / world / 1e12
    out = {"step_ms": 1000 * seconds / max(steps, 1), "tokens_per_s": tok_s, "tflops_per_rank": tflops}
    peak = peak_tflops(cfg, device)
    if peak > 0:
        out["mfu"] = tflops / peak
    return out


def run_summary(tr: Any, elapsed: float, val_loss: float | None) -> dict[str, Any]:
    """The end-of-run summary (every rank calls it: peak memory is gathered); rank 0 writes summary.json
    and prints it."""
    last = tr.history[-1] if tr.history else {}
    end = tr.cfg.train.steps if tr.stopped_at is None else tr.stopped_at + 1
    steps_run = max(0, end - tr.start_step)  # resumed past train.steps: nothing run
    size = model_size(tr.cfg)
    peaks = gather_peak_mib(tr.memory)  # every rank calls _summary
    summary = {
        "steps": tr.cfg.train.steps, "steps_run": steps_run, "final_loss": last.get("loss"),
        "val_loss": val_loss, "elapsed_s": elapsed,
        **(throughput(tr.cfg, tr.device, tr.info.world, tr.train_s, steps_run) if steps_run > 0 else {}),
        "params_total": size.total, "params_active": size.active, "world": tr.info.world,
        "peak_memory_mib": [round(p, 1) for p in peaks],
        **tr.strategy.describe(),
    } | ({"stopped_at_step": tr.stopped_at} if tr.stopped_at is not None else {})
    for k in ("expert_load_max_mean", "expert_busy_max_mean", "spag_MB", "sprs_MB", "reshard_MB", "a2a_MB",
              "rank_tokens_max_mean", "dropped_slots", "offload_MB", "offload_tensors", "offload_pool_MB",
              "offload_pool_peak_MB", "offload_pool_full_tensors"):
        if k in last:
            summary[k] = last[k]
    if tr.offload is not None:
        summary["offload_max_host_MiB"] = tr.cfg.offload.max_host_mib or "unbounded"
    summary.update(tr.activation_report)
    if tr.info.is_main:
        from sparsetrain.parallel.memory_plan import memory_plan

        if steps_run == 0:  # a rerun of a finished run: its figures stay those of the run that trained
            summary = _with_trained_figures(summary, tr.out_dir / "summary.json")

        summary["plan_memory_mib"] = round(memory_plan(tr.cfg, tr.info.world, tr.device.type).max_mib, 1)
        tr.out_dir.mkdir(parents=True, exist_ok=True)
        (tr.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        upload_logs(tr.cfg.train.out_dir)
        rows = [(k, v) for k, v in summary.items() if not isinstance(v, (dict, list))]
        print(summary_table(rows), flush=True)
        for k, v in summary.items():
            if k == "hottest_placement":
                print(placement_table(v), flush=True)
            elif isinstance(v, (dict, list)):
                print(f"{k}: {json.dumps(v)}", flush=True)
    return summary


def _with_trained_figures(fresh: dict[str, Any], path: Path) -> dict[str, Any]:
    """`fresh` (a rerun that trained nothing) over the figures of the run that trained (its summary.json):
    throughput, peak memory and placement stay that run's; the val loss is the fresh one."""
    try:
        trained = json.loads(path.read_text())
    except (OSError, ValueError):
        return fresh
    if not isinstance(trained, dict) or not trained.get("steps_run"):
        return fresh
    return fresh | {k: v for k, v in trained.items() if k not in ("val_loss", "elapsed_s")}
