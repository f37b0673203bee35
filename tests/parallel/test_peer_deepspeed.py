"""DeepSpeed-MoE as a peer strategy: same routing as sparsetrain's router, trains on 2 gloo ranks from our weights.

DeepSpeed's CPU communication op compiles on first use into the project cache (`make setup` builds it
once; see Makefile), so these tests take seconds once it is there.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.parity_utils import small_config

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="needs the deepspeed extra (make setup installs it)")]


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_agrees_with_deepspeed_gating(top_k):
    """Identical gate weights and tokens: the same expert ids and combine weights, bit for bit."""
    from deepspeed.moe.sharded_moe import top1gating, top2gating

    from sparsetrain.model.router import TopKRouter

    torch.manual_seed(0)
    t, d, e = 512, 32, 8
    router = TopKRouter(d, e, top_k, aux_loss_coef=0.0, z_loss_coef=0.0)
    router.reset_parameters(1.0)
    x = torch.randn(t, d)
    ours = router(x)
    logits = torch.nn.functional.linear(x.float(), router.gate.weight.float())  # DeepSpeed's TopKGate logits
    # capacity = t * E: nothing is dropped, so DeepSpeed's dropless padding path is not involved
    if top_k == 2:
        out = top2gating(logits, float(e), 0, drop_tokens=True, top2_2nd_expert_sampling=False, sparse_routes=True)
    else:
        out = top1gating(logits, float(e), 0, use_rts=False, sparse_routes=True)
    ids, gates = out[3], out[5]  # [k, T] each
    assert torch.equal(ours.expert_ids, ids.t().long())
    assert torch.equal(ours.weights, gates.t())
    assert torch.equal(ours.tokens_per_expert, out[6].long())


def _train_body(rank: int, world: int, cfg_dict: dict, out: str) -> dict:
    from sparsetrain.config import config_from_dict
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg_dict = {**cfg_dict, "train": {**cfg_dict["train"], "out_dir": out}}
    tr = Trainer(config_from_dict(cfg_dict), init_distributed("cpu"))
    tr.fit()
    return {"losses": [r["loss"] for r in tr.history], "layers": [type(m).__name__ for m in tr.model.moe_layers()],
            "engine": type(getattr(tr.strategy, "engine", None)).__name__}


@pytest.mark.slow
def test_deepspeed_moe_trains_on_two_ranks_from_our_weights(tmp_path):
    """ZeRO-0 and ZeRO-2: losses finite and falling; the first step's loss (before any update) equals
    sparsetrain EP's on the same weights and data."""
    steps = 6
    common = ["moe.z_loss_coef=0", "train.lr=0.01", "train.warmup_steps=1"]
    ep = small_config("parallel.strategy=ep", *common, steps=steps)
    ref = run_distributed(_train_body, 2, ep, str(tmp_path / "ep"), timeout=600)[0]["losses"]
    for zero_stage in (0, 2):
        ds = small_config("parallel.strategy=deepspeed_moe", f"parallel.deepspeed.zero_stage={zero_stage}", *common,
                          steps=steps)
        got = run_distributed(_train_body, 2, ds, str(tmp_path / f"ds{zero_stage}"), timeout=1200,
                              env={"DS_ACCELERATOR": "cpu"})
        losses = got[0]["losses"]
        assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
        assert got[1]["losses"] == losses  # the logged loss is the mean over ranks
        assert got[0]["layers"] == ["DeepSpeedMoEBlock"] * 2 and got[0]["engine"] == "DeepSpeedEngine", got[0]
        assert losses[-1] < losses[0] - 0.1, losses
        # same GPT, data and initial weights; only float summation order differs before the first update
        assert losses[0] == pytest.approx(ref[0], rel=1e-5, abs=1e-5), (zero_stage, losses[0], ref[0])
