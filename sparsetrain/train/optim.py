"""AdamW with decay / no-decay groups and warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from sparsetrain.config import TrainConfig


def param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Matrices (and stacked expert weights) decay; norms, biases and vectors do not."""
    decay = [p for _, p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for _, p in params if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the given (name, param) list; the per-element update is the same on every strategy."""
    return torch.optim.AdamW(param_groups(named, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=1e-8, foreach=False)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
