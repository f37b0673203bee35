"""Parallel strategies as passes over a single-device model; registry keyed by `parallel.strategy`."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparsetrain.config import Config
from sparsetrain.parallel.mesh import DistInfo
from sparsetrain.parallel.strategy import DataParallel, Strategy


def _ep(cfg: Config, info: DistInfo) -> Strategy:
    from sparsetrain.parallel.ep import ExpertParallel

    return ExpertParallel(cfg, info)


def _fssdp(cfg: Config, info: DistInfo) -> Strategy:
    from sparsetrain.parallel.fssdp import FSSDP

    return FSSDP(cfg, info)


def _deepspeed_moe(cfg: Config, info: DistInfo) -> Strategy:
    from sparsetrain.parallel.peers.deepspeed_moe import DeepSpeedMoE

    return DeepSpeedMoE(cfg, info)


def _megatron_moe(cfg: Config, info: DistInfo) -> Strategy:
    from sparsetrain.parallel.peers.megatron_moe import MegatronMoE

    return MegatronMoE(cfg, info)


STRATEGIES: dict[str, Callable[[Config, DistInfo], Strategy]] = {
    "none": lambda cfg, info: Strategy(cfg, info),
    "dp": lambda cfg, info: DataParallel(cfg, info),
    "ep": _ep,
    "fssdp": _fssdp,
    "deepspeed_moe": _deepspeed_moe,  # peers: their modules import DeepSpeed / Megatron-Core lazily
    "megatron_moe": _megatron_moe,
}


def build_strategy(cfg: Config, info: DistInfo) -> Any:
    """Instantiate `parallel.strategy`; every strategy also runs on a single process."""
    name = cfg.parallel.strategy
    if name not in STRATEGIES:
        raise ValueError(f"unknown parallel.strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    if info.world == 1 and name in ("dp",):
        name = "none"
    return STRATEGIES[name](cfg, info)
