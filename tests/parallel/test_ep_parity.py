"""Expert parallelism equals single-process training on the same global batch."""
from __future__ import annotations

import pytest

from tests.parity_utils import check_parity, small_config

pytestmark = [pytest.mark.distributed]


@pytest.mark.parametrize("world,extra", [(2, []), (4, []), (4, ["parallel.ep_size=2"]), (2, ["parallel.dense=ddp"]),
                                         (2, ["train.grad_accum=2"])])
def test_ep_matches_single_process(tmp_path, world, extra):
    check_parity(world, small_config("parallel.strategy=ep", *extra, steps=5), tmp_path)
