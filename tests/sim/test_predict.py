"""Simulator: hand-computed cases, the runtime's dispatch rule, monotonicity, workloads, clusters."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sparsetrain.parallel.placement import LayerPlacement
from sparsetrain.parallel.routing import candidates, choose_replicas
from sparsetrain.parallel.topology import Topology
from sparsetrain.sim.cluster import Cluster, list_clusters, load_cluster
from sparsetrain.sim.predict import predict
from sparsetrain.sim.shape import SimSetup
from sparsetrain.sim.traffic import Traffic, dispatch_matrix, ring_time
from sparsetrain.sim.workload import overlap_budget, replay_loads, resample_shares, workload_loads, zipf_loads

pytestmark = pytest.mark.unit

C = Cluster(name="hand", gpus_per_node=2, intra_node_Bps=1e9, intra_node_latency_s=1e-4, inter_node_Bps=1e8,
            inter_node_latency_s=1e-3, peak_flops=2e10, achievable_flops=1e10, layer_overhead_s=0.0)
S = SimSetup(d_model=64, n_layers=1, n_moe=1, seq_len=32, vocab_size=256, num_experts=2, top_k=1, d_ffn=128,
             d_ffn_dense=256, batch_size=4, dense_params=0, strategy="ep", dense="fsdp2", a2a_overlap=False)


def test_ep_two_ranks_by_hand():
    p = predict(S, C, 2, torch.full((1, 2), 0.5, dtype=torch.float64))
    slots = 4 * 32 / 2  # tokens per rank, top-1
    one_way = slots / 2 * 64 * 4  # half of each rank's slots leave it, fp32 rows
    a2a = 4 * (1e-4 + one_way / 1e9) + 1 * 1e-4  # dispatch+combine, fwd+bwd, then the count exchange (1 peer)
    assert p.a2a_s == pytest.approx(a2a)
    assert p.latency_s == pytest.approx(5e-4)
    attn = slots * (2 * 4 * 64**2 + 4 * 32 * 64) / 1e10
    other = slots * (2 * 64 * 2 + 2 * 64 * 256) / 1e10  # router + LM head (no dense MLP layer)
    expert = slots * 2 * 3 * 64 * 128 / 1e10  # every rank computes `slots` slots (balanced)
    assert p.compute_s == pytest.approx(3 * (attn + other + expert))
    assert p.token_imbalance == pytest.approx(1.0)
    assert p.intra_bytes_per_rank == pytest.approx(4 * one_way) and p.inter_bytes_per_rank == 0
    assert p.step_time_s == pytest.approx(p.compute_s + p.a2a_s + p.exposed_comm_s + p.optimizer_s)
    assert p.tokens_per_s == pytest.approx(128 / p.step_time_s)


def test_a2a_overlap_hides_the_dispatch_behind_own_slots_by_hand():
    """parallel.a2a_overlap: each rank's own slots run while the dispatch travels (forward) and while its reverse
    does (backward): up to one exchange each is hidden, by at most the own slots' expert time."""
    shares = torch.full((1, 2), 0.5, dtype=torch.float64)
    serial, over = predict(S, C, 2, shares), predict(dataclasses.replace(S, a2a_overlap=True), C, 2, shares)
    one = 1e-4 + 4 * 32 / 2 / 2 * 64 * 4 / 1e9  # one exchange (as in test_ep_two_ranks_by_hand)
    own_fwd = 32 * 2 * 3 * 64 * 128 / 1e10  # half of each rank's 64 slots are its own
    assert over.a2a_s == pytest.approx(serial.a2a_s - min(one, own_fwd) - min(one, 2 * own_fwd))
    assert over.compute_s == pytest.approx(serial.compute_s) and over.step_time_s < serial.step_time_s


