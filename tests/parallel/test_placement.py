"""Placement planners, LayerPlacement, LoadTracker, re-sharding and Topology (pure functions)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrain.parallel.placement import (
    LayerPlacement,
    LoadTracker,
    initial_owners,
    owned_load,
    reshard_owners,
    reshard_owners_min_moves,
)
from sparsetrain.parallel.planners import PLANNERS, SPILL_THRESHOLD, get_planner
from sparsetrain.parallel.routing import rank_loads
from sparsetrain.parallel.topology import Topology

pytestmark = pytest.mark.unit


def zipf(num_experts: int, s: float) -> torch.Tensor:
    return torch.tensor([1.0 / (e + 1) ** s for e in range(num_experts)], dtype=torch.float64)


# ---- Topology -------------------------------------------------------------------------------------------------


def test_topology_nodes():
    topo = Topology(world=8, ranks_per_node=4)
    assert topo.num_nodes == 2
    assert [topo.node_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert topo.ranks_of_node(1) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="not divisible"):
        Topology(world=6, ranks_per_node=4)
    with pytest.raises(ValueError, match="rank=8"):
        topo.node_of(8)


def test_topology_from_env(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert Topology.from_env(4) == Topology(4, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert Topology.from_env(4) == Topology(4, 2)
    assert Topology.from_env(4, pretend_nodes=4) == Topology(4, 1)
    with pytest.raises(ValueError, match="pretend_nodes=3"):
        Topology.from_env(4, pretend_nodes=3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE=3 does not divide world=4"):
        Topology.from_env(4)


# ---- LayerPlacement / initial owners --------------------------------------------------------------------------


def test_initial_owners_blocks():
    assert initial_owners(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert initial_owners(10, 4) == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]  # world does not divide experts
    assert initial_owners(2, 4) == [0, 2]  # fewer experts than ranks: ranks 1 and 3 own nothing
    with pytest.raises(ValueError, match="num_experts"):
        initial_owners(0, 4)


def test_layer_placement_methods():
    p = LayerPlacement.from_lists([0, 1, 2], [[0, 3, 1], [1], [2, 0]])
    p.validate(world=4)
    assert p.copies == ((0, 1, 3), (1,), (0, 2))
    assert p.materialized_on(0) == [0, 2]
    assert p.extra_copies(0) == [1, 3]
    assert p.extra_count(4) == [1, 1, 0, 1]
    assert p.spag_bytes(100) == (2 + 0 + 1) * 100
    with pytest.raises(ValueError, match="owner rank 2 not in copies"):
        LayerPlacement((2,), ((0,),)).validate()
    with pytest.raises(ValueError, match="out of range"):
        LayerPlacement((0,), ((0, 5),)).validate(world=4)
    with pytest.raises(ValueError, match="sorted without duplicates"):
        LayerPlacement((0,), ((1, 0),)).validate()


# ---- LoadTracker ------------------------------------------------------------------------------------------------


def test_load_tracker_window_and_resume():
    tr = LoadTracker(num_layers=2, num_experts=3, window=3)
    assert torch.equal(tr.predicted(), torch.ones(2, 3, dtype=torch.float64))  # uniform before data
    steps = [torch.full((2, 3), float(i)) for i in range(1, 6)]
    tr.update(steps[0])
    assert torch.equal(tr.predicted(), steps[0].double())
    tr.update(steps[1])
    assert torch.allclose(tr.predicted(), torch.full((2, 3), 1.5, dtype=torch.float64))
    for s in steps[2:]:
        tr.update(s)
    assert torch.allclose(tr.predicted(), torch.full((2, 3), 4.0, dtype=torch.float64))  # mean of 3, 4, 5
    other = LoadTracker(2, 3, 3)
    other.load_state_dict(tr.state_dict())
    nxt = torch.arange(6.0).reshape(2, 3)
    tr.update(nxt)
    other.update(nxt)
    assert torch.equal(tr.predicted(), other.predicted()) and other.steps_seen == 6
    as_lists = LoadTracker(2, 3, 3)  # JSON-style state (nested lists) restores exactly too
    as_lists.load_state_dict({k: v.tolist() if torch.is_tensor(v) else v for k, v in tr.state_dict().items()})
    assert torch.equal(as_lists.predicted(), tr.predicted())
    with pytest.raises(ValueError, match="shape"):
        tr.update(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="window"):
        LoadTracker(2, 3, 4).load_state_dict(tr.state_dict())


# ---- planners ---------------------------------------------------------------------------------------------------


def test_get_planner_unknown_lists_names():
    with pytest.raises(ValueError, match="known: .*hecate"):
        get_planner("nope")
    assert set(PLANNERS) == {"hecate", "none", "eplb", "lpt_spill"}


plan_cases = st.tuples(
    st.sampled_from(sorted(PLANNERS)),
    st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (8, 4), (6, 3)]),  # (world, ranks_per_node)
    st.integers(1, 24),  # experts
    st.integers(0, 3),  # slots per rank m
    st.integers(-1, 6),  # overlap budget t
    st.lists(st.floats(0, 1000, allow_nan=False), min_size=24, max_size=24),
)


@settings(max_examples=150, deadline=None)
@given(plan_cases)
def test_planner_invariants(case):
    name, (world, rpn), num_experts, m, t, raw = case
    topo = Topology(world, rpn)
    loads = torch.tensor(raw[:num_experts], dtype=torch.float64)
    owners = initial_owners(num_experts, world)
    plan = get_planner(name)
    p = plan(loads, owners, topo, m, t)
    p.validate(world)
    assert list(p.owners) == owners
    assert all(o in c for o, c in zip(p.owners, p.copies))  # owner always in P1
    assert max(p.extra_count(world)) <= m  # slot limit per rank per layer
    assert plan(loads.clone(), list(owners), topo, m, t) == p  # deterministic


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_planners_none_when_no_slots(name):
    topo = Topology(4, 2)
    p = get_planner(name)(zipf(8, 1.2), initial_owners(8, 4), topo, 0, 5)
    assert p == LayerPlacement.from_owners(initial_owners(8, 4))


def test_hecate_t_le_m_replicates_top_t_everywhere():
    topo = Topology(4, 2)
    loads = torch.tensor([1.0, 9.0, 3.0, 7.0, 2.0, 2.0, 0.5, 0.1])
    p = get_planner("hecate")(loads, initial_owners(8, 4), topo, 2, 2)
    assert p.copies[1] == (0, 1, 2, 3) and p.copies[3] == (0, 1, 2, 3)
    assert all(len(p.copies[e]) == 1 for e in (0, 2, 4, 5, 6, 7))


def test_hecate_zipf_spreads_copies_across_nodes():
    topo = Topology(8, 4)
    loads = zipf(16, 1.2)
    p = get_planner("hecate")(loads, initial_owners(16, 8), topo, 2, 4)
    ncopies = [len(c) for c in p.copies]
    assert ncopies[0] == max(ncopies) and ncopies[0] > 1
    assert ncopies == sorted(ncopies, reverse=True)  # hotter never has fewer copies here
    assert sum(ncopies) - 16 == 8 * 2  # all |ranks| * m slots used
    assert {topo.node_of(r) for r in p.copies[0]} == {0, 1}
    before = rank_loads(loads, LayerPlacement.from_owners(initial_owners(16, 8)), topo)
    after = rank_loads(loads, p, topo)
    assert after.max() / after.mean() < 0.5 * before.max() / before.mean()


def test_eplb_copies_stay_in_owner_node():
    topo = Topology(8, 4)
    p = get_planner("eplb")(zipf(16, 1.2), initial_owners(16, 8), topo, 1, 0)
    for o, c in zip(p.owners, p.copies):
        assert {topo.node_of(r) for r in c} == {topo.node_of(o)}
    assert len(p.copies[0]) == max(len(c) for c in p.copies)


def test_lpt_spill_threshold():
    topo = Topology(4, 2)
    owners = initial_owners(8, 4)
    balanced = torch.tensor([1.0, 1.0, 1.05, 1.0, 1.0, 1.0, 1.0, 1.0])  # max/mean < 1.1
    assert get_planner("lpt_spill")(balanced, owners, topo, 2, 0) == LayerPlacement.from_owners(owners)
    skewed = zipf(8, 1.5)
    p = get_planner("lpt_spill")(skewed, owners, topo, 2, 0)
    assert len(p.copies[0]) > 1
    before = rank_loads(skewed, LayerPlacement.from_owners(owners), topo)
    after = rank_loads(skewed, p, topo)
    assert before.max() / before.mean() > SPILL_THRESHOLD
    assert after.max() < before.max()


def test_planner_input_errors():
    topo = Topology(4, 2)
    with pytest.raises(ValueError, match="owners has 3"):
        get_planner("hecate")(torch.ones(4), [0, 1, 2], topo, 1, 3)
    with pytest.raises(ValueError, match=r"owners\[0\]=7"):
        get_planner("hecate")(torch.ones(2), [7, 0], topo, 1, 3)
    with pytest.raises(ValueError, match="loads must be finite"):
        get_planner("none")(torch.tensor([1.0, -1.0]), [0, 1], topo, 1, 3)


# ---- re-sharding ------------------------------------------------------------------------------------------------


def skewed_layers(num_layers: int, num_experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = zipf(num_experts, 1.2)
    return torch.stack([base[torch.randperm(num_experts, generator=g)] for _ in range(num_layers)])  # [L, E]


def reshard_cases(max_layers: int):
    """Hypothesis cases (seed, (world, ranks per node), experts, layers) for the re-sharding properties."""
    return lambda f: settings(max_examples=30, deadline=None)(given(
        st.integers(0, 1000), st.sampled_from([(4, 2), (8, 4), (8, 2)]), st.sampled_from([8, 16, 12]),
        st.integers(1, max_layers))(f))


def reshard_setup(seed: int, shape: tuple[int, int], num_experts: int, num_layers: int):
    """(world, topology, skewed loads [L, E], round-robin owners [L][E])."""
    world, rpn = shape
    loads = skewed_layers(num_layers, num_experts, seed)
    return world, Topology(world, rpn), loads, [initial_owners(num_experts, world) for _ in range(num_layers)]


@reshard_cases(max_layers=5)
def test_reshard_balances_owned_load(seed, shape, num_experts, num_layers):
    world, topo, loads, owners = reshard_setup(seed, shape, num_experts, num_layers)
    new = reshard_owners(loads, owners, topo)
    assert new == reshard_owners(loads.clone(), [list(r) for r in owners], topo)  # deterministic

    def imbalance(o):
        x = owned_load(loads, o, world)
        return float(x.max() / x.mean())

    assert imbalance(new) <= imbalance(owners) + 1e-9
    cap = -(-num_experts // world) + 1
    for row in new:
        assert sorted(set(row)) == sorted(set(row) & set(range(world)))
        assert max(row.count(r) for r in range(world)) <= cap  # chunks per rank per layer bounded


def test_reshard_strictly_better_and_keeps_full_replicas():
    topo = Topology(8, 4)
    loads = skewed_layers(4, 16, seed=3)
    owners = [initial_owners(16, 8)] * 4
    new = reshard_owners(loads, owners, topo)
    before = owned_load(loads, owners, 8)
    after = owned_load(loads, new, 8)
    assert after.max() / after.mean() < 0.8 * before.max() / before.mean()
    assert torch.isclose(after.sum(), before.sum())
    # a fully replicated expert stays with its owner
    hot = int(loads[0].argmax())
    reps = [get_planner("hecate")(loads[layer], owners[layer], topo, 2, 1) for layer in range(4)]
    assert len(reps[0].copies[hot]) == 8
    kept = reshard_owners(loads, owners, topo, replicas=reps)
    assert kept[0][hot] == owners[0][hot]


@pytest.mark.parametrize("reshard", [reshard_owners, reshard_owners_min_moves])
def test_reshard_errors(reshard):
    topo = Topology(4, 2)
    with pytest.raises(ValueError, match="2-D"):
        reshard(torch.ones(4), [[0, 1, 2, 3]], topo)
    with pytest.raises(ValueError, match="owners must be 2 lists of 4"):
        reshard(torch.ones(2, 4), [[0, 1, 2, 3]], topo)
    with pytest.raises(ValueError, match="replicas has 0 layers, expected 1"):
        reshard(torch.ones(1, 4), [[0, 1, 2, 3]], topo, replicas=[])
    with pytest.raises(ValueError, match="chunk_slack must be >= 0"):
        reshard(torch.ones(1, 4), [[0, 1, 2, 3]], topo, chunk_slack=-1)


# ---- re-sharding by few moves (what FSSDP uses) ------------------------------------------------------------


def _layer_imbalance(loads: torch.Tensor, owners: list[list[int]], world: int) -> list[float]:
    return [float(x.max() / x.mean()) for x in (owned_load(loads[i:i + 1], owners[i:i + 1], world)
                                                 for i in range(len(owners)))]


@reshard_cases(max_layers=3)
def test_min_moves_never_worse_keeps_memory_and_is_deterministic(seed, shape, num_experts, num_layers):
    world, topo, loads, owners = reshard_setup(seed, shape, num_experts, num_layers)
    new = reshard_owners_min_moves(loads, owners, topo)
    assert new == reshard_owners_min_moves(loads.clone(), [list(r) for r in owners], topo)
    for before, after in zip(_layer_imbalance(loads, owners, world), _layer_imbalance(loads, new, world)):
        assert after <= before + 1e-9
    cap = -(-num_experts // world)
    for old_row, row in zip(owners, new):
        assert max(row.count(r) for r in range(world)) <= cap  # chunk_slack=0: EP's memory per layer
        if num_experts % world == 0:  # every rank full: swaps only, so every rank keeps its chunk count
            assert [row.count(r) for r in range(world)] == [old_row.count(r) for r in range(world)]


@pytest.mark.parametrize("s", [0.8, 1.2, 1.6])
@pytest.mark.parametrize("world,num_experts", [(2, 16), (4, 16), (8, 64)])
def test_min_moves_balances_like_a_rebuild_with_few_moves(s, world, num_experts):
    """As balanced as the longest-first rebuild (within 3%), moving a handful of experts instead of most."""
    topo = Topology(world, max(1, world // 2))
    g = torch.Generator().manual_seed(1)
    loads = (zipf(num_experts, s) * 1000)[torch.randperm(num_experts, generator=g)].unsqueeze(0)  # [1, E]
    owners = [initial_owners(num_experts, world)]
    few, rebuilt = reshard_owners_min_moves(loads, owners, topo), reshard_owners(loads, owners, topo, chunk_slack=0)
    assert _layer_imbalance(loads, few, world)[0] <= 1.03 * _layer_imbalance(loads, rebuilt, world)[0]
    assert _layer_imbalance(loads, few, world)[0] < _layer_imbalance(loads, owners, world)[0]
    moved = [sum(a != b for a, b in zip(owners[0], o[0])) for o in (few, rebuilt)]
    assert moved[0] <= 4 < moved[1], moved


def test_min_moves_leaves_noise_alone():
    topo = Topology(4, 2)
    owners = [initial_owners(16, 4) for _ in range(2)]
    # already balanced owners under 1% noise: nothing pays for a move
    g = torch.Generator().manual_seed(0)
    noisy = 100 * (1 + 0.01 * torch.rand(2, 16, generator=g, dtype=torch.float64))
    assert reshard_owners_min_moves(noisy, owners, topo) == owners
    # the rebuild-from-scratch balancer moves many experts for the same 1% noise
    moved = sum(a != b for r0, r1 in zip(owners, reshard_owners(noisy, owners, topo)) for a, b in zip(r0, r1))
    assert moved > 0


def test_min_moves_keeps_fully_replicated_experts():
    topo = Topology(4, 2)
    loads = zipf(8, 1.6).unsqueeze(0) * 1000
    owners = [initial_owners(8, 4)]
    reps = [get_planner("hecate")(loads[0], owners[0], topo, 2, 1)]
    hot = int(loads[0].argmax())
    assert len(reps[0].copies[hot]) == 4
    new = reshard_owners_min_moves(loads, owners, topo, replicas=reps)
    assert new[0][hot] == owners[0][hot]
