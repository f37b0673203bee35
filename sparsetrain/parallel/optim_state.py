"""Adam(W) state helpers shared by re-sharding (parallel) and checkpoints (train)."""
from __future__ import annotations

import inspect

import torch

OPT_KEYS = ("exp_avg", "exp_avg_sq")


def step_device(group: dict, p: torch.Tensor) -> torch.device:
    """Where AdamW keeps a param's `step` counter: on its device for fused / capturable kernels, else the host."""
    return p.device if group.get("fused") or group.get("capturable") else torch.device("cpu")


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create zero Adam state for every param so a checkpoint or a re-shard can fill it in place."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=step_device(group, p))
                for k in OPT_KEYS:
                    st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)


def rebuild_optimizer(optimizer: torch.optim.Optimizer, replace: dict[torch.nn.Parameter, torch.nn.Parameter],
                      new_state: dict[torch.nn.Parameter, dict[str, torch.Tensor]]) -> torch.optim.Optimizer:
    """The same optimizer class and param-group settings with params swapped by `replace`; state of kept
    params carried over, state of new params from `new_state`."""
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [replace.get(p, p) for p in g["params"]]}
              for g in optimizer.param_groups]
    accepted = inspect.signature(type(optimizer).__init__).parameters  # AdamW's defaults hold keys it does not take
    new = type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})
    for g in new.param_groups:
        for p in g["params"]:
            if p in new_state:
                new.state[p] = new_state[p]
            elif p in optimizer.state:
                new.state[p] = optimizer.state[p]
    return new