def test_traffic_two_nodes_by_hand():
    topo = Topology(4, 2)
    flow = torch.zeros(4, 4, dtype=torch.float64)
    flow[0, 1], flow[0, 2], flow[3, 0] = 1e6, 2e6, 5e5  # bytes
    t = Traffic.from_matrix(flow, topo)
    assert t.send_intra.tolist() == [1e6, 0, 0, 0] and t.send_inter.tolist() == [2e6, 0, 0, 5e5]
    assert t.peers_intra.tolist() == [1, 1, 0, 0] and t.peers_inter.tolist() == [2, 0, 1, 1]
    # rank 0: intra 1e-4 + 1e6/1e9; inter 2 peers * 1e-3 + max(2e6 sent, 5e5 received) / 1e8
    assert t.rank_times(C)[0] == pytest.approx(max(1e-4 + 1e-3, 2e-3 + 2e-2))
    assert t.time(C) == pytest.approx(2e-3 + 2e-2)
    assert ring_time(8e6, 4, topo, C) == pytest.approx(8e6 * 3 / 4 / 1e8 + 2 * 2 * 1e-3)
    assert ring_time(8e6, 1, Topology(1, 1), C) == 0.0


def test_dispatch_matrix_matches_the_runtime_rule():
    topo = Topology(4, 2)
    p = LayerPlacement.from_lists([0, 1, 2, 3, 3], [[0, 2], [1], [2, 3], [3, 0, 1], [3]])
    shares = torch.tensor([0.4, 0.1, 0.2, 0.2, 0.1], dtype=torch.float64)
    slots = 1000
    flow = dispatch_matrix(slots, shares, p, topo)  # [src, dst]
    for src in range(4):
        ids = torch.repeat_interleave(torch.arange(5), (shares * slots).round().long())  # slots in expert order
        got = torch.bincount(choose_replicas(ids, src, p, topo), minlength=4).double()
        assert torch.allclose(flow[src], got, atol=1.0), (src, flow[src], got)  # even split up to one slot
    assert flow.sum().item() == pytest.approx(4 * slots)


def test_dispatch_and_traffic_equal_the_per_source_loop():
    """Vectorized dispatch_matrix / Traffic.from_matrix against `candidates` per (source, expert) and dense sums."""
    g = torch.Generator().manual_seed(3)
    for world, rpn, num_experts in ((6, 3, 5), (8, 2, 7), (4, 1, 3)):
        topo = Topology(world, rpn)
        owners = torch.randint(0, world, (num_experts,), generator=g).tolist()
        copies = [(torch.rand(world, generator=g) < 0.4).nonzero()[:, 0].tolist() for _ in range(num_experts)]
        p = LayerPlacement.from_lists(owners, copies)
        shares = torch.rand(num_experts, generator=g, dtype=torch.float64)
        shares /= shares.sum()
        want = torch.zeros(world, world, dtype=torch.float64)
        for src in range(world):
            for e, c in enumerate(p.copies):
                cand = candidates(c, src, topo)
                want[src, list(cand)] += 10 * shares[e] / len(cand)
        flow = dispatch_matrix(10, shares, p, topo)
        assert torch.allclose(flow, want)
        t = Traffic.from_matrix(flow, topo)
        node = torch.arange(world) // rpn
        same = (node[:, None] == node[None, :]) & ~torch.eye(world, dtype=torch.bool)
        other = node[:, None] != node[None, :]
        assert torch.allclose(t.send_intra, (flow * same).sum(1)) and torch.allclose(t.recv_inter, (flow * other).sum(0))
        talk = (flow > 0) | (flow.t() > 0)
        assert t.peers_intra.tolist() == (talk & same).sum(1).tolist()
        assert t.peers_inter.tolist() == (talk & other).sum(1).tolist()


def _cpuish(**kw) -> Cluster:
    return dataclasses.replace(C, **kw)


