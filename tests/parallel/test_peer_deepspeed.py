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
    return {"losses": [r["loss"] for r in tr.history], "a2a_MB": [r.get("a2a_MB", 0.0) for r in tr.history],
            "grad_norms": [r["grad_norm"] for r in tr.history],
            "layers": [type(m).__name__ for m in tr.model.moe_layers()],
            "engine": type(getattr(tr.strategy, "engine", None)).__name__}


@pytest.mark.slow
def test_deepspeed_moe_trains_on_two_ranks_from_our_weights(tmp_path):
    """ZeRO-0 and ZeRO-2: losses finite and falling; the first step's loss (before any update) equals
    sparsetrain EP's on the same weights and data."""
    steps = 6
    common = ["moe.z_loss_coef=0", "train.lr=0.01", "train.warmup_steps=1"]
    ep = small_config("parallel.strategy=ep", *common, steps=steps)
    ref = run_distributed(_train_body, 2, ep, str(tmp_path / "ep"), timeout=600)[0]["losses"]
    norms = {}
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
        assert min(got[0]["a2a_MB"]) > 0, got[0]["a2a_MB"]  # its token all-to-all is logged as EP's is
        # same GPT, data and initial weights; only float summation order differs before the first update
        assert losses[0] == pytest.approx(ref[0], rel=1e-5, abs=1e-5), (zero_stage, losses[0], ref[0])
        norms[zero_stage] = got[0]["grad_norms"]
        assert all(math.isfinite(v) and v > 0 for v in norms[zero_stage]), norms  # ZeRO-0 logged nan
    # the first step's gradients (same weights and data) have one norm whichever stage keeps it
    assert norms[0][0] == pytest.approx(norms[2][0], rel=1e-4), norms


def _a2a_body(rank: int, world: int, cfg_dict: dict, out: str, steps: int) -> dict:
    from benchmarks.measure import CollectiveCounter
    from sparsetrain.config import config_from_dict
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.telemetry.comm import COMM
    from sparsetrain.train.trainer import Trainer

    torch.set_num_threads(1)
    counter = CollectiveCounter()
    counter.install()
    cfg_dict = {**cfg_dict, "train": {**cfg_dict["train"], "out_dir": out}}
    tr = Trainer(config_from_dict(cfg_dict), init_distributed("cpu"))
    caps: list[int] = []  # every gate call's capacity C: DeepSpeed exchanges a padded [E, C, d] buffer
    for layer in tr.model.moe_layers():
        layer.moe.deepspeed_moe.gate.register_forward_hook(lambda m, a, o: caps.append(int(o[1])))
    got = []
    for step in range(steps):
        COMM.reset()
        caps.clear()
        counter.enabled = True
        tr.train_step(step)
        counter.enabled = False
        calls, nbytes = counter.pop()
        got.append({"comm": COMM.snapshot().get("all_to_all", 0), "caps": list(caps),
                    "a2a_calls": calls.get("all_to_all_single", 0), "a2a_bytes": nbytes.get("all_to_all_single", 0)})
    return {"steps": got, "E": tr.cfg.moe.num_experts, "d": tr.cfg.model.d_model}


@pytest.mark.slow
def test_deepspeed_moe_all_to_all_bytes_are_counted(tmp_path):
    """DeepSpeed's token all-to-all goes through deepspeed.comm (tensors passed by keyword): per step, COMM
    'all_to_all' holds the bytes sent to the other rank, as for our EP, and CollectiveCounter sees every call
    with its bytes: dispatch + combine, forward + backward, of a padded [E, C, d] fp32 buffer per MoE layer."""
    steps = 2
    cfg = small_config("parallel.strategy=deepspeed_moe", steps=steps)
    res = run_distributed(_a2a_body, 2, cfg, str(tmp_path), steps, timeout=1200, env={"DS_ACCELERATOR": "cpu"})
    for r in res:
        e, d = r["E"], r["d"]
        for s in r["steps"]:
            assert len(s["caps"]) == 2 and min(s["caps"]) > 0, s  # one gate call per MoE layer
            buffers = sum(e * c * d * 4 for c in s["caps"])  # bytes of each layer's [E, C, d] buffer, summed
            assert s["a2a_calls"] == 4 * len(s["caps"]), s
            assert s["a2a_bytes"] == 4 * buffers, s  # CollectiveCounter: the whole buffer per call
            assert s["comm"] == 4 * buffers // 2, s  # COMM: the half each rank sends to the other


