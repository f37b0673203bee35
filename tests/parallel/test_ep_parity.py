"""Expert parallelism equals single-process training on the same global batch."""
from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.parity_utils import assert_same_training, run_reference, small_config, train_and_collect

pytestmark = [pytest.mark.distributed]


def _body(rank: int, world: int, cfg: dict, out: str) -> dict:
    res = train_and_collect(cfg, out)
    return res if rank == 0 else {"losses": res["losses"]}


@pytest.mark.parametrize("world,extra", [(2, []), (4, []), (4, ["parallel.ep_size=2"]), (2, ["parallel.dense=ddp"])])
def test_ep_matches_single_process(tmp_path, world, extra):
    cfg = small_config("parallel.strategy=ep", *extra, steps=5)
    ref = run_reference(cfg, str(tmp_path / "ref"))
    results = run_distributed(_body, world, cfg, str(tmp_path / "ep"))
    assert_same_training(ref, results[0])
    for r in results[1:]:
        assert r["losses"] == results[0]["losses"]