def test_monotone_in_skew_bandwidth_latency_flops():
    s = S.with_(num_experts=8, top_k=2, n_moe=2, n_layers=2, batch_size=16, dense_params=10_000)
    ep = [predict(s, C, 4, zipf_loads(8, k).expand(2, -1)).step_time_s for k in (0.0, 0.5, 1.0, 1.5)]
    assert ep == sorted(ep) and ep[-1] > 1.3 * ep[0]  # EP slows down as skew grows
    for strategy in ("ep", "fssdp"):
        base = predict(s.with_(strategy=strategy), C, 4, zipf_loads(8, 1.2).expand(2, -1))
        fast = predict(s.with_(strategy=strategy), _cpuish(intra_node_Bps=1e10, inter_node_Bps=1e9), 4,
                       zipf_loads(8, 1.2).expand(2, -1))
        slow = predict(s.with_(strategy=strategy), _cpuish(intra_node_latency_s=1e-3), 4,
                       zipf_loads(8, 1.2).expand(2, -1))
        quick = predict(s.with_(strategy=strategy), _cpuish(achievable_flops=1e11, peak_flops=1e11), 4,
                        zipf_loads(8, 1.2).expand(2, -1))
        assert fast.step_time_s <= base.step_time_s <= slow.step_time_s
        assert quick.compute_s == pytest.approx(base.compute_s / 10)


