"""spAG/spRS of the copies alone (`copy_exchange`) against the full-placement pair and a single-process table.

Each spawned run checks every placement of test_collectives (random, none replicated, all replicated, ranks
owning nothing) on every transport, asserting inside the ranks.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sparsetrain.parallel.collectives import TRANSPORTS, sprs
from sparsetrain.parallel.copy_exchange import gather_copies_start, return_copy_grads_start
from sparsetrain.telemetry.comm import COMM
from tests.dist_utils import run_distributed
from tests.parallel.test_collectives import placements, table


def _check(rank: int, world: int, transport: str) -> int:
    c = 6
    for case, (owners, copies) in enumerate(placements(world)):
        n = len(owners)
        w = table(300 + case, n, c)  # [E, C] the whole expert table
        owned_ids = [e for e in range(n) if owners[e] == rank]
        held = [e for e in range(n) if rank in copies[e] and owners[e] != rank]  # copies of other owners' chunks
        asked: list[tuple[int, ...]] = []

        def rows_of(rows: tuple[int, ...], w=w, owned_ids=owned_ids, asked=asked) -> torch.Tensor:
            asked.append(rows)
            return w[[owned_ids[r] for r in rows]].reshape(len(rows), c)  # [n_sent, C]

        COMM.reset()
        got, ids = gather_copies_start(rows_of, owned_ids, owners, copies, transport=transport).wait()
        assert sorted(ids) == held and [owners[e] for e in ids] == sorted(owners[e] for e in ids)  # by source rank
        torch.testing.assert_close(got, w[ids].reshape(len(ids), c), rtol=0, atol=0)
        # the sender builds only the rows some peer needs, once
        need = sorted({owned_ids.index(e) for e in owned_ids if len(copies[e]) > 1})
        assert asked == [tuple(need)], (asked, need)

        # gradients: own share (what autograd leaves in the owner's Parameters) + the returned copies' grads
        g = [table(2000 * r + case, n, c) for r in range(world)]  # each rank's grad per expert
        handle = return_copy_grads_start(g[rank][ids].reshape(len(ids), c), ids, owners, copies, transport=transport)
        own = g[rank][owned_ids].reshape(len(owned_ids), c).clone()
        for rows, part in handle.wait():
            own.index_add_(0, torch.tensor(rows, dtype=torch.long), part)
        want = [sum(g[r][e] for r in copies[e]) for e in owned_ids]
        torch.testing.assert_close(own, torch.stack(want) if want else own, rtol=1e-14, atol=1e-14)
        mat_ids = [e for e in range(n) if rank in copies[e]]  # same sums, same order as the full spRS
        full, _ = sprs(g[rank][mat_ids].reshape(len(mat_ids), c), mat_ids, owners, copies, transport=transport)
        torch.testing.assert_close(own, full, rtol=0, atol=0)

        counts = torch.tensor([COMM.snapshot().get("spag", 0), COMM.snapshot().get("sprs", 0)])
        dist.all_reduce(counts)
        copies_bytes = sum(len(cp) - 1 for cp in copies) * c * 8
        assert counts.tolist() == [copies_bytes, 2 * copies_bytes], counts.tolist()  # + the full sprs above

        with pytest.raises(ValueError, match="do not match"):
            return_copy_grads_start(torch.zeros(len(ids) + 1, c, dtype=torch.float64), ids + [0], owners, copies)
    return len(placements(world))


def _body(rank: int, world: int) -> int:
    return sum(_check(rank, world, t) for t in TRANSPORTS)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_copy_exchange_matches_full_placement(world: int) -> None:
    assert run_distributed(_body, world) == [len(TRANSPORTS) * len(placements(world))] * world
