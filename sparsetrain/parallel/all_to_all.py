"""Autograd-aware uneven all-to-all for expert-parallel token dispatch and combine.

`exchange_counts` first tells every rank how many rows it will receive from each peer;
`all_to_all_uneven` then moves the rows; its backward is the reverse all-to-all.
Bytes counted under COMM 'all_to_all' are the rows this rank sends to *other* ranks
(its own slot never leaves the process), in forward and in backward alike.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from sparsetrain.parallel.comm import to_comm
from sparsetrain.telemetry.comm import COMM

__all__ = ["all_to_all_uneven", "exchange_counts"]


def exchange_counts(send_counts: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Rows to send to each rank [world] -> rows to receive from each rank [world] (one all_to_all_single)."""
    world = dist.get_world_size(group)
    if send_counts.shape != (world,):
        raise ValueError(f"send_counts: expected shape ({world},), got {tuple(send_counts.shape)}")
    send = to_comm(send_counts.to(torch.long), group).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.to(send_counts.device)


def _counted_bytes(x: Tensor, send_counts: list[int], group: dist.ProcessGroup | None) -> int:
    rank = dist.get_rank(group)
    row = math.prod(x.shape[1:]) * x.element_size()
    return (sum(send_counts) - send_counts[rank]) * row


def post_all_to_all(x: Tensor, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup | None,
                    async_op: bool = False) -> tuple[Tensor, Tensor, dist.Work | None]:
    """Hand x's rows (split by send_counts) to the group's all_to_all and count the bytes; -> (the posted input
    on the comm device, the receive buffer [sum(recv), ...] on the comm device, the work when async_op)."""
    xc = to_comm(x, group).contiguous()
    out = xc.new_empty((sum(recv_counts), *x.shape[1:]))  # [sum(recv), ...]
    work = dist.all_to_all_single(out, xc, recv_counts, send_counts, group=group, async_op=async_op)
    COMM.add("all_to_all", _counted_bytes(x, send_counts, group))
    return xc, out, work


def check_splits(x: Tensor, send_counts: list[int], recv_counts: list[int],
                 group: dist.ProcessGroup | None) -> tuple[list[int], list[int]]:
    """The splits as ints, after checking them against the group and x; a ValueError names what is wrong."""
    world = dist.get_world_size(group)
    send_counts, recv_counts = [int(c) for c in send_counts], [int(c) for c in recv_counts]
    if len(send_counts) != world or len(recv_counts) != world:
        raise ValueError(
            f"send_counts ({len(send_counts)}) and recv_counts ({len(recv_counts)}) need one entry per rank ({world})"
        )
    if x.dim() == 0 or sum(send_counts) != x.shape[0]:
        raise ValueError(f"sum(send_counts)={sum(send_counts)} must equal x.shape[0] (x shape {tuple(x.shape)})")
    if min(send_counts + recv_counts) < 0:
        raise ValueError(f"negative count in send_counts={send_counts} or recv_counts={recv_counts}")
    return send_counts, recv_counts


class _AllToAllUneven(torch.autograd.Function):
    """Forward: rows to peers by send_counts; backward: the same exchange reversed."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup | None
    ) -> Tensor:
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        return post_all_to_all(x, send_counts, recv_counts, group)[1].to(x.device)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        return _AllToAllUneven.apply(grad_out, ctx.recv_counts, ctx.send_counts, ctx.group), None, None, None


def all_to_all_uneven(
    x: Tensor, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup | None = None
) -> Tensor:
    """x [N, d] split by send_counts (sum = N) -> rows from every rank [sum(recv_counts), d], autograd-aware."""
    send_counts, recv_counts = check_splits(x, send_counts, recv_counts, group)
    return _AllToAllUneven.apply(x, send_counts, recv_counts, group)
