"""Experiment trackers beside metrics.jsonl: TensorBoard event files (default), MLflow or W&B when installed.

Each tracker is imported only when a run asks for it (`train.trackers`), never by `import sparsetrain`.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def tracker_available(name: str) -> bool:
    """True when the package behind tracker `name` can be imported."""
    return importlib.util.find_spec(TRACKER_PACKAGES[name]) is not None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def scalars(rec: dict[str, Any]) -> dict[str, float]:
    """The finite numeric values of a metrics record (no step); a per-rank list becomes `<key>_max`."""
    out = {k: float(v) for k, v in rec.items() if k != "step" and _number(v)}
    for k, v in rec.items():
        if isinstance(v, list) and v and all(_number(x) for x in v):
            out[f"{k}_max"] = float(max(v))
    return out


def load_image(counts: list[list[float]], cell: int = 8) -> torch.Tensor:
    """[layers, experts] token counts -> [layers*cell, experts*cell] grey image in [0, 1], rows normalized."""
    t = torch.tensor(counts, dtype=torch.float32)  # [L, E]
    t = t / t.amax(dim=1, keepdim=True).clamp_min(1e-9)
    return t.repeat_interleave(cell, 0).repeat_interleave(cell, 1)  # [L*cell, E*cell]


class _TensorBoard:
    def __init__(self, out_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=start_step or None)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def image(self, step: int, name: str, img: torch.Tensor) -> None:
        self.w.add_image(name, img, step, dataformats="HW")

    def close(self) -> None:
        self.w.close()


class _MLflow:
    def __init__(self, out_dir: Path, start_step: int) -> None:
        import mlflow

        self.m = mlflow
        self.run = mlflow.start_run(run_name=out_dir.name)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.m.log_metrics(values, step=step)

    def image(self, step: int, name: str, img: torch.Tensor) -> None:
        self.m.log_image(img.numpy(), key=name, step=step)

    def close(self) -> None:
        self.m.end_run()


class _WandB:
    def __init__(self, out_dir: Path, start_step: int) -> None:
        import wandb

        self.wb = wandb
        self.run = wandb.init(project="sparsetrain", name=out_dir.name, dir=str(out_dir), resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, name: str, img: torch.Tensor) -> None:
        self.run.log({name: self.wb.Image(img.numpy())}, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, Callable[[Path, int], Any]] = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


def open_trackers(names: list[str], out_dir: Path, start_step: int) -> list[Any]:
    """Start the named trackers; one that is not installed is skipped with a one-line note."""
    out = []
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}; known: {sorted(TRACKERS)}")
        if not tracker_available(name):
            print(f"note: tracker {name} skipped ({TRACKER_PACKAGES[name]} is not installed)", file=sys.stderr)
            continue
        out.append(TRACKERS[name](out_dir, start_step))
    return out
