"""FSSDP's copy cost gate: copies only where the compute they save beats the bytes they move."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

from sparsetrain.model.experts import GroupedExperts
from sparsetrain.parallel.copy_cost import (
    DEVICE_DEFAULTS,
    CopyCost,
    copies_can_pay,
    expert_flops_per_slot,
    gate_copies,
    measure_expert_flops,
    overlap_budget_from_model,
    placement_time_s,
    reshard_cost_s,
    reshard_net_s,
    reshard_pays,
)
from sparsetrain.parallel.placement import LayerPlacement, initial_owners
from sparsetrain.parallel.planners import plan_hecate, plan_lpt_spill
from sparsetrain.parallel.topology import Topology

D, F, E = 128, 256, 8  # the tiny preset's expert shape


def _cost(gbps: float = 1.0, tflops: float = 0.02, t: int = 0) -> CopyCost:
    """The gate's logic under pinned machine numbers (not the device defaults, which are measurements)."""
    return CopyCost(3 * D * F * 4, expert_flops_per_slot(D, F), 1e12 * tflops, 1e9 * gbps, 3, t)


def _default_cost() -> CopyCost:
    intra, _, tflops = DEVICE_DEFAULTS["cpu"]
    return _cost(intra, tflops)


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
    for cost in (_cost(), _default_cost()):
        assert gate_copies(loads, proposed, topo, cost) == LayerPlacement.from_owners(owners)
        assert not copies_can_pay(loads, tuple(owners), topo, cost)


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
    slow = _cost(gbps=1e-3)
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


# ------------------------------------------------------------------ re-shard gate
def test_reshard_cost_counts_the_busiest_rank_over_all_layers():
    old = [[0, 0, 1, 1], [0, 0, 1, 1]]
    new = [[1, 0, 0, 1], [0, 0, 1, 1]]  # layer 0 swaps experts 0 and 2 (each rank sends 1, receives 1); layer 1 stays
    assert reshard_cost_s(old, new, 2, 1000, 1e6) == pytest.approx(1e-3)
    new = [[1, 1, 1, 1], [0, 1, 1, 1]]  # rank 1 receives 2 + 1
    assert reshard_cost_s(old, new, 2, 1000, 1e6) == pytest.approx(3e-3)
    new = [[0, 0, 0, 1], [0, 0, 1, 0]]  # rank 1 -> 0 in each layer: one batch, rank 1 sends 2
    assert reshard_cost_s(old, new, 2, 1000, 1e6) == pytest.approx(2e-3)
    new = [[1, 0, 1, 1], [0, 0, 1, 0]]  # layer 0: rank 0 -> 1; layer 1: rank 1 -> 0: both in flight at once
    assert reshard_cost_s(old, new, 2, 1000, 1e6) == pytest.approx(1e-3)
    assert reshard_cost_s(old, old, 2, 1000, 1e6) == 0.0


def _hand_cost() -> CopyCost:
    """1 slot = 1 ms of expert compute; 1 MB/s link; chunks of 1 kB (copies are not part of these cases)."""
    return CopyCost(chunk_bytes=1000, flops_per_slot=1e6, flops_per_s=1e9, bytes_per_s=1e6, passes=3)


def test_reshard_pays_when_the_saved_compute_beats_the_moves():
    topo = Topology(2, 2)
    loads = torch.tensor([[300.0, 100.0, 100.0, 100.0]])  # owners [0, 0, 1, 1]: rank loads 400 / 200
    before = [LayerPlacement.from_owners([0, 0, 1, 1])]
    after = [LayerPlacement.from_owners([0, 1, 0, 1])]  # swap experts 1 and 2: 400 / 200 -> 400 / 200: no gain
    assert reshard_net_s(loads, before, after, topo, _hand_cost(), 10_000, 5) == pytest.approx(-0.01)
    after = [LayerPlacement.from_owners([0, 1, 1, 1])]  # expert 1 to rank 1: 300 / 300, busiest rank -100 slots
    cost = _hand_cost()
    # gain 100 slots x 1 ms x 5 steps = 0.5 s; cost 1 moved expert x 10 kB / 1 MB/s = 0.01 s
    assert placement_time_s(loads[0], after[0], topo, cost) == pytest.approx(0.3)
    assert reshard_net_s(loads, before, after, topo, cost, 10_000, 5) == pytest.approx(0.49)
    assert reshard_pays(loads, before, after, topo, cost, 10_000, 5)
    # the same move of 1 MB per expert: 1 s of transfer for 0.5 s of compute saved until the next re-shard
    assert reshard_net_s(loads, before, after, topo, cost, 1_000_000, 5) == pytest.approx(-0.5)
    assert not reshard_pays(loads, before, after, topo, cost, 1_000_000, 5)
    # ... which pays again when the next re-shard is 20 steps away: 2 s saved
    assert reshard_pays(loads, before, after, topo, cost, 1_000_000, 20)


def test_reshard_refused_when_loads_are_already_balanced():
    """Routing noise (a few slots) does not pay for moving experts with their Adam state (tiny preset, CPU numbers)."""
    topo, owners = Topology(2, 2), initial_owners(E, 2)  # [0, 0, 0, 0, 1, 1, 1, 1]
    loads = torch.full((1, E), 4096.0 / E)
    loads[0, 0] += 6.0
    loads[0, E - 1] -= 6.0  # rank loads 2054 / 2042
    cost = _cost()
    before = [LayerPlacement.from_owners(owners)]
    swapped = list(owners)
    swapped[0], swapped[E - 2] = 1, 0  # swap the hot expert with a rank-1 expert at the mean: 2048 / 2048
    after = [LayerPlacement.from_owners(swapped)]
    move = 3 * 3 * D * F * 4  # params + exp_avg + exp_avg_sq, fp32
    gain = 5 * 6 * cost.flops_per_slot / cost.flops_per_s  # 6 slots off the busiest rank for 5 steps: 0.88 ms
    assert reshard_net_s(loads, before, after, topo, cost, move, 5) == pytest.approx(gain - move / cost.bytes_per_s)
    assert not reshard_pays(loads, before, after, topo, cost, move, 5)  # one expert each way: 1.18 ms
    assert reshard_pays(loads, before, after, topo, cost, move, 10)


