"""Topology-aware replica choice: local > same node > remote, even split, deterministic."""
from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrain.parallel.placement import LayerPlacement, initial_owners
from sparsetrain.parallel.planners import plan_hecate
from sparsetrain.parallel.routing import (
    candidate_table,
    candidates,
    choose_replicas,
    copy_mask,
    rank_loads,
    share_matrix,
)
from sparsetrain.parallel.topology import Topology

pytestmark = pytest.mark.unit

TOPO = Topology(world=4, ranks_per_node=2)  # nodes {0, 1} and {2, 3}


def test_prefers_local_then_node_then_remote():
    # expert 0 on {0, 2}; expert 1 on {1, 3}; expert 2 on {3}
    p = LayerPlacement.from_lists([0, 1, 3], [[0, 2], [1, 3], [3]])
    ids = torch.tensor([0, 1, 2] * 5)
    out = choose_replicas(ids, 0, p, TOPO)
    assert out[ids == 0].unique().tolist() == [0]  # local copy
    assert out[ids == 1].unique().tolist() == [1]  # same node (rank 1), not remote 3
    assert out[ids == 2].unique().tolist() == [3]  # only remote
    out2 = choose_replicas(ids, 2, p, TOPO)
    assert out2[ids == 0].unique().tolist() == [2]
    assert out2[ids == 1].unique().tolist() == [3]


def test_splits_evenly_among_equal_candidates():
    p = LayerPlacement.from_lists([2], [[2, 3]])  # both remote for rank 0
    for n in (1, 7, 10):
        out = choose_replicas(torch.zeros(n, dtype=torch.long), 0, p, TOPO)
        counts = torch.bincount(out, minlength=4)[2:]
        assert int(counts.max() - counts.min()) <= 1
    # different sources start at different candidates
    one = torch.zeros(1, dtype=torch.long)
    assert choose_replicas(one, 0, p, TOPO).item() != choose_replicas(one, 1, p, TOPO).item()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(4, 2), (8, 4), (8, 2), (6, 3)]), st.integers(2, 16),
       st.integers(0, 300), st.integers(0, 2))
def test_choice_properties(seed, shape, num_experts, num_slots, m):
    world, rpn = shape
    topo = Topology(world, rpn)
    g = torch.Generator().manual_seed(seed)
    loads = torch.rand(num_experts, generator=g)
    p = plan_hecate(loads, initial_owners(num_experts, world), topo, m, world)
    ids = torch.randint(0, num_experts, (num_slots,), generator=g)
    src = seed % world
    out = choose_replicas(ids, src, p, topo)
    assert out.shape == ids.shape and out.dtype == torch.long
    assert torch.equal(out, choose_replicas(ids.clone(), src, p, topo))  # deterministic
    for e in range(num_experts):
        copies = p.copies[e]
        got = out[ids == e]
        if got.numel() == 0:
            continue
        assert all(r in copies for r in got.tolist())  # only ranks holding a copy
        if src in copies:
            expected = [src]
        else:
            local = [r for r in copies if topo.same_node(r, src)]
            expected = local or list(copies)
        assert set(got.tolist()) <= set(expected)  # best tier only
        counts = torch.tensor([int((got == r).sum()) for r in expected])
        assert int(counts.max() - counts.min()) <= 1  # even split


def test_candidate_table_shapes_and_errors():
    p = LayerPlacement.from_lists([0, 3], [[0, 1], [3]])  # expert 0 is remote for rank 3
    table, counts = candidate_table(p, TOPO, 3)
    assert table.shape == (2, 2) and counts.tolist() == [2, 1]
    assert set(table[0].tolist()) == {0, 1}
    with pytest.raises(ValueError, match="src_rank=4"):
        choose_replicas(torch.tensor([0]), 4, p, TOPO)
    with pytest.raises(ValueError, match="expert ids must be in 0..1"):
        choose_replicas(torch.tensor([2]), 0, p, TOPO)
    assert choose_replicas(torch.empty(0, dtype=torch.long), 0, p, TOPO).numel() == 0


def test_rank_loads_matches_simulated_dispatch():
    topo = Topology(8, 4)
    loads = torch.tensor([1.0 / (e + 1) ** 1.2 for e in range(16)])
    p = plan_hecate(loads, initial_owners(16, 8), topo, 2, 4)
    per_src = 800  # slots each source sends to each expert unit of load
    counts = (loads * per_src).round().long()  # [E] per source
    ids = torch.repeat_interleave(torch.arange(16), counts)
    simulated = sum(torch.bincount(choose_replicas(ids, s, p, topo), minlength=8) for s in range(8)).double()
    predicted = rank_loads(counts.double() * 8, p, topo)
    assert torch.allclose(predicted, simulated, atol=8.0)  # round-robin remainders only
    assert torch.allclose(share_matrix(p, topo).sum(1), torch.ones(16, dtype=torch.float64))
    assert torch.isclose(predicted.sum(), counts.double().sum() * 8)


def test_choose_replicas_is_fast():
    topo = Topology(16, 8)
    loads = torch.tensor([1.0 / (e + 1) for e in range(64)])
    p = plan_hecate(loads, initial_owners(64, 16), topo, 2, 4)
    ids = torch.multinomial(loads, 16384, replacement=True, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a CPU worker; intra-op threads on busy cores cost 30x here
    try:
        choose_replicas(ids, 3, p, topo)  # warm the cache
        start = time.perf_counter()
        for _ in range(20):
            choose_replicas(ids, 3, p, topo)
        elapsed = (time.perf_counter() - start) / 20
    finally:
        torch.set_num_threads(threads)
    assert elapsed < 0.02  # ~1 ms measured; generous bound for a loaded machine


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(4, 1), (4, 2), (8, 4), (6, 3), (8, 8)]), st.integers(2, 9), st.integers(0, 2**16))
def test_share_matrix_equals_candidates_loop(shape, num_experts, seed):
    """share_matrix's closed form is the `candidates` rule summed over sources."""
    world, rpn = shape
    topo = Topology(world, rpn)
    g = torch.Generator().manual_seed(seed)
    owners = torch.randint(0, world, (num_experts,), generator=g).tolist()
    copies = [(torch.rand(world, generator=g) < 0.3).nonzero()[:, 0].tolist() for _ in range(num_experts)]
    p = LayerPlacement.from_lists(owners, copies)
    loop = torch.zeros(num_experts, world, dtype=torch.float64)
    for src in range(world):
        for e, c in enumerate(p.copies):
            cand = candidates(c, src, topo)
            loop[e, list(cand)] += 1.0 / (len(cand) * world)
    assert copy_mask(p, world).sum().item() == sum(len(c) for c in p.copies)
    assert torch.allclose(share_matrix(p, topo), loop, rtol=1e-12, atol=1e-15)
