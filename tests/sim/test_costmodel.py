"""Analytic cost model: formulas, monotonic properties, EP vs FSSDP."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrain.parallel.placement import LayerPlacement, initial_owners
from sparsetrain.parallel.planners import plan_hecate
from sparsetrain.parallel.routing import rank_loads
from sparsetrain.parallel.topology import Topology
from sparsetrain.sim.costmodel import CostConfig, dispatch_flow, estimate, overlap_budget, zipf_loads

pytestmark = pytest.mark.unit

CFG = CostConfig(d_model=1024, d_ffn=2048, num_experts=16, top_k=2, num_layers=4, seq_len=2048,
                 tokens_per_rank=4096, world=8, ranks_per_node=4)


def test_zipf_loads():
    u = zipf_loads(8, 0.0)
    assert torch.allclose(u, torch.full((8,), 1 / 8, dtype=torch.float64))
    z = zipf_loads(8, 1.0)
    assert torch.isclose(z.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.all(z[:-1] > z[1:])
    assert torch.isclose(z[0] / z[1], torch.tensor(2.0, dtype=torch.float64))
    assert zipf_loads(8, 2.0)[0] > z[0]
    with pytest.raises(ValueError, match="s must be finite and >= 0"):
        zipf_loads(8, -1.0)


def test_overlap_budget():
    assert overlap_budget(1e-3, 100e9, 10_000_000) == 10
    assert overlap_budget(0.0, 100e9, 1) == 0
    assert overlap_budget(1e-3, 100e9, 10_000_001) == 9
    with pytest.raises(ValueError, match="bandwidth_Bps"):
        overlap_budget(1.0, 0.0, 1)
    with pytest.raises(ValueError, match="chunk_bytes"):
        overlap_budget(1.0, 1.0, 0)


def test_config_validation():
    with pytest.raises(ValueError, match="top_k=9 exceeds num_experts=8"):
        CostConfig(num_experts=8, top_k=9)
    with pytest.raises(ValueError, match="not divisible"):
        CostConfig(world=6, ranks_per_node=4)
    with pytest.raises(ValueError, match="spag_algo='ring'"):
        CostConfig(spag_algo="ring")
    with pytest.raises(ValueError, match="loads must have shape"):
        estimate(CFG, torch.ones(3))


def test_ep_formulas():
    r = estimate(CFG, zipf_loads(16, 0.0))
    slots = CFG.tokens_per_rank * CFG.top_k
    assert torch.allclose(r.rank_tokens, torch.full((4, 8), float(slots), dtype=torch.float64))
    assert r.spag_bytes == 0 and r.sprs_bytes == 0
    # uniform routing: each rank keeps 1/world of its slots, 4 transfers (dispatch/combine x fwd/bwd)
    expect = 8 * slots * 7 / 8 * 4 * CFG.d_model * CFG.act_bytes * CFG.num_layers
    assert r.a2a_bytes == pytest.approx(expect)
    assert r.a2a_inter_bytes == pytest.approx(expect * 4 / 7)  # 4 of the 7 peers are on the other node
    dense = 4 * CFG.d_model**2 * CFG.num_layers
    assert r.fsdp_bytes == pytest.approx(dense * 7 / 8 * (2 * CFG.param_bytes + CFG.grad_bytes) * 8)
    flops = slots * CFG.flops_per_slot * 4 + CFG.tokens_per_rank * CFG.attn_flops_per_token * 4
    assert torch.allclose(r.compute_s, torch.full((8,), flops / (CFG.tflops * 1e12), dtype=torch.float64))
    assert r.token_imbalance == pytest.approx(1.0)
    assert float(r.peak_mem_bytes.max() / r.peak_mem_bytes.min()) == pytest.approx(1.0)


def test_single_rank_has_no_communication():
    cfg = dataclasses.replace(CFG, world=1, ranks_per_node=1)
    r = estimate(cfg, zipf_loads(16, 1.0))
    assert r.a2a_bytes == 0 and r.fsdp_bytes == 0 and r.spag_bytes == 0


@settings(max_examples=20, deadline=None)
@given(st.floats(0.0, 2.0), st.floats(0.05, 1.0))
def test_ep_step_time_grows_with_skew(s, ds):
    lo = estimate(CFG, zipf_loads(16, s))
    hi = estimate(CFG, zipf_loads(16, s + ds))
    assert hi.step_time_s >= lo.step_time_s - 1e-12
    assert hi.token_imbalance >= lo.token_imbalance - 1e-12


def test_faster_links_never_slower():
    loads = zipf_loads(16, 1.2)
    p = plan_hecate(loads, initial_owners(16, 8), Topology(8, 4), 2, 4)
    base = estimate(CFG, loads, [p]).step_time_s
    fast = dataclasses.replace(CFG, inter_node_Bps=CFG.inter_node_Bps * 4, intra_node_Bps=CFG.intra_node_Bps * 4)
    assert estimate(fast, loads, [p]).step_time_s <= base


def test_spag_bytes_match_placement_formula():
    loads = zipf_loads(16, 1.2)
    p = plan_hecate(loads, initial_owners(16, 8), Topology(8, 4), 2, 4)
    for keep, gathers in ((True, 1), (False, 2)):
        for algo in ("p2p", "chain"):
            cfg = dataclasses.replace(CFG, keep_materialized=keep, spag_algo=algo)
            r = estimate(cfg, loads, [p])
            assert r.spag_bytes == gathers * CFG.num_layers * p.spag_bytes(CFG.chunk_bytes)
            assert r.sprs_bytes == CFG.num_layers * p.spag_bytes(CFG.expert_params * CFG.grad_bytes)
    kept = estimate(dataclasses.replace(CFG, keep_materialized=True), loads, [p])
    dropped = estimate(CFG, loads, [p])
    assert torch.all(kept.peak_mem_bytes >= dropped.peak_mem_bytes)


def test_identity_placement_equals_ep():
    loads = zipf_loads(16, 1.0)
    ep = estimate(CFG, loads)
    same = estimate(CFG, loads, [LayerPlacement.from_owners(initial_owners(16, 8))])
    assert same.step_time_s == pytest.approx(ep.step_time_s)
    assert torch.allclose(same.peak_mem_bytes, ep.peak_mem_bytes)


def test_dispatch_flow_matches_routing_rank_loads():
    topo = Topology(8, 4)
    loads = zipf_loads(16, 1.2)
    p = plan_hecate(loads, initial_owners(16, 8), topo, 2, 4)
    flow = dispatch_flow(loads, p.copies, 8, 4, 100.0)  # [src, dst]
    assert torch.allclose(flow.sum(0), rank_loads(loads * 800.0, p, topo))


def test_fssdp_balances_skewed_load():
    cfg = dataclasses.replace(CFG, spag_algo="chain")
    loads = zipf_loads(16, 1.5)
    p = plan_hecate(loads, initial_owners(16, 8), Topology(8, 4), 2, 4)
    ep, fs = estimate(cfg, loads), estimate(cfg, loads, [p])
    assert fs.token_imbalance < 0.5 * ep.token_imbalance
    assert float(fs.compute_s.max()) < float(ep.compute_s.max())
    spread = float(fs.peak_mem_bytes.max() / fs.peak_mem_bytes.min())
    assert spread < float(ep.peak_mem_bytes.max() / ep.peak_mem_bytes.min())
    assert set(fs.summary()) >= {"step_time_s", "spag_bytes", "peak_mem_max_bytes"}
