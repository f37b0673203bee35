"""The token exchange's overlap: split-phase all-to-all (start/wait) and the overlapped exchange_and_compute
against the serial one (values and gradients)."""
from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.parallel.test_collectives import a2a_counts, table


def _reference(xs: list[torch.Tensor], counts: list[list[int]], rank: int) -> torch.Tensor:
    world = len(xs)
    return torch.cat([xs[q].split(counts[q])[rank] for q in range(world)])  # what every q sends to me


def _start_wait_body(rank: int, world: int) -> int:
    """a2a_start/a2a_wait (with other work in between) equal all_to_all_uneven: rows and grads, for zero
    splits, fp32/bf16/fp64 and rows of more than one dimension."""
    from sparsetrain.parallel.a2a_overlap import a2a_start, a2a_wait
    from sparsetrain.parallel.all_to_all import all_to_all_uneven
    from sparsetrain.telemetry.comm import COMM

    cases = [a2a_counts(s, world) for s in range(6)] + [[[0] * world for _ in range(world)]]
    done = 0
    for case, counts in enumerate(cases):
        for dtype, shape in ((torch.float32, (3,)), (torch.bfloat16, (2, 5)), (torch.float64, (4,))):
            numel = int(torch.tensor(shape).prod())
            send, recv = counts[rank], [counts[q][rank] for q in range(world)]
            xs = [table(50 * case + r, sum(counts[r]), numel).to(dtype).view(-1, *shape) for r in range(world)]
            g = table(900 + 50 * case + rank, sum(recv), numel).to(dtype).view(-1, *shape)
            grads, bytes_ = [], []
            for split_phase in (False, True):
                COMM.reset()
                x = xs[rank].clone().requires_grad_(True)
                if split_phase:
                    buf, ticket = a2a_start(x, send, recv)
                    busy = torch.ones(64, 64) @ torch.ones(64, 64)  # other work while the rows travel
                    out = a2a_wait(buf, ticket) + 0 * busy.sum().to(dtype)
                else:
                    out = all_to_all_uneven(x, send, recv)
                assert torch.equal(out, _reference(xs, counts, rank)), (case, dtype, split_phase)
                (out * g).sum().backward()
                grads.append(x.grad)
                bytes_.append(COMM.snapshot().get("all_to_all", 0))
            assert torch.equal(grads[0], grads[1]) and bytes_[0] == bytes_[1], (case, dtype, bytes_)
            done += 1
    return done


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_start_wait_equals_all_to_all(world: int) -> None:
    assert run_distributed(_start_wait_body, world) == [7 * 3] * world


def test_wait_without_start_is_refused() -> None:
    from sparsetrain.parallel.a2a_overlap import A2ATicket

    with pytest.raises(RuntimeError, match="no all-to-all in flight"):
        A2ATicket([1], [1], None, torch.device("cpu")).complete()


def _exchange_body(rank: int, world: int, capacity: float) -> list[tuple[str, float]]:
    """exchange_and_compute overlapped (own slots computed while the exchanges travel) equals the serial
    exchange: output, input grads, expert grads (fp64), dropped slots, per-expert counts."""
    from sparsetrain.model.experts import GroupedExperts
    from sparsetrain.model.router import TopKRouter
    from sparsetrain.parallel.token_exchange import exchange_and_compute

    torch.manual_seed(0)
    e, k, d, t = 8, 2, 16, 48
    router = TopKRouter(d, e, k).double()
    experts = GroupedExperts(e, d, 32).double()
    experts.reset_parameters(0.1, 0.1)
    torch.manual_seed(1 + rank)
    x0 = torch.randn(t, d, dtype=torch.float64)
    owner = torch.tensor([(i * 3) % world for i in range(e)])  # uneven: some ranks own more experts
    ids = [i for i in range(e) if int(owner[i]) == rank]
    results = []
    for overlap in (False, True):
        x = x0.clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        route = router(x)
        slot_rank = owner[route.expert_ids.reshape(-1)]
        out, dropped, counts = exchange_and_compute(
            x, route, slot_rank, e, ids, lambda xs, c: experts(xs, c, ids=ids), None, capacity,
            overlap=overlap)
        (out * torch.linspace(-1, 1, d, dtype=torch.float64)).sum().backward()
        results.append((out.detach(), x.grad, experts.w1.grad[ids].clone(), dropped, counts.tolist()))
    ref = results[0]
    diffs = []
    for name, r in zip(("overlap",), results[1:]):
        assert r[3] == ref[3] and r[4] == ref[4], (name, r[3:], ref[3:])
        diffs.append((name, max(float((a - b).abs().max()) for a, b in zip(r[:3], ref[:3]))))
    return diffs


@pytest.mark.distributed
@pytest.mark.parametrize("capacity", [0.0, 1.0])
def test_overlapped_exchange_equals_serial(capacity: float) -> None:
    for diffs in run_distributed(_exchange_body, 4, capacity):
        assert all(diff < 1e-12 for _, diff in diffs), diffs
