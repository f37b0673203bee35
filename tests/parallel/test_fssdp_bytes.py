"""FSSDP byte counters equal the FSSDP.md formula: spAG bytes = sum_c |P1(c) minus P0(c)| * chunk_bytes."""
from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.parity_utils import small_config

pytestmark = [pytest.mark.distributed]


def _body(rank: int, world: int, cfg_dict: dict, out: str) -> list[dict]:
    import torch
    import torch.distributed as dist

    from sparsetrain.config import config_from_dict
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.telemetry.comm import COMM
    from sparsetrain.train.trainer import Trainer

    cfg_dict = {**cfg_dict, "train": {**cfg_dict["train"], "out_dir": out}}
    tr = Trainer(config_from_dict(cfg_dict), init_distributed("cpu"))
    rows = []
    for step in range(4):
        placements = list(tr.strategy.placements)
        COMM.reset()
        tr.train_step(step)
        got = torch.tensor([COMM.snapshot().get("spag", 0), COMM.snapshot().get("sprs", 0)], dtype=torch.float64)
        dist.all_reduce(got)
        codec = tr.strategy.codec
        chunk = codec.row_bytes if codec is not None else tr.strategy.chunk_bytes
        formula = sum(p.spag_bytes(chunk) for p in placements)
        grad_formula = sum(p.spag_bytes(tr.strategy.chunk_bytes) for p in placements)  # spRS moves dense grads
        copies = sum(len(c) - 1 for p in placements for c in p.copies)
        rows.append({"spag": int(got[0]), "sprs": int(got[1]), "formula": formula, "grad_formula": grad_formula,
                     "copies": copies, "compressed": codec is not None})
    return rows


@pytest.mark.parametrize("keep,sparse", [(False, False), (True, False), (False, True)])
def test_spag_sprs_bytes_equal_formula(tmp_path, keep, sparse):
    extra = ["sparsity.enabled=true", "sparsity.modules=[experts]"] if sparse else []
    cfg = small_config("parallel.strategy=fssdp", "moe.router_skew=1.2", "parallel.fssdp.overlap_budget=3",
                       f"parallel.fssdp.keep_materialized={str(keep).lower()}", *extra, steps=4)
    rows = run_distributed(_body, 4, cfg, str(tmp_path))[0]
    for r in rows:
        assert r["copies"] > 0  # hot experts are replicated, so bytes move
        assert r["compressed"] == sparse
        gathers = 1 if keep else 2  # forward gather, plus the backward re-gather when copies are released
        assert r["spag"] == gathers * r["formula"], r
        assert r["sprs"] == r["grad_formula"], r
        if sparse:  # 2:4 fp32: values are half the bytes, positions 2 bits each
            assert r["formula"] <= 0.54 * r["grad_formula"], r
