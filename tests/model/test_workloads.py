"""Routing workloads: Zipf over a seeded permutation, drift, trace replay, reached by quota routing."""
from __future__ import annotations

import json

import pytest
import torch

from sparsetrain.config import ConfigError, load_config
from sparsetrain.model.router import TopKRouter
from sparsetrain.model.workloads import RoutingWorkload, cap_shares, load_trace, quota_route, slot_quotas, zipf_shares
from sparsetrain.parallel.placement import balanced_owners

pytestmark = [pytest.mark.unit]

E, K, S = 16, 2, 64


def _probs(g: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(g, S, E, generator=torch.Generator().manual_seed(seed)).mul(0.5).softmax(-1)


@pytest.mark.parametrize("s", [0.0, 0.8, 1.2, 1.6, 3.0])
def test_quota_route_meets_every_quota_with_distinct_choices(s):
    quotas = slot_quotas(cap_shares(zipf_shares(E, s), 1 / K), S * K, S)
    assert int(quotas.sum()) == S * K and int(quotas.max()) <= S
    probs = _probs(3)
    ids = quota_route(probs, quotas, K)  # [G, S, k]
    for g in range(3):
        assert torch.equal(torch.bincount(ids[g].flatten(), minlength=E), quotas)
        assert all(len(set(row)) == K for row in ids[g].tolist())
    chosen = probs.gather(-1, ids)
    assert bool((chosen[..., 0] >= chosen[..., 1]).all())  # first choice = higher gate score


def test_quota_route_follows_the_router_when_quotas_allow():
    probs = _probs(1)
    free = torch.topk(probs, K, dim=-1).indices  # what plain top-k picks
    quotas = torch.bincount(free.flatten(), minlength=E)  # quotas equal to top-k's own counts
    ids = quota_route(probs, quotas, K)
    assert torch.equal(torch.bincount(ids.flatten(), minlength=E), quotas)
    assert (ids == free).all(-1).float().mean() > 0.9  # nearly every token keeps its own top-k


def test_zipf_target_is_a_seeded_permutation_capped_at_one_over_k():
    w = RoutingWorkload(E, K, 1.2, seed=3)
    p = w.target(0, 0)
    assert abs(float(p.sum()) - 1) < 1e-12 and abs(float(p.max()) - float(zipf_shares(E, 1.2)[0])) < 1e-12
    assert int(p.argmax()) == int(w.permutation(0, 0)[0])
    assert not torch.equal(w.permutation(0, 0), w.permutation(1, 0))  # each layer its own hot set
    assert torch.equal(RoutingWorkload(E, K, 1.2, seed=3).target(1, 5), w.target(1, 5))  # seeded, static
    capped = RoutingWorkload(E, K, 3.0).target(0, 0)
    assert abs(float(capped.max()) - 1 / K) < 1e-12 and abs(float(capped.sum()) - 1) < 1e-12


def test_drift_moves_the_hot_set_every_k_steps():
    w = RoutingWorkload(E, K, 1.2, seed=0, drift_every=4)
    hot = [int(w.target(0, t).argmax()) for t in range(16)]
    assert all(hot[t] == hot[t - t % 4] for t in range(16))
    assert len({hot[0], hot[4], hot[8], hot[12]}) > 1
    mean = w.mean_target(0, 16)
    assert float(mean.max()) < float(w.target(0, 0).max())  # averaged over hot sets: flatter


def test_router_reaches_the_target_each_step_and_shards_agree():
    w = RoutingWorkload(E, K, 1.2, seed=1)
    r = TopKRouter(32, E, K, workload=w, layer_index=1)
    x = torch.randn(4 * S, 32, generator=torch.Generator().manual_seed(0))
    for step in (0, 7):
        r.step = step
        out = r(x, group=S)
        share = out.tokens_per_expert.double() / (4 * S * K)
        assert (share - w.target(1, step)).abs().max() <= 1 / (S * K)  # one slot per sequence at most
        halves = torch.cat([r(x[: 2 * S], group=S).expert_ids, r(x[2 * S:], group=S).expert_ids])
        assert torch.equal(halves, out.expert_ids)  # per-sequence: rank sharding cannot change routing
    out.weights.sum().backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() > 0


def test_trace_replay_follows_recorded_loads(tmp_path):
    counts = [[[10 * (e + 1) for e in range(E)], [100] + [1] * (E - 1)], [[1] * E, [5] * E]]
    path = tmp_path / "expert_loads.jsonl"
    path.write_text("".join(json.dumps({"step": i, "counts": c}) + "\n" for i, c in enumerate(counts)))
    w = RoutingWorkload.from_config(load_config("tiny", [f"moe.num_experts={E}", f"moe.routing_trace={path}"]).moe)
    assert w is not None and load_trace(path).shape == (2, 2, E)
    ref = torch.tensor(counts[0][0], dtype=torch.float64)
    torch.testing.assert_close(w.target(0, 0), ref / ref.sum())
    torch.testing.assert_close(w.target(0, 3), torch.full((E,), 1 / E, dtype=torch.float64))  # step 3 -> row 1
    assert abs(float(w.target(1, 0).max()) - 1 / K) < 1e-12  # 100 of 115 slots capped at 1/k
    torch.testing.assert_close(w.target(2, 0), w.target(0, 0))  # layer 2 replays trace layer 0


def test_workload_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config("tiny", [f"moe.routing_trace={tmp_path / 'missing.jsonl'}"])
    bad = tmp_path / "eight.jsonl"
    bad.write_text(json.dumps({"step": 0, "counts": [[1] * 8]}) + "\n")
    with pytest.raises(ConfigError, match="has 8 experts"):
        load_config("tiny", [f"moe.routing_trace={bad}", "moe.num_experts=16"])
    with pytest.raises(ConfigError, match="not both"):
        load_config("tiny", [f"moe.routing_trace={bad}", "moe.router_skew=1.2", "moe.num_experts=8"])
    with pytest.raises(ConfigError, match="needs a known mean load"):
        load_config("tiny", ["parallel.ep_placement=balanced"])
    with pytest.raises(ConfigError, match="skew_drift_every needs"):
        load_config("tiny", ["moe.skew_drift_every=5"])


def test_balanced_owners_beat_contiguous_with_equal_counts():
    w = RoutingWorkload(E, K, 1.2, seed=0)
    loads = torch.stack([w.target(li, 0) for li in range(2)])  # [L, E]
    owners = balanced_owners(loads, 4)
    for li, row in enumerate(owners):
        assert [row.count(r) for r in range(4)] == [E // 4] * 4
        per_rank = torch.zeros(4, dtype=torch.float64).index_add_(0, torch.tensor(row), loads[li])
        contiguous = loads[li].view(4, E // 4).sum(1)
        assert float(per_rank.max()) <= float(contiguous.max())
        srt = loads[li].sort(descending=True).values
        optimum = float(srt[0] + srt[-(E // 4 - 1):].sum())  # the hottest expert with the coldest three
        assert abs(float(per_rank.max()) - optimum) < 1e-9
