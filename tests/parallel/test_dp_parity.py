"""Data parallelism equals single-process training on the same global batch: experts sharded with the dense
parameters (FSDP2, the default) or replicated (DDP). Under FSDP2 each rank initialises only its shard of the
stacked expert weights, from the generators of the global expert ids it holds (a hostile parity pass found
rank 1 seeding its experts 4-7 as experts 0-3)."""
from __future__ import annotations

import pytest

from tests.parity_utils import check_parity, small_config

pytestmark = [pytest.mark.distributed]


@pytest.mark.parametrize("world,extra", [(2, []), (4, ["train.grad_accum=2"]), (2, ["parallel.dense=ddp"])])
def test_dp_matches_single_process(tmp_path, world, extra):
    check_parity(world, small_config("parallel.strategy=dp", *extra, steps=4), tmp_path)
