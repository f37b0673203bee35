"""FSSDP equals single-process training on the same global batch, for any placement and re-sharding."""
from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.parity_utils import assert_same_training, run_reference, small_config, train_and_collect

pytestmark = [pytest.mark.distributed]


def _body(rank: int, world: int, cfg: dict, out: str) -> dict:
    res = train_and_collect(cfg, out)
    return res if rank == 0 else {"losses": res["losses"]}


CASES = {
    "2r": (2, []),
    "4r_2nodes_reshard": (4, ["parallel.pretend_nodes=2", "parallel.fssdp.reshard_every=4"]),
    "4r_keep": (4, ["parallel.fssdp.keep_materialized=true", "parallel.fssdp.reshard_every=3"]),
    "2r_skew_ddp": (2, ["moe.router_skew=1.2", "parallel.dense=ddp", "parallel.fssdp.reshard_every=5"]),
    "4r_2experts_reshard": (4, ["moe.num_experts=2", "moe.router_skew=1.6", "parallel.fssdp.reshard_every=2"]),
    "4r_nopf_t1": (4, ["parallel.fssdp.prefetch=false", "parallel.fssdp.overlap_budget=1", "moe.router_skew=1.2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fssdp_matches_single_process(tmp_path, case):
    world, extra = CASES[case]
    cfg = small_config("parallel.strategy=fssdp", *extra, steps=10)
    ref = run_reference(cfg, str(tmp_path / "ref"))
    results = run_distributed(_body, world, cfg, str(tmp_path / "fssdp"))
    assert_same_training(ref, results[0])
    for r in results[1:]:
        assert r["losses"] == results[0]["losses"]
