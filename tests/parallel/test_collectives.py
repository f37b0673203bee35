"""spAG / spRS / uneven all-to-all against single-process references; the run_distributed harness itself.

Each spawned run checks many seeded cases (asserting inside the ranks), so start-up is paid once per world size.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from sparsetrain.parallel.collectives import (
    TRANSPORTS,
    all_to_all_uneven,
    exchange_counts,
    plan_sparse,
    spag,
    spag_start,
    sprs,
    sprs_start,
)
from sparsetrain.telemetry.comm import COMM, CommStats
from tests.dist_utils import DistributedError, run_distributed

F64 = torch.float64


def random_placement(seed: int, n_experts: int, world: int, max_extra: int) -> tuple[list[int], list[list[int]]]:
    """Owners uniform at random; each expert copied onto 0..max_extra extra ranks."""
    rng = random.Random(seed)
    owners = [rng.randrange(world) for _ in range(n_experts)]
    copies = []
    for o in owners:
        others = [r for r in range(world) if r != o]
        copies.append(sorted([o, *rng.sample(others, rng.randint(0, min(max_extra, len(others))))]))
    return owners, copies


def placements(world: int) -> list[tuple[list[int], list[list[int]]]]:
    """Random placements plus edge cases: no replication, full replication, a rank owning nothing."""
    cases = [random_placement(s, n, world, world - 1) for s, n in [(1, 8), (2, 5), (3, 13), (4, 1)]]
    cases.append(([e % world for e in range(6)], [[e % world] for e in range(6)]))
    cases.append(([0, 0, 0], [list(range(world))] * 3))  # ranks > 0 own nothing, need everything
    return cases


def table(seed: int, rows: int, c: int) -> torch.Tensor:
    """Deterministic [rows, C] fp64 table, identical on every rank."""
    return torch.randn(rows, c, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _check_spag_sprs(rank: int, world: int, transport: str) -> int:
    """Values, gradients, adjointness, byte counts of spag/sprs over every placement; returns #cases."""
    c = 7
    for case, (owners, copies) in enumerate(placements(world)):
        n = len(owners)
        w = table(100 + case, n, c)  # [E, C] full expert table, the single-process reference
        owned_ids = [e for e in range(n) if owners[e] == rank]
        mat_expected = [e for e in range(n) if rank in copies[e]]
        g = [table(1000 * r + case, n, c) for r in range(world)]  # upstream grad per (rank, expert)

        COMM.reset()
        owned = w[owned_ids].clone().requires_grad_(True)
        mat, mat_ids = spag(owned, owned_ids, owners, copies, transport=transport)
        assert mat_ids == mat_expected
        torch.testing.assert_close(mat, w[mat_ids], rtol=0, atol=0)
        (mat * g[rank][mat_ids]).sum().backward()
        want = torch.stack([sum(g[r][e] for r in copies[e]) for e in owned_ids]) if owned_ids else owned.new_empty(0, c)
        torch.testing.assert_close(owned.grad, want, rtol=1e-14, atol=1e-14)

        # bytes: spag forward + its spRS backward, summed over ranks, equal the formula
        counts = torch.tensor([COMM.snapshot().get("spag", 0), COMM.snapshot().get("sprs", 0)])
        dist.all_reduce(counts)
        formula = sum(len(cp) - 1 for cp in copies) * c * 8
        assert counts.tolist() == [formula, formula], (counts.tolist(), formula)

        # adjointness <spAG(x), y> = <x, spRS(y)> (global sums)
        x, y = w[owned_ids], g[rank][mat_ids]
        red, red_ids = sprs(y, mat_ids, owners, copies, transport=transport)
        assert red_ids == owned_ids
        dots = torch.stack([(spag(x, owned_ids, owners, copies, transport=transport)[0] * y).sum(), (x * red).sum()])
        dist.all_reduce(dots)
        assert abs(dots[0] - dots[1]) <= 1e-12 * max(1.0, abs(dots[0].item())), dots.tolist()

        # sprs backward is spag: grad of each materialized row = upstream grad at the owner
        y = y.clone().requires_grad_(True)
        h = table(5000 + case, n, c)
        (sprs(y, mat_ids, owners, copies, transport=transport)[0] * h[owned_ids]).sum().backward()
        torch.testing.assert_close(y.grad, h[mat_ids], rtol=0, atol=0)
    return len(placements(world))


def _spag_sprs_body(rank: int, world: int) -> int:
    return sum(_check_spag_sprs(rank, world, t) for t in TRANSPORTS)  # auto, p2p, a2a


