"""Schedules: mask decay beta(t) and structure-decay stages (Progressive Gradient Flow style)."""
from __future__ import annotations

from sparsetrain.sparsity.config import NMConfig


def mask_decay_beta(step: int, decay_steps: int) -> float:
    """Scale on pruned weights: linear 1 -> 0 over decay_steps; 0 when decay is off."""
    if decay_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / decay_steps)


def structure_stage(step: int, cfg: NMConfig) -> tuple[int, int, int]:
    """(stage index, n, m) at optimizer step `step`; the last stage is the target n:m."""
    stages = cfg.stages()
    if cfg.structure_decay_every <= 0:
        i = len(stages) - 1
    else:
        i = min(step // cfg.structure_decay_every, len(stages) - 1)
    return i, stages[i][0], stages[i][1]


def stage_start(stage: int, cfg: NMConfig) -> int:
    """First optimizer step of a stage (mask decay restarts there)."""
    return stage * cfg.structure_decay_every if cfg.structure_decay else 0


def beta_at(step: int, cfg: NMConfig) -> float:
    """beta(t) counted from the start of the current structure stage."""
    stage, _, _ = structure_stage(step, cfg)
    return mask_decay_beta(step - stage_start(stage, cfg), cfg.mask_decay_steps)
