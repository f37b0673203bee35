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


@pytest.mark.parametrize("world,extra", [(2, []), (4, ["parallel.ep_size=2"])])
def test_ep_experts_without_tokens_still_take_their_adamw_step(tmp_path, world, extra):
    """A routing trace sends no token to experts 4-7 of layer 0 after step 0 (one EP rank's experts with ep_size 2).
    Their gradient is zero, not absent: AdamW still moves them (momentum, weight decay) as in one process, and
    with ep_size < world the replicas all-reduce the same tensors (absent grads packed different buffers: gloo
    aborted)."""
    import json

    trace = tmp_path / "cold.jsonl"
    rows = [[[1] * 8, [1] * 8]] + [[[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]] * 5
    trace.write_text("".join(json.dumps({"step": t, "counts": c}) + "\n" for t, c in enumerate(rows)))
    check_parity(world, small_config("parallel.strategy=ep", f"moe.routing_trace={trace}", *extra, steps=5),
                 tmp_path, fp64=True)