def _async_body(rank: int, world: int) -> bool:
    """Two spag_start handles in flight at once (prefetch), waited in order, equal the blocking spag."""
    c = 5
    layers = [random_placement(10 + i, 9, world, 2) for i in range(2)]
    owned, handles = [], []
    for i, (owners, copies) in enumerate(layers):
        ids = [e for e in range(9) if owners[e] == rank]
        owned.append(table(20 + i, 9, c)[ids].clone().requires_grad_(True))
        handles.append(spag_start(owned[-1], ids, owners, copies))
    _ = torch.randn(64, 64) @ torch.randn(64, 64)  # compute overlapping the transfers
    loss = torch.zeros((), dtype=F64)
    for i, ((owners, copies), hd) in enumerate(zip(layers, handles)):
        mat, mat_ids = hd.wait()
        ref, ref_ids = spag(owned[i].detach(), list(hd.plan.owned_ids), owners, copies)
        assert mat_ids == ref_ids
        torch.testing.assert_close(mat, ref, rtol=0, atol=0)
        loss = loss + (mat * table(30 + i + 100 * rank, 9, c)[mat_ids]).sum()
        with pytest.raises(RuntimeError, match="twice"):
            hd.wait()
    loss.backward()
    for i, (owners, copies) in enumerate(layers):
        ids = [e for e in range(9) if owners[e] == rank]
        want = [sum(table(30 + i + 100 * r, 9, c)[e] for r in copies[e]) for e in ids]
        torch.testing.assert_close(owned[i].grad, torch.stack(want) if want else owned[i].grad, rtol=1e-14, atol=0)
    return True


def _sprs_async_body(rank: int, world: int) -> bool:
    """Two sprs_start handles in flight at once (as backward posts them), waited last-first, equal sprs."""
    c = 5
    layers = [random_placement(40 + i, 9, world, 2) for i in range(2)]
    mats, handles = [], []
    for i, (owners, copies) in enumerate(layers):
        mat_ids = [e for e in range(9) if rank in copies[e]]
        mats.append(table(50 + i + 100 * rank, 9, c)[mat_ids].clone())
        handles.append(sprs_start(mats[-1], mat_ids, owners, copies))
    _ = torch.randn(64, 64) @ torch.randn(64, 64)  # compute overlapping the transfers
    for i in reversed(range(2)):
        owners, copies = layers[i]
        got, ids = handles[i].wait()
        ref, ref_ids = sprs(mats[i], list(handles[i].plan.mat_ids), owners, copies)
        assert ids == ref_ids == [e for e in range(9) if owners[e] == rank]
        torch.testing.assert_close(got, ref, rtol=0, atol=0)  # same summation order: bitwise equal
        with pytest.raises(RuntimeError, match="twice"):
            handles[i].wait()
    return True


def _subgroup_body(rank: int, world: int) -> list[int] | None:
    """spag over a subgroup [1, 3] of a 4-rank world: placement ranks are group ranks."""
    sub = dist.new_group([1, 3])
    if rank not in (1, 3):
        return None
    owners, copies = [0, 1, 1], [[0, 1], [0, 1], [1]]
    me = dist.get_rank(sub)
    w = table(7, 3, 4)
    ids = [e for e in range(3) if owners[e] == me]
    for t in TRANSPORTS:
        mat, mat_ids = spag(w[ids], ids, owners, copies, sub, transport=t)
        torch.testing.assert_close(mat, w[mat_ids], rtol=0, atol=0)
    return mat_ids


def a2a_counts(seed: int, world: int) -> list[list[int]]:
    """counts[src][dst], with zeros; rank 0 sends nothing in every other case."""
    rng = random.Random(seed)
    counts = [[rng.choice([0, 0, 1, 3]) for _ in range(world)] for _ in range(world)]
    if seed % 2:
        counts[0] = [0] * world
    return counts


def _a2a_body(rank: int, world: int) -> int:
    """all_to_all_uneven forward/backward and exchange_counts against the reference, zero splits included."""
    d, cases = 3, [a2a_counts(s, world) for s in range(6)] + [[[0] * world for _ in range(world)]]
    for case, counts in enumerate(cases):
        send = counts[rank]
        recv = exchange_counts(torch.tensor(send), None).tolist()
        assert recv == [counts[q][rank] for q in range(world)]
        xs = [table(50 * case + r, sum(counts[r]), d) for r in range(world)]  # every rank's input
        gs = [table(7000 + 50 * case + r, sum(recv_r), d) for r, recv_r in
              enumerate([[counts[q][p] for q in range(world)] for p in range(world)])]
        COMM.reset()
        x = xs[rank].clone().requires_grad_(True)
        out = all_to_all_uneven(x, send, recv)
        parts = [xs[q].split(counts[q])[rank] for q in range(world)]  # what q sends to me
        torch.testing.assert_close(out, torch.cat(parts), rtol=0, atol=0)
        (out * gs[rank]).sum().backward()
        # grad of my rows sent to p = the slice of p's upstream grad that came from me
        want = torch.cat([gs[p].split([counts[q][p] for q in range(world)])[rank] for p in range(world)])
        torch.testing.assert_close(x.grad, want, rtol=0, atol=0)
        off_rank = (sum(send) - send[rank]) + (sum(recv) - recv[rank])  # forward + backward rows
        assert COMM.snapshot().get("all_to_all", 0) == off_rank * d * 8
    return len(cases)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_spag_sprs(world: int) -> None:
    """Values, owner grads, adjointness and byte counts for both transports."""
    assert run_distributed(_spag_sprs_body, world) == [len(TRANSPORTS) * len(placements(world))] * world