def test_fssdp_balances_skew_with_the_runtime_planners():
    s = S.with_(num_experts=8, top_k=2, n_moe=2, n_layers=2, batch_size=64, d_model=256, d_ffn=1024, seq_len=64,
                strategy="fssdp", slots_per_rank=2, overlap_budget=2, link_GBps=-1, expert_TFLOPs=0.01)
    fast = _cpuish(intra_node_Bps=1e12, intra_node_latency_s=1e-6, inter_node_Bps=1e11, inter_node_latency_s=1e-6)
    loads = zipf_loads(8, 1.5).expand(2, -1)
    ep = predict(s.with_(strategy="ep"), fast, 4, loads)
    for planner in ("hecate", "lpt_spill", "eplb"):
        f = predict(s.with_(planner=planner), fast, 4, loads)
        assert f.token_imbalance < ep.token_imbalance and f.step_time_s < ep.step_time_s, planner
        assert f.spag_s > 0 and f.overlap_budget == 2
    none = predict(s.with_(planner="none"), fast, 4, loads)
    assert none.spag_s == 0 and none.token_imbalance == pytest.approx(ep.token_imbalance)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"shares must be \[1, 2\]"):
        predict(S, C, 2, torch.ones(2, 2))
    with pytest.raises(ValueError, match="do not fill nodes of 2"):
        predict(S, C, 3, torch.full((1, 2), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="strategy 'pp' unknown"):
        S.with_(strategy="pp")
    with pytest.raises(ValueError, match="unknown cluster 'nope'"):
        load_cluster("nope")
    with pytest.raises(ValueError, match="zipf:S"):
        workload_loads("zipf:x", 4, 1)


def test_workloads_zipf_replay_and_resample(tmp_path):
    z = zipf_loads(8, 1.0)
    assert z.sum().item() == pytest.approx(1.0) and z[0] / z[1] == pytest.approx(2.0)
    assert torch.allclose(resample_shares(z, 8), z)
    r = resample_shares(torch.tensor([3.0, 1.0]), 4)
    assert torch.allclose(r, torch.tensor([0.375, 0.375, 0.125, 0.125], dtype=torch.float64))
    rows = [{"step": i, "counts": [[30, 10], [10, 30]]} for i in range(3)]
    (tmp_path / "expert_loads.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loads = replay_loads(tmp_path, 4, 3)  # 2 recorded experts -> 4, 2 recorded layers cycled to 3
    assert loads.shape == (3, 4) and torch.allclose(loads[2], loads[0])
    assert torch.allclose(loads[1], torch.tensor([0.125, 0.125, 0.375, 0.375], dtype=torch.float64))
    assert overlap_budget(1e-3, 100e9, 10_000_000) == 10


def test_shipped_clusters_load():
    names = list_clusters()
    assert {"h100-sxm-8x", "a100-8x", "h200-8x", "cpu-2core"} <= set(names)
    for n in names:
        c = load_cluster(n)
        assert c.achievable_flops <= c.peak_flops and c.gpus_per_node >= 1


def test_plan_line_names_cluster_and_terms():
    from sparsetrain.config import load_config
    from sparsetrain.sim.scale import plan_prediction, scale_rows

    line = plan_prediction(load_config("tiny", ["launch.workers=2"]))
    assert line.startswith("predicted step on cpu-2core (2 ranks, zipf:0.0):") and "all-to-all" in line
    s = SimSetup(d_model=64, n_layers=2, n_moe=2, seq_len=32, vocab_size=256, num_experts=8, top_k=2, d_ffn=128,
                 d_ffn_dense=256, batch_size=8, dense_params=50_000)
    rows = scale_rows(s, C, [2, 4], "zipf:1.0", 2, ("ep", "fssdp-lpt_spill"))
    assert [(r["gpus"], r["variant"]) for r in rows] == [(2, "ep"), (2, "fssdp-lpt_spill"), (4, "ep"),
                                                         (4, "fssdp-lpt_spill")]
    assert rows[2]["tokens_per_s"] > 0 and rows[2]["inter_bytes_per_rank"] > 0  # 4 GPUs span 2 nodes of 2


def test_copy_cost_gate_as_the_runtime():
    s = S.with_(num_experts=8, top_k=2, n_moe=2, n_layers=2, batch_size=64, d_model=256, d_ffn=1024, seq_len=64,
                strategy="fssdp", slots_per_rank=2, overlap_budget=4)
    slow = _cpuish(intra_node_Bps=1e5, inter_node_Bps=1e4)  # copies can never pay for their bytes
    loads = zipf_loads(8, 1.5).expand(2, -1)
    gated = predict(s, slow, 4, loads)
    assert gated.spag_s == 0 and gated.sprs_s == 0  # P1 = P0 on every layer, like EP
    ungated = predict(s.with_(cost_gate=False), slow, 4, loads)
    assert ungated.spag_s > 0 and ungated.step_time_s > gated.step_time_s


def test_scale_rows_carry_the_runtime_memory_plan(tmp_path):
    from sparsetrain.config import load_config
    from sparsetrain.sim.scale import format_table, scale_rows, write_outputs
    from sparsetrain.sim.shape import setup_from_config

    cfg = load_config("tiny")
    rows = scale_rows(setup_from_config(cfg), load_cluster("cpu-2core"), [2, 4], "zipf:0.8", 4, ("ep", "fssdp-hecate"),
                      cfg)
    assert all(r["mem_plan_gib"] is not None and r["mem_plan_gib"] > 0 for r in rows)
    assert "plan GiB" in format_table(rows)
    pngs = write_outputs(rows, tmp_path, "tiny")
    assert {p.name for p in pngs} >= {"step_time_s.png", "mem_plan_gib.png"} and (tmp_path / "predictions.json").exists()


def test_gate_holds_the_numbers_the_runtime_would():
    """Device defaults for 0, the cluster's link / FLOP/s when measured (-1), else the configured value."""
    from sparsetrain.parallel.copy_cost import DEVICE_DEFAULTS
    from sparsetrain.sim.predict import gate_numbers

    topo = Topology(4, 2)  # two nodes: the inter-node numbers
    assert gate_numbers(S, C, topo) == (1e9 * DEVICE_DEFAULTS["cuda"][1], 1e12 * DEVICE_DEFAULTS["cuda"][2])
    assert gate_numbers(S.with_(link_GBps=-1, expert_TFLOPs=0.5), C, topo) == (C.inter_node_Bps, 0.5e12)
    assert gate_numbers(S.with_(link_GBps=7.0), _cpuish(device="cpu"), Topology(2, 2))[0] == 7e9
    assert gate_numbers(S.with_(expert_TFLOPs=-1), C, topo)[1] == C.achievable_flops  # measured: the cluster's


def test_more_local_ranks_than_cores_split_them():
    host = _cpuish(gpus_per_node=8, cores=2, cpu_share=0.8, device="cpu")
    assert host.rank_share(1) == host.rank_share(2) == 0.8 and host.rank_share(4) == pytest.approx(0.4)
    s = S.with_(num_experts=4, batch_size=16, strategy="dp")
    one = predict(s, host, 4, torch.full((1, 4), 0.25, dtype=torch.float64))
    free = predict(s, dataclasses.replace(host, cores=0), 4, torch.full((1, 4), 0.25, dtype=torch.float64))
    assert one.compute_s == pytest.approx(2 * free.compute_s)  # 4 ranks on 2 cores: half a share each
    with pytest.raises(ValueError, match="cores"):
        _cpuish(cores=-1)
