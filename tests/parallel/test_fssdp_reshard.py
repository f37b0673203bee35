"""FSSDP's re-shard decisions (`fssdp_reshard`): scheduled and early, on a stand-in strategy (no processes)."""
from __future__ import annotations

import torch

from benchmarks.trace_placement import ExpertShape, set_owners, stand_in_strategy
from sparsetrain.parallel import fssdp_reshard
from sparsetrain.parallel.copy_cost import CopyCost
from sparsetrain.parallel.placement import reshard_owners_min_moves

E, L, WORLD, SLOTS = 16, 2, 2, 4096
_Experts = ExpertShape()  # the benchmark's d_model 128, d_ffn 2048


def _strategy(every: int = 5, window: int = 3, gate: bool = True):
    """A stand-in strategy: CPU device-default machine numbers (gate on), no copies, contiguous owners."""
    return stand_in_strategy(L, E, WORLD, every, window, gate=gate)


def _zipf(perm_seed: int) -> torch.Tensor:
    """[L, E] slots: Zipf(1.2) shares over a seeded permutation of the experts, per layer."""
    share = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
    share /= share.sum()
    g = torch.Generator().manual_seed(perm_seed)
    return torch.stack([(SLOTS * share)[torch.randperm(E, generator=g)] for _ in range(L)]).round()


def _imbalance(loads: torch.Tensor, owners: list[list[int]]) -> float:
    per = [torch.zeros(WORLD, dtype=torch.float64).index_add_(0, torch.tensor(o), loads[li])
           for li, o in enumerate(owners)]
    return max(float(p.max() / p.mean()) for p in per)


def test_early_reshard_follows_a_moved_hot_set_on_the_second_step():
    """Owners balanced for hot set A; the routing moves to B. After B's first step nothing moves (owners fitted to
    the step before were A's, and they do not pay on B); after its second the owners are fitted to B."""
    a, b = _zipf(1), _zipf(2)
    s = _strategy()
    set_owners(s, reshard_owners_min_moves(a, s.owners, s.topo))
    for _ in range(3):
        s.tracker.update(a)
        assert fssdp_reshard.early_target(s, _Experts) is None  # stationary: nothing to do
    assert _imbalance(b, s.owners) > 1.1  # the move leaves A's owners unbalanced on B
    s.tracker.update(b)
    assert fssdp_reshard.early_target(s, _Experts) is None
    s.tracker.update(b)
    new = fssdp_reshard.early_target(s, _Experts)
    assert new is not None and _imbalance(b, new) < 1.05
    assert s.reshards_gated == 0  # early checks are not counted as refused scheduled re-shards


def test_sampling_noise_alone_never_triggers_an_early_reshard():
    """Each step's slots drawn from one fixed skewed distribution (multinomial noise only), owners balanced for
    its mean: 40 steps, no early re-shard."""
    mean = _zipf(3)
    s = _strategy()
    set_owners(s, reshard_owners_min_moves(mean, s.owners, s.topo))
    g = torch.Generator().manual_seed(0)
    fired = 0
    for _ in range(40):
        step = torch.stack([torch.multinomial(mean[li], SLOTS, replacement=True, generator=g).bincount(minlength=E)
                            for li in range(L)]).double()
        s.tracker.update(step)
        fired += fssdp_reshard.early_target(s, _Experts) is not None
    assert fired == 0


def test_early_reshard_needs_two_steps_of_history():
    """With one step of history (window 1) there is nothing held out: no early re-shard."""
    a, b = _zipf(1), _zipf(2)
    s = _strategy(window=1)
    set_owners(s, reshard_owners_min_moves(a, s.owners, s.topo))
    for loads in (a, b, b, b):
        s.tracker.update(loads)
        assert fssdp_reshard.early_target(s, _Experts) is None


def test_early_reshard_without_the_gate_uses_the_held_out_imbalance():
    """Gate off: owners fitted to the step before must balance the last step by RESHARD_GAIN. A moved hot set
    re-shards on its second step; a step that looks like the one before does not."""
    a, b = _zipf(1), _zipf(2)
    s = _strategy(gate=False)
    set_owners(s, reshard_owners_min_moves(a, s.owners, s.topo))
    fired = []
    for loads in (a, a, b, b):
        s.tracker.update(loads)
        fired.append(fssdp_reshard.early_target(s, _Experts) is not None)
    assert fired == [False, False, False, True]


def test_scheduled_target_counts_refusals_and_moves_when_it_pays():
    """The scheduled re-shard from contiguous owners on Zipf loads pays on the CPU numbers; with a link so slow
    that a move takes minutes it is refused and counted."""
    s = _strategy()
    for _ in range(3):
        s.tracker.update(_zipf(1))
    new = fssdp_reshard.scheduled_target(s, _Experts)
    assert new is not None and _imbalance(_zipf(1), new) < 1.05 and s.reshards_gated == 0
    slow = _strategy()
    slow.cost = CopyCost(**{**slow.cost.__dict__, "bytes_per_s": 1e3})
    for _ in range(3):
        slow.tracker.update(_zipf(1))
    assert fssdp_reshard.scheduled_target(slow, _Experts) is None and slow.reshards_gated == 1
