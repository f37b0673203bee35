"""Capacity mode across ranks is exact: each rank drops over its own tokens (GShard/DeepSpeed local capacity),
so a w-rank run equals a single process that sees the same shards as w micro-batches (grad_accum = w)."""
from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.parity_utils import _parity_body, assert_same_training, run_reference, small_config

pytestmark = [pytest.mark.distributed]


@pytest.mark.parametrize("strategy,extra", [("ep", []), ("fssdp", ["moe.router_skew=1.2"])])
def test_capacity_mode_matches_single_process_per_shard(tmp_path, strategy, extra):
    # fp64: a drop decision is discontinuous in the gate scores, so in fp32 a near-tie at the capacity boundary
    # can flip on float reassociation (GEMM over both ranks' tokens vs per micro-batch); in fp64 none does.
    # aux loss off: its expert fractions come from the step's whole batch across ranks but per micro-batch in
    # the single-process reference; everything else (which slots drop, renormalized weights, grads) must agree.
    cfg = small_config(f"parallel.strategy={strategy}", "moe.capacity_factor=1.0", "moe.aux_loss_coef=0",
                       *extra, steps=4)
    world = 2
    ref_cfg = {**cfg, "train": {**cfg["train"], "grad_accum": world}}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref = run_reference(ref_cfg, str(tmp_path / "ref"))
    finally:
        torch.set_default_dtype(default)
    got = run_distributed(_parity_body, world, cfg, str(tmp_path / "dist"), True)
    assert_same_training(ref, got[0], rtol=1e-9, atol=1e-10)
    assert got[0]["last"]["dropped_slots"] > 0 and got[0]["last"]["dropped_slots"] == ref["last"]["dropped_slots"]
