"""train.grad_reduce_dtype applies in either precision, as FSDP2's MixedPrecisionPolicy(reduce_dtype=...) does
for fp32 parameters (torchtitan's mixed_precision_reduce): under train.precision=fp32 with bf16 it is the FSDP2
reduce-scatter's, the FSSDP spRS's and the flat all-reduces' (parallel.dense=ddp, EP's expert replicas) dtype
too (it was silently ignored)."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.parallel.dense import mixed_precision_policy
from tests.dist_utils import run_distributed
from tests.parity_utils import small_config


@pytest.mark.parametrize("precision,reduce,want", [("fp32", "fp32", None), ("fp32", "bf16", (None, torch.bfloat16)),
                                                   ("bf16", "fp32", (torch.bfloat16, torch.float32)),
                                                   ("bf16", "bf16", (torch.bfloat16, torch.bfloat16))])
def test_policy_follows_grad_reduce_dtype_in_both_precisions(precision, reduce, want):
    pol = mixed_precision_policy(precision, reduce)
    assert (pol if pol is None else (pol.param_dtype, pol.reduce_dtype)) == want


def _train(rank: int, world: int, cfgs: dict[str, dict], out: str) -> dict:
    from sparsetrain.config import config_from_dict
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.train.trainer import Trainer

    info = init_distributed("cpu")
    res = {}
    for name, d in cfgs.items():
        tr = Trainer(config_from_dict({**d, "train": {**d["train"], "out_dir": f"{out}/{name}"}}), info)
        tr.fit()
        moe = tr.model.moe_layers()[0].experts
        grad_dtype = str(tr.strategy.grad_dtype(moe)) if hasattr(tr.strategy, "grad_dtype") else None
        res[name] = {"losses": [r["loss"] for r in tr.history], "grad_dtype": grad_dtype,
                     "param_dtypes": {str(p.dtype) for p in tr.model.parameters()}}
    return res


@pytest.mark.distributed
def test_fp32_run_reduces_gradients_in_bf16_when_asked(tmp_path):
    strategies = {"dp": ["parallel.strategy=dp"],
                  "fssdp": ["parallel.strategy=fssdp", "parallel.fssdp.overlap_budget=4", "moe.router_skew=1.2"],
                  # the flat all-reduces: dense grads under parallel.dense=ddp, EP's expert replicas (ep_size 1)
                  "dp-ddp": ["parallel.strategy=dp", "parallel.dense=ddp"],
                  "ep-ddp": ["parallel.strategy=ep", "parallel.ep_size=1", "parallel.dense=ddp"]}
    cfgs = {f"{name}-{red}": small_config(*ov, f"train.grad_reduce_dtype={red}", steps=4)
            for name, ov in strategies.items() for red in ("fp32", "bf16")}
    res = run_distributed(_train, 2, cfgs, str(tmp_path), timeout=600)[0]
    for name in strategies:
        f32, b16 = res[f"{name}-fp32"], res[f"{name}-bf16"]
        assert b16["param_dtypes"] == {"torch.float32"}  # master weights stay fp32; only the reduction is bf16
        # the first forward is before any gradient reduction (ddp's bf16 path reduces the step's numbers apart
        # from the gradients, in another summation order: equal to the last bits)
        assert f32["losses"][0] == pytest.approx(b16["losses"][0], rel=1e-6, abs=0)
        assert f32["losses"][1:] != b16["losses"][1:], name  # bf16 reduction rounds: not silently fp32
        rel = (torch.tensor(b16["losses"]) - torch.tensor(f32["losses"])).abs() / torch.tensor(f32["losses"])
        assert float(rel.max()) < 1e-2, (name, f32["losses"], b16["losses"])
    assert (res["fssdp-fp32"]["grad_dtype"], res["fssdp-bf16"]["grad_dtype"]) == ("torch.float32", "torch.bfloat16")