@pytest.mark.parametrize("top_k", [1, 2])
def test_workload_gate_is_deepspeed_gating_on_the_workload_ids(top_k):
    """DeepSpeed's gate under a routing workload: fed plain top-k ids it reproduces DeepSpeed's own gating at a
    binding capacity (ids, drops, locations, weights, aux loss, gradients); fed Zipf quota ids it routes exactly
    as our router does under the same workload, with the same combine weights."""
    from deepspeed.moe.sharded_moe import top1gating, top2gating

    from sparsetrain.model.router import TopKRouter
    from sparsetrain.model.workloads import RoutingWorkload
    from sparsetrain.parallel.peers.deepspeed_gate import workload_gating

    torch.manual_seed(0)
    t, d, e, cf = 256, 16, 8, 0.75  # capacity 0.75: about a quarter of the slots dropped
    x = torch.randn(t, d)
    w = torch.randn(e, d)
    logits = (x @ w.t()).requires_grad_()
    ids = torch.topk(logits.detach().softmax(-1), top_k, dim=-1).indices  # [T, k] best first
    ref_logits = logits.detach().clone().requires_grad_()
    if top_k == 2:
        ref = top2gating(ref_logits, cf, 0, True, None, top2_2nd_expert_sampling=False, sparse_routes=True)
    else:
        ref = top1gating(ref_logits, cf, 0, None, None, True, False, None, sparse_routes=True)
    got = workload_gating(logits, ids, top_k, cf, 0, True, None)
    assert int(got[1]) == int(ref[1]) and bool((ref[3] < 0).any())  # same capacity, and it binds
    for i in (3, 4, 6):  # ids (-1 = dropped), locations, counts
        assert torch.equal(got[i], ref[i]), i
    torch.testing.assert_close(got[5], ref[5], rtol=1e-6, atol=1e-7)  # combine weights
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-7)  # aux loss
    probe = torch.randn(top_k, t)
    ((got[5] * probe).sum() + got[0]).backward()
    ((ref[5] * probe).sum() + ref[0]).backward()
    # fp32 sums of O(1) terms in another order: ~1e-7 apart on some CPUs (AVX-512 vs AVX2 reduction order)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)
    # Zipf 1.2 quotas: the same experts and weights as our router under the same workload (nothing dropped)
    wl = RoutingWorkload(e, top_k, skew=1.2, seed=3)
    router = TopKRouter(d, e, top_k, aux_loss_coef=0.0, z_loss_coef=0.0, workload=wl, layer_index=1)
    with torch.no_grad():
        router.gate.weight.copy_(w)
    router.step = 5
    ours = router(x, group=64)
    quota_ids = wl.route(logits.detach().softmax(-1), 1, 5, 64)
    got = workload_gating(logits.detach(), quota_ids, top_k, float(e), 0, True, None)
    assert torch.equal(got[3].t().long(), ours.expert_ids)
    torch.testing.assert_close(got[5].t(), ours.weights, rtol=1e-6, atol=1e-7)


def test_token_priority_capacity_drops_what_deepspeed_drops():
    """`moe.capacity_priority=token`: at a binding capacity our kept slots and renormalized weights are
    DeepSpeed top2gating's (first choices before second ones, each in token order)."""
    from deepspeed.moe.sharded_moe import top2gating

    from sparsetrain.model.moe import capacity_keep, capacity_weights, expert_capacity

    torch.manual_seed(1)
    t, e, cf = 512, 8, 0.75
    logits = torch.randn(t, e) * 2
    ref = top2gating(logits.clone(), cf, 0, True, None, top2_2nd_expert_sampling=False, sparse_routes=True)
    probs = logits.softmax(-1)
    w, ids = torch.topk(probs, 2, dim=-1)  # [T, 2]
    keep = capacity_keep(ids, None, e, expert_capacity(cf, t, 2, e))  # [T*2]
    assert torch.equal(keep, (ref[3].t() >= 0).flatten()) and not bool(keep.all())
    torch.testing.assert_close(capacity_weights(w / w.sum(-1, keepdim=True), keep, True), ref[5].t(),
                               rtol=1e-6, atol=1e-7)
    assert not torch.equal(keep, capacity_keep(ids, w, e, expert_capacity(cf, t, 2, e)))  # score order differs


def test_deepspeed_moe_reduces_gradients_in_bf16_when_asked(tmp_path):
    """train.grad_reduce_dtype=bf16 -> the engine's communication_data_type (its ZeRO-1/2 reducers read the same
    key): ZeRO-0 still trains, and the rounding shows in the losses after the first update (the first forward
    precedes any reduction)."""
    common = ["moe.z_loss_coef=0", "train.lr=0.01", "train.warmup_steps=1"]
    runs = {}
    for zero_stage, reduce in ((0, "fp32"), (0, "bf16")):
        cfg = small_config("parallel.strategy=deepspeed_moe", f"parallel.deepspeed.zero_stage={zero_stage}",
                           f"train.grad_reduce_dtype={reduce}", *common, steps=4)
        runs[zero_stage, reduce] = run_distributed(_train_body, 2, cfg, str(tmp_path / f"ds{zero_stage}{reduce}"),
                                                   timeout=1200, env={"DS_ACCELERATOR": "cpu"})[0]["losses"]
    f32, b16 = runs[0, "fp32"], runs[0, "bf16"]
    assert all(math.isfinite(v) for v in b16), runs
    assert b16[0] == pytest.approx(f32[0], rel=1e-6) and b16[1:] != f32[1:], runs
    assert max(abs(a - b) / a for a, b in zip(f32, b16)) < 2e-2, runs