def test_reshard_net_counts_the_copies_each_placement_keeps():
    """Old owners that needed a copy (its transfers cost every step) vs new owners without: the re-shard pays
    although it leaves more compute on the busiest rank."""
    topo = Topology(2, 2)
    loads = torch.tensor([[300.0, 100.0, 50.0, 50.0]])
    cost = CopyCost(chunk_bytes=20_000, flops_per_slot=1e6, flops_per_s=1e9, bytes_per_s=1e6, passes=3)
    before = [LayerPlacement.from_lists([0, 0, 1, 1], [[0, 1], [0], [1], [1]])]  # expert 0 copied: 250 / 250
    after = [LayerPlacement.from_owners([0, 1, 1, 1])]  # expert 1 moved, no copies: 300 / 200
    assert placement_time_s(loads[0], before[0], topo, cost) == pytest.approx(0.25 + 3 * 0.02)
    assert placement_time_s(loads[0], after[0], topo, cost) == pytest.approx(0.3)
    assert reshard_net_s(loads, before, after, topo, cost, 1000, 5) == pytest.approx(5 * 0.01 - 1e-3)


def test_gain_is_judged_on_each_steps_loads():
    """Every step waits for its own busiest rank: the gain over n steps' loads is the mean of each step's
    gain, not the gain on their mean (hand-computed: expert 0 copied to rank 1, the hot expert alternates)."""
    topo, owners = Topology(2, 2), [0, 0, 1, 1]
    p0 = LayerPlacement.from_owners(owners)
    p1 = LayerPlacement.from_lists(owners, [[0, 1], [0], [1], [1]])
    steps = torch.tensor([[1000.0, 100, 100, 100], [100, 100, 1000, 100]], dtype=torch.float64)
    cost = _cost()
    per_slot = cost.flops_per_slot / cost.flops_per_s
    # step 0: max 1100 -> 700 (ranks 600 / 700); step 1: max 1100 -> 1150 (the copy draws rank 1's own half)
    assert cost.gain_s(steps, p0, p1, topo) == pytest.approx((400 - 50) / 2 * per_slot)
    assert cost.gain_s(steps.mean(0), p0, p1, topo) == pytest.approx((650 - 925) * per_slot)
    assert cost.gain_s(steps, p0, p1, topo) == pytest.approx(
        sum(cost.gain_s(row, p0, p1, topo) for row in steps) / 2)


def test_measure_expert_flops_draws_no_randomness_and_leaves_weights():
    experts = GroupedExperts(4, D, F)
    experts.reset_parameters(0.02, 0.02)
    before = {k: v.clone() for k, v in experts.state_dict().items()}
    rng = torch.get_rng_state()
    flops = measure_expert_flops(experts, 256, torch.float32, reps=1)
    assert 1e6 < flops < 1e15  # a CPU core: GFLOP/s, never 0 or inf
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in experts.state_dict().items())
    assert all(p.grad is None for p in experts.parameters())


def test_reshard_judged_on_each_recent_step():
    """Loads that move from step to step: their mean promises a gain no single step sees (each step waits for
    its own busiest rank), so the re-shard is refused on the recent steps and would pass on their mean."""
    topo, cost = Topology(2, 2), _hand_cost()
    recent = torch.tensor([[[300.0, 100.0, 100.0, 100.0]], [[100.0, 300.0, 100.0, 100.0]]])  # [n=2, L=1, E=4]
    before = [LayerPlacement.from_owners([0, 0, 1, 1])]  # 400 / 200 on both steps (mean 400 / 200)
    after = [LayerPlacement.from_owners([0, 1, 0, 1])]  # swap experts 1 and 2: 400 / 200, 200 / 400 (mean 300 / 300)
    assert placement_time_s(recent[:, 0], after[0], topo, cost) == pytest.approx(0.4)
    assert reshard_net_s(recent.mean(0), before, after, topo, cost, 10_000, 5) == pytest.approx(0.49)
    assert reshard_net_s(recent, before, after, topo, cost, 10_000, 5) == pytest.approx(-0.01)
    assert not reshard_pays(recent, before, after, topo, cost, 10_000, 5)


def test_measure_expert_flops_runs_on_the_given_device_for_meta_experts():
    """Strategies measure in `apply`, before the model leaves the meta device: timing meta tensors would time
    Python dispatch only (measured: 3.3 TFLOP/s 'on' a 0.25 TFLOP/s CPU core), so the rank's device is passed."""
    with torch.device("meta"):
        experts = GroupedExperts(4, D, F)
    seen = []
    orig = GroupedExperts.forward

    def spy(self, x, counts, ids=None, stacked=None):
        y = orig(self, x, counts, ids, stacked)
        seen.append((x.device.type, {w.device.type for w in stacked.values()}, y.device.type))
        return y

    with mock.patch.object(GroupedExperts, "forward", spy):
        flops = measure_expert_flops(experts, 256, torch.float32, reps=1, device=torch.device("cpu"))
    assert 1e6 < flops < 1e15
    assert seen and all(s == ("cpu", {"cpu"}, "cpu") for s in seen)
    with pytest.raises(ValueError, match="meta"):
        measure_expert_flops(experts, 256, torch.float32, reps=1)
