"""Expert parallelism equals single-process training on the same global batch."""
from __future__ import annotations

import pytest

from tests.parity_utils import check_parity, small_config

pytestmark = [pytest.mark.distributed]


@pytest.mark.parametrize("world,extra", [(2, []), (4, []), (4, ["parallel.ep_size=2"]), (2, ["parallel.dense=ddp"]),
                                         (4, ["parallel.ep_size=2", "parallel.dense=ddp"]),
                                         (2, ["train.grad_accum=2"]),
                                         (4, ["parallel.ep_placement=balanced", "moe.router_skew=1.2"])])
def test_ep_matches_single_process(tmp_path, world, extra):
    fp64 = any(o.startswith("moe.router_skew=") for o in extra)  # quota routing: see check_parity
    res = check_parity(world, small_config("parallel.strategy=ep", *extra, steps=5), tmp_path, fp64=fp64)
    if "parallel.ep_placement=balanced" in extra:  # ranks compute what the balanced placement predicts
        import torch

        from sparsetrain.config import config_from_dict
        from sparsetrain.model.workloads import RoutingWorkload
        from sparsetrain.parallel.placement import balanced_owners

        cfg = config_from_dict(small_config("parallel.strategy=ep", *extra, steps=5))
        wl = RoutingWorkload.from_config(cfg.moe)
        loads = torch.stack([wl.mean_target(li, 5) for li in range(2)])  # [L, E]
        owners = torch.tensor(balanced_owners(loads, world))  # [L, E]
        per_rank = torch.zeros(2, world, dtype=torch.float64).scatter_add_(1, owners, loads)  # [L, world]
        predicted = float(per_rank.sum(0).max() / per_rank.sum(0).mean())
        assert abs(res["last"]["rank_tokens_max_mean"] - predicted) < 0.05, (res["last"], predicted)
