"""Split-phase, autograd-aware uneven all-to-all: start it, compute something else, then wait.

`a2a_start(x, ...)` posts the all-to-all (async_op=True) and returns the receive buffer plus a ticket;
`a2a_wait(buf, ticket)` waits and hands the rows on. Backward is split the same way: the wait's backward
posts the reverse all-to-all of the incoming gradient, the start's backward waits for it. Autograd runs the
ready node with the highest sequence number first, so work created between start and wait in forward (this
rank's own slots in `token_exchange`, FasterMoE/Tutel-style) also runs between the two halves in backward, while
the reverse exchange is in flight.

On NCCL the collective runs on the process group's stream and `wait` orders the current stream after it; on
gloo it runs on the process group's worker thread while this thread computes. Bytes are counted under COMM
'all_to_all' like `all_to_all_uneven` (rows sent to other ranks, forward and backward).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from sparsetrain.parallel.all_to_all import check_splits, post_all_to_all

__all__ = ["A2ATicket", "a2a_start", "a2a_wait"]


class A2ATicket:
    """One split-phase exchange: its splits, group, and the in-flight work (forward, then backward)."""

    def __init__(self, send: list[int], recv: list[int], group: dist.ProcessGroup | None, device: torch.device):
        self.send, self.recv, self.group, self.device = send, recv, group, device
        self.work: dist.Work | None = None
        self.keep: Tensor | None = None  # the posted input, alive until the exchange completes
        self.out: Tensor | None = None  # receive buffer on the comm device

    def post(self, x: Tensor, send: list[int], recv: list[int]) -> Tensor:
        """Post x's rows (split by send) and return the receive buffer [sum(recv), ...] (not yet filled)."""
        if self.work is not None:
            raise RuntimeError("all-to-all ticket already has an exchange in flight")
        self.keep, self.out, self.work = post_all_to_all(x, send, recv, self.group, async_op=True)
        return self.out

    def complete(self) -> Tensor:
        """Wait for the exchange in flight; its rows on the ticket's device."""
        if self.work is None or self.out is None:
            raise RuntimeError("no all-to-all in flight on this ticket (wait without start?)")
        self.work.wait()
        out = self.out.to(self.device)
        self.work = self.keep = self.out = None
        return out


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, ticket: A2ATicket) -> Tensor:  # type: ignore[override]
        ctx.ticket = ticket
        return ticket.post(x, ticket.send, ticket.recv)

    @staticmethod
    def backward(ctx, grad_buf: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # grad_buf is the placeholder _Wait.backward returned; the reverse exchange fills the real gradient
        return ctx.ticket.complete(), None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf: Tensor, ticket: A2ATicket) -> Tensor:  # type: ignore[override]
        ctx.ticket, ctx.buf = ticket, (buf.shape, buf.dtype, buf.device)
        return ticket.complete()

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        t = ctx.ticket
        t.post(grad_out, t.recv, t.send)  # reverse: the received rows' grads go back to their senders
        shape, dtype, device = ctx.buf
        # a zero-stride placeholder for the buffer's grad: _Start.backward returns what the exchange receives
        return torch.zeros((), dtype=dtype, device=device).expand(shape), None


def a2a_start(x: Tensor, send: list[int], recv: list[int],
              group: dist.ProcessGroup | None = None) -> tuple[Tensor, A2ATicket]:
    """Post x [N, d] (rows split by `send`, sum = N) to the group; -> (buffer, ticket) for `a2a_wait`."""
    send, recv = check_splits(x, send, recv, group)
    ticket = A2ATicket(send, recv, group, x.device)
    return _Start.apply(x, ticket), ticket


def a2a_wait(buf: Tensor, ticket: A2ATicket) -> Tensor:
    """The rows `a2a_start` posted, received: [sum(recv), d] in source-rank order."""
    return _Wait.apply(buf, ticket)
