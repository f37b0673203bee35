"""spAG and spRS of the copies alone: what FSSDP's replicated layers move.

`spag`/`sprs` (`sparse_collectives`) are the adjoint pair over a whole placement: spAG returns every chunk
a rank materializes, its own included, so its own chunks are copied into the gathered buffer and their
gradients come back through it. FSSDP computes a rank's own experts on their Parameters instead (their
gradients land there through autograd) and gathers only the copies it holds for other owners:

  gather_copies_start(rows_of, owned_ids, placement)  -> wait() -> (received [n_recv, C], recv_ids)
  return_copy_grads_start(grads [n_recv, C], recv_ids, placement) -> wait() -> [(owned rows, [n, C])] per peer

The sender builds only the rows it sends (`rows_of(owned rows)`), never its whole owned stack. Received rows
arrive grouped by source rank, ascending (`SparsePlan.recv_ids`); gradients go back in the same layout, and
the owner adds them peer by peer in ascending rank order after its own (deterministic). Same transports
and NCCL side stream as `sparse_collectives`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from torch import Tensor

from sparsetrain.parallel.sparse_collectives import DEFAULT_TRANSPORT, PostedExchange, SparsePlan, plan_sparse
from sparsetrain.telemetry.comm import COMM

__all__ = ["CopiesHandle", "CopyGradsHandle", "gather_copies_start", "return_copy_grads_start"]

RowsOf = Callable[[tuple[int, ...]], Tensor]  # rows of this rank's owned stack -> [len(rows), C] chunks


def _plan(owners: list[int], copies: list[list[int]], group: dist.ProcessGroup | None) -> SparsePlan:
    return plan_sparse(owners, copies, dist.get_rank(group), dist.get_world_size(group))


class _InFlight:
    """One posted exchange, finished once (`_posted` is None after)."""

    _posted: PostedExchange | None

    def _received(self) -> Tensor:
        if self._posted is None:
            raise RuntimeError(f"{type(self).__name__}.wait() called twice")
        recv, self._posted = self._posted.finish(), None
        return recv


class CopiesHandle(_InFlight):
    """Copies in flight to this rank: `wait()` gives (received rows [n_recv, C], their expert ids)."""

    def __init__(self, rows_of: RowsOf, owned_ids: list[int], owners: list[int], copies: list[list[int]],
                 group: dist.ProcessGroup | None, transport: str | None) -> None:
        self.plan = plan = _plan(owners, copies, group)
        if tuple(int(i) for i in owned_ids) != plan.owned_ids:
            raise ValueError(f"owned_ids={list(owned_ids)} do not match the placement, which gives "
                             f"{list(plan.owned_ids)}")
        at = {row: i for i, row in enumerate(plan.sent_owned)}
        src = rows_of(plan.sent_owned).contiguous()  # [n_sent, C]: only the rows some peer needs
        send_rows = tuple(tuple(at[r] for r in rows) for rows in plan.send_rows)
        self._posted = PostedExchange(src, send_rows, [len(r) for r in plan.recv_rows], group,
                                      plan.transport(transport or DEFAULT_TRANSPORT))
        COMM.add("spag", plan.n_send * src.shape[1] * src.element_size())

    def wait(self) -> tuple[Tensor, list[int]]:
        return self._received(), list(self.plan.recv_ids)


class CopyGradsHandle(_InFlight):
    """Copies' gradients in flight to their owners: `wait()` gives, per peer that sent any in ascending rank
    order, (rows of this rank's owned stack, their gradient sums [n, C] from that peer)."""

    def __init__(self, grads: Tensor, recv_ids: list[int], owners: list[int], copies: list[list[int]],
                 group: dist.ProcessGroup | None, transport: str | None) -> None:
        self.plan = plan = _plan(owners, copies, group)
        if tuple(int(i) for i in recv_ids) != plan.recv_ids or grads.shape[0] != len(plan.recv_ids):
            raise ValueError(f"copy grads for experts {list(recv_ids)} ({grads.shape[0]} rows) do not match the "
                             f"placement's copies here {list(plan.recv_ids)}")
        back, off = [], 0  # the received layout is already grouped by owner: send each owner its block
        for rows in plan.recv_rows:
            back.append(tuple(range(off, off + len(rows))))
            off += len(rows)
        self._posted = PostedExchange(grads.detach().contiguous(), tuple(back), [len(r) for r in plan.send_rows],
                                      group, plan.transport(transport or DEFAULT_TRANSPORT))
        COMM.add("sprs", plan.n_recv * grads.shape[1] * grads.element_size())

    def wait(self) -> list[tuple[tuple[int, ...], Tensor]]:
        recv = self._received()
        counts = [len(r) for r in self.plan.send_rows]
        return [(rows, chunk) for rows, chunk in zip(self.plan.send_rows, recv.split(counts)) if rows]


def gather_copies_start(rows_of: RowsOf, owned_ids: list[int], owners: list[int], copies: list[list[int]],
                        group: dist.ProcessGroup | None = None, *, transport: str | None = None) -> CopiesHandle:
    """Post the copies' spAG now (non-blocking, data only); `.wait()` right before they are used."""
    return CopiesHandle(rows_of, owned_ids, owners, copies, group, transport)


def return_copy_grads_start(grads: Tensor, recv_ids: list[int], owners: list[int], copies: list[list[int]],
                            group: dist.ProcessGroup | None = None, *,
                            transport: str | None = None) -> CopyGradsHandle:
    """Post the copies' spRS now (non-blocking, data only): grads [n_recv, C] in `recv_ids` order."""
    return CopyGradsHandle(grads, recv_ids, owners, copies, group, transport)
