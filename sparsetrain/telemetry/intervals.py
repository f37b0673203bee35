"""Interval means: every logged record carries the mean of each per-step scalar, and of each collective's bytes,
since the previous log."""
from __future__ import annotations

import math
from typing import Any

# per-step scalars averaged over the interval; `loss` also keeps the interval's last step as `loss_last`
MEAN_KEYS = ("loss", "aux_loss", "z_loss", "grad_norm", "fwd_s", "bwd_s", "expert_load_max_mean")
LAST_KEYS = ("loss",)


class IntervalMeans:
    """Accumulates per-step scalars; `finish(rec)` turns the logged record's values into interval means."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.comm: dict[str, int] = {}
        self.steps = 0
        self.seconds = 0.0  # training-step wall time over the interval (no eval / checkpoint)

    def add_comm(self, step_bytes: dict[str, int]) -> None:
        """Count one step's bytes per collective (this rank's; sent to peers)."""
        for k, v in step_bytes.items():
            self.comm[k] = self.comm.get(k, 0) + v

    def comm_per_step(self) -> dict[str, float]:
        """Bytes per collective per step, this rank's mean over the interval (a re-shard's bytes show even when
        it did not fall on the logged step)."""
        return {k: v / max(self.steps, 1) for k, v in self.comm.items()}

    def add(self, rec: dict[str, Any], seconds: float = 0.0) -> None:
        """Count one step's record and its wall time (skipped steps count for `steps` and `seconds` but not for
        the means)."""
        self.steps += 1
        self.seconds += seconds
        if rec.get("skipped"):
            return
        for k in MEAN_KEYS:
            v = rec.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
                self.counts[k] = self.counts.get(k, 0) + 1

    def finish(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Replace the step values in `rec` by interval means (last step kept as `<key>_last`); reset."""
        for k in LAST_KEYS:
            if k in rec:
                rec[f"{k}_last"] = rec[k]
        for k, n in self.counts.items():
            rec[k] = self.sums[k] / n
        rec["interval_steps"] = self.steps
        self.sums, self.counts, self.comm, self.steps, self.seconds = {}, {}, {}, 0, 0.0
        return rec
