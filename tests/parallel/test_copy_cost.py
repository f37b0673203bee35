"""FSSDP's copy cost gate: copies only where the compute they save beats the bytes they move."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.parallel.copy_cost import (
    DEVICE_DEFAULTS,
    CopyCost,
    copies_can_pay,
    expert_flops_per_slot,
    gate_copies,
    overlap_budget_from_model,
)
from sparsetrain.parallel.placement import LayerPlacement, initial_owners
from sparsetrain.parallel.planners import plan_hecate, plan_lpt_spill
from sparsetrain.parallel.topology import Topology

D, F, E = 128, 256, 8  # the tiny preset's expert shape


def _cost(gbps: float | None = None, tflops: float | None = None, t: int = 0) -> CopyCost:
    intra, _, tf = DEVICE_DEFAULTS["cpu"]
    return CopyCost(3 * D * F * 4, expert_flops_per_slot(D, F), 1e12 * (tflops or tf), 1e9 * (gbps or intra),
                    3, t)


def _zipf(s: float, slots: int = 4096) -> torch.Tensor:
    w = torch.arange(1, E + 1, dtype=torch.float64).pow(-s)
    return slots * w / w.sum()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("planner", [plan_hecate, plan_lpt_spill])
def test_uniform_loads_keep_zero_copies(world, planner):
    topo, owners = Topology(world, world), initial_owners(E, world)
    loads = torch.full((E,), 4096.0 / E)
    loads[0] += 3.0  # routing noise: a few slots
    proposed = planner(loads, owners, topo, 2, E)
    gated = gate_copies(loads, proposed, topo, _cost())
    assert gated == LayerPlacement.from_owners(owners)
    assert not copies_can_pay(loads, tuple(owners), topo, _cost())


def test_skewed_loads_keep_the_copies_that_pay():
    topo, owners = Topology(2, 2), initial_owners(E, 2)
    loads = _zipf(1.2)  # experts 0 and 1 (both on rank 0) carry most slots
    proposed = plan_hecate(loads, owners, topo, 2, E)
    assert any(len(c) > 1 for c in proposed.copies)
    cost = _cost()
    assert copies_can_pay(loads, tuple(owners), topo, cost)
    p0 = LayerPlacement.from_owners(owners)
    assert cost.gain_s(loads, p0, proposed, topo) > cost.cost_s(proposed, 2) > 0
    assert gate_copies(loads, proposed, topo, cost) is proposed
    # the same copies over a link 1000x slower cost more than they save
    slow = _cost(gbps=DEVICE_DEFAULTS["cpu"][0] / 1000)
    assert gate_copies(loads, proposed, topo, slow) == p0


def test_cost_counts_the_busiest_ranks_transfers_less_the_overlap():
    owners = [0, 0, 1, 1]
    p1 = LayerPlacement.from_lists(owners, [[0, 1, 2, 3], [0, 1], [1], [1]])  # rank 0 sends 4 chunks
    cost = _cost(t=0)
    per_chunk = cost.chunk_bytes / cost.bytes_per_s
    assert cost.cost_s(p1, 4) == pytest.approx(3 * 4 * per_chunk)  # spAG + re-gather + spRS
    assert _cost(t=3).cost_s(p1, 4) == pytest.approx((1 + 2 * 4) * per_chunk)  # 3 forward gathers hidden
    assert cost.cost_s(LayerPlacement.from_owners(owners), 4) == 0.0


def test_overlap_budget_from_model():
    assert overlap_budget_from_model(1e9, 1e12, 1e9, 1_000_000, 64) == 1  # 1 ms x 1 GB/s / 1 MB
    assert overlap_budget_from_model(1e12, 1e12, 1e9, 1_000_000, 64) == 64  # capped at the expert count
    with pytest.raises(ValueError, match="must be > 0"):
        overlap_budget_from_model(1e9, 0.0, 1e9, 1, 8)