@pytest.mark.distributed
def test_spag_start_wait_equals_spag() -> None:
    assert run_distributed(_async_body, 4) == [True] * 4


@pytest.mark.distributed
def test_sprs_start_wait_equals_sprs() -> None:
    assert run_distributed(_sprs_async_body, 4) == [True] * 4


@pytest.mark.distributed
def test_spag_on_subgroup() -> None:
    assert run_distributed(_subgroup_body, 4) == [None, [0, 1], None, [0, 1, 2]]


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_uneven(world: int) -> None:
    assert run_distributed(_a2a_body, world) == [7] * world


def _fail_body(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank one says no")
    dist.barrier()  # rank 0 would hang here: the harness must kill it


def _sleep_body(rank: int, world: int) -> None:
    import time

    time.sleep(60)


def _echo_body(rank: int, world: int, tag: str) -> tuple[int, int, str]:
    import os

    assert os.environ["RANK"] == str(rank) and torch.get_num_threads() == 1
    return rank, world, tag


@pytest.mark.distributed
def test_harness_results_failures_timeout() -> None:
    """Results come back in rank order; a rank's exception and a hang both raise in the parent."""
    assert run_distributed(_echo_body, 3, "x") == [(0, 3, "x"), (1, 3, "x"), (2, 3, "x")]
    with pytest.raises(DistributedError, match="(?s)rank 1 failed.*rank one says no"):
        run_distributed(_fail_body, 2)
    with pytest.raises(DistributedError, match="timed out"):
        run_distributed(_sleep_body, 2, timeout=1)


@pytest.mark.unit
def test_plan_rejects_bad_placements() -> None:
    with pytest.raises(ValueError, match="include the owner"):
        plan_sparse([0, 1], [[1], [1]], 0, 2)
    with pytest.raises(ValueError, match="sorted unique"):
        plan_sparse([0], [[1, 0]], 0, 2)
    with pytest.raises(ValueError, match="not a rank"):
        plan_sparse([2], [[2]], 0, 2)
    p = plan_sparse([0, 1, 0], [[0, 1], [0, 1], [0]], 0, 2)
    assert p.owned_ids == (0, 2) and p.mat_ids == (0, 1, 2) and p.send_rows == ((), (0,)) and p.recv_rows == ((), (1,))
    assert p.n_pairs == 2 and p.transport("auto") == "a2a" and p.transport("p2p") == "p2p"
    sparse = plan_sparse([0] * 3 + [1, 2, 3], [[0, 1, 2, 3]] * 3 + [[1], [2], [3]], 2, 4)
    assert sparse.n_pairs == 3 and sparse.transport("auto") == "p2p"
    with pytest.raises(ValueError, match="transport"):
        sparse.transport("nccl")


@pytest.mark.unit
def test_comm_stats() -> None:
    s = CommStats()
    s.add("spag", 10)
    s.add("spag", 5)
    s.add("sprs", 1)
    assert s.step_totals() == {"spag": 15, "sprs": 1} and s.step_totals() == {}
    s.add("spag", 2)
    assert s.snapshot() == {"spag": 17, "sprs": 1} and s.calls() == {"spag": 3, "sprs": 1}
    s.reset()
    assert s.snapshot() == {} and s.step_totals() == {}
    with pytest.raises(ValueError):
        s.add("x", -1)


def _p2p_warmers(rank: int, world: int) -> list[str]:
    """Which exchanges called `ensure_p2p_ready` on this rank: a p2p spAG and a re-shard in which rank 2 sends
    and receives nothing (on NCCL every rank must join the group's first P2P call)."""
    from unittest import mock

    from sparsetrain.model.experts import GroupedExperts
    from sparsetrain.parallel import reshard, sparse_collectives
    from sparsetrain.parallel.ep import keep_expert_rows

    calls: list[str] = []
    owners, copies = [0, 1, 2], [[0, 1], [1], [2]]  # rank 0 -> rank 1 only
    rows = torch.ones(1, 4) * rank
    with mock.patch.object(sparse_collectives, "ensure_p2p_ready", lambda g: calls.append("spag")):
        spag(rows, [rank], owners, copies, transport="p2p")
    mod = GroupedExperts(3, 2, 4)
    keep_expert_rows(mod, [rank])
    opt = torch.optim.AdamW(mod.parameters())
    with mock.patch.object(reshard, "ensure_p2p_ready", lambda g: calls.append("reshard")):
        reshard.move_ownership([mod], opt, [owners], [[1, 0, 2]], rank, dist.group.WORLD)  # 0 <-> 1; 2 stays
    return calls


def test_every_rank_warms_p2p_even_without_traffic() -> None:
    assert run_distributed(_p2p_warmers, 3) == [["spag", "reshard"]] * 3
