"""Sparse all-gather (spAG) and sparse reduce-scatter (spRS) of expert chunks over a placement.

Data model (one MoE layer): a chunk is one whole expert, flattened to a row of C numbers.
  owners[e]  -> the rank that owns expert e (P0, exactly one rank per chunk)
  copies[e]  -> sorted ranks holding a copy this step (P1, owner included)
  owned      -> [n_owned, C] rows for owned_ids = sorted {e : owners[e] == rank}
  materialized -> [n_mat, C] rows for mat_ids = sorted {e : rank in copies[e]}
spAG sends chunk e from owners[e] to every rank in copies[e] \\ {owners[e]}; spRS sends the
materialized copies' rows back and sums them into the owner (own row first, then copies by
ascending rank: deterministic). They are adjoints and each is the other's backward.

Transport. Placements change every step, so no process group is ever created per placement;
all traffic goes over the given fixed group, by one of two transports:
  'p2p': batched point-to-point (`dist.batch_isend_irecv`), one message per (sender, receiver)
         pair carrying all its chunks; ranks with nothing to exchange post nothing.
  'a2a': one `all_to_all_single` with uneven splits; every rank of the group joins.
Measured on this machine (gloo, 4 ranks, 2 cores shared with other jobs, so noisy;
benchmarks/RESULTS.md): when one owner feeds the others (3 of 12 rank pairs
active) p2p was 1.1-2x faster on a quiet machine and even under load; once half or more of
the pairs are active, one a2a was as fast or up to 3x faster (p2p pays a per-message cost
and serial waits). Default 'auto' picks per placement from n_pairs, the number of
(sender, receiver) pairs with traffic, which every rank computes identically from the same
placement: p2p if n_pairs < world (about one sender's fan-out), else a2a.
Re-measure on NCCL before trusting the threshold there. With NCCL, the first P2P call on a
group must involve every rank; the first p2p exchange on an NCCL group runs one barrier
(spag/sprs are always called by every rank of the group).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sparsetrain.kernels import host_to_device
from sparsetrain.parallel.comm import to_comm
from sparsetrain.telemetry.comm import COMM

__all__ = ["DEFAULT_TRANSPORT", "TRANSPORTS", "PostedExchange", "SpAGHandle", "SpRSHandle", "SparsePlan",
           "ensure_p2p_ready", "global_peer", "plan_sparse", "row_index", "spag", "spag_start", "sprs", "sprs_start"]

TRANSPORTS = ("auto", "p2p", "a2a")
DEFAULT_TRANSPORT = "auto"  # chosen by measurement, see module docstring


@dataclass(frozen=True)
class SparsePlan:
    """Who sends which rows to whom for one placement, seen from one rank (spAG direction)."""

    rank: int
    world: int
    owned_ids: tuple[int, ...]
    mat_ids: tuple[int, ...]
    send_rows: tuple[tuple[int, ...], ...]  # [world] rows of `owned` sent to each peer
    recv_rows: tuple[tuple[int, ...], ...]  # [world] rows of `materialized` received from each peer
    owned_in_mat: tuple[int, ...]  # [n_owned] row of each owned chunk inside `materialized`
    n_pairs: int  # (sender, receiver) rank pairs with traffic in the whole placement (same on every rank)
    recv_ids: tuple[int, ...]  # [n_recv] expert of each received row, in arrival order (by source rank)
    sent_owned: tuple[int, ...]  # sorted rows of `owned` sent to at least one peer

    def transport(self, requested: str) -> str:
        """Resolve 'auto': p2p when fewer rank pairs exchange chunks than there are ranks, else one all-to-all."""
        if requested not in TRANSPORTS:
            raise ValueError(f"transport={requested!r}: expected one of {TRANSPORTS}")
        if requested != "auto":
            return requested
        return "p2p" if self.n_pairs < self.world else "a2a"

    @property
    def n_send(self) -> int:
        """Rows this rank sends in spAG (= rows it receives in spRS)."""
        return sum(len(r) for r in self.send_rows)

    @property
    def n_recv(self) -> int:
        """Rows this rank receives in spAG (= rows it sends in spRS)."""
        return sum(len(r) for r in self.recv_rows)


@functools.lru_cache(maxsize=256)
def _plan_cached(owners: tuple[int, ...], copies: tuple[tuple[int, ...], ...], rank: int, world: int) -> SparsePlan:
    if len(owners) != len(copies):
        raise ValueError(f"placement: len(owners)={len(owners)} != len(copies)={len(copies)}")
    send: list[list[int]] = [[] for _ in range(world)]
    recv: list[list[int]] = [[] for _ in range(world)]
    owned_ids = [e for e, o in enumerate(owners) if o == rank]
    owned_row = {e: i for i, e in enumerate(owned_ids)}
    mat_ids = [e for e, c in enumerate(copies) if rank in c]
    mat_row = {e: i for i, e in enumerate(mat_ids)}
    pairs: set[tuple[int, int]] = set()
    for e, (o, c) in enumerate(zip(owners, copies)):
        if not 0 <= o < world:
            raise ValueError(f"placement: owners[{e}]={o} is not a rank in [0, {world})")
        if list(c) != sorted(set(c)) or (c and not (0 <= c[0] and c[-1] < world)):
            raise ValueError(f"placement: copies[{e}]={list(c)} must be sorted unique ranks in [0, {world})")
        if o not in c:
            raise ValueError(f"placement: copies[{e}]={list(c)} must include the owner {o}")
        pairs.update((o, p) for p in c if p != o)
        if o == rank:
            for p in c:
                if p != rank:
                    send[p].append(owned_row[e])
        elif rank in c:
            recv[o].append(mat_row[e])
    return SparsePlan(
        rank=rank,
        world=world,
        owned_ids=tuple(owned_ids),
        mat_ids=tuple(mat_ids),
        send_rows=tuple(tuple(s) for s in send),
        recv_rows=tuple(tuple(r) for r in recv),
        owned_in_mat=tuple(mat_row[e] for e in owned_ids),
        n_pairs=len(pairs),
        recv_ids=tuple(mat_ids[i] for r in recv for i in r),
        sent_owned=tuple(sorted({i for s in send for i in s})),
    )


def plan_sparse(owners: list[int], copies: list[list[int]], rank: int, world: int) -> SparsePlan:
    """Validate a placement and compute this rank's send/receive rows (cached per placement)."""
    return _plan_cached(tuple(int(o) for o in owners), tuple(tuple(int(r) for r in c) for c in copies), rank, world)


def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def global_peer(group: dist.ProcessGroup | None, peer: int) -> int:
    """The global rank of `peer` (a rank of `group`), as point-to-point ops take it."""
    return peer if group is None or group is dist.group.WORLD else dist.get_global_rank(group, peer)


_NCCL_READY: set[int] = set()
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def ensure_p2p_ready(group: dist.ProcessGroup | None) -> None:
    """NCCL needs every rank in the first P2P call on a group: warm it once with a barrier. Every rank of the
    group calls it before its P2P exchange, including ranks that post nothing in it."""
    if dist.get_backend(group) != "nccl":
        return
    key = id(group or dist.group.WORLD)
    if key not in _NCCL_READY:
        dist.barrier(group)
        _NCCL_READY.add(key)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SIDE_STREAMS:
        _SIDE_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _SIDE_STREAMS[idx]


def row_index(rows: tuple[int, ...], device: torch.device) -> Tensor:
    """Row numbers as an index tensor on `device`, copied without a host sync (posted from the side stream: a
    blocking copy there would wait for all compute queued so far)."""
    return host_to_device(torch.tensor(rows, dtype=torch.long), device)


def _post_exchange(
    src: Tensor,
    send_rows: tuple[tuple[int, ...], ...],
    recv_counts: list[int],
    group: dist.ProcessGroup | None,
    transport: str,
) -> tuple[list[dist.Work], Tensor]:
    """Send src[send_rows[p]] to each peer p and post receives; returns (works, recv [sum(recv), C])."""
    world, c = len(send_rows), src.shape[1]
    recv = src.new_empty((sum(recv_counts), c))  # rows grouped by source rank, ascending
    send_counts = [len(r) for r in send_rows]
    flat = [i for r in send_rows for i in r]
    if flat == list(range(src.shape[0])):
        send = src  # rows already in send order
    else:
        # [sum(send), C]
        send = src.index_select(0, row_index(tuple(flat), src.device)) if flat else src.new_empty((0, c))
    if transport == "a2a":
        work = dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group, async_op=True)
        return [work], recv
    if transport != "p2p":
        raise ValueError(f"transport={transport!r}: expected 'p2p' or 'a2a' here ('auto' is resolved by the plan)")
    ensure_p2p_ready(group)  # every rank, also one without traffic here: on NCCL it may be the group's first P2P
    ops = []
    for p, chunk in zip(range(world), send.split(send_counts)):
        if send_counts[p]:
            ops.append(dist.P2POp(dist.isend, chunk, global_peer(group, p), group))
    for q, chunk in zip(range(world), recv.split(recv_counts)):
        if recv_counts[q]:
            ops.append(dist.P2POp(dist.irecv, chunk, global_peer(group, q), group))
    if not ops:
        return [], recv
    return list(dist.batch_isend_irecv(ops)), recv


class PostedExchange:
    """One exchange in flight; on CUDA posted on a side stream so it overlaps compute."""

    def __init__(self, src: Tensor, send_rows: tuple[tuple[int, ...], ...], recv_counts: list[int],
                 group: dist.ProcessGroup | None, transport: str) -> None:
        self.device = src.device
        src = to_comm(src, group)  # no-op on NCCL (CUDA) and on gloo with CPU training
        self._stream = _side_stream(src.device) if src.is_cuda else None  # on the comm device
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(src.device))
            src.record_stream(self._stream)  # read on the side stream while the caller may drop it
            with torch.cuda.stream(self._stream):
                self.works, self.recv = _post_exchange(src, send_rows, recv_counts, group, transport)
        else:
            self.works, self.recv = _post_exchange(src, send_rows, recv_counts, group, transport)

    def finish(self) -> Tensor:
        """Complete the transfers; returns the received rows usable on the current stream."""
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                for w in self.works:
                    w.wait()
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            self.recv.record_stream(current)
        else:
            for w in self.works:
                w.wait()
        return self.recv.to(self.device)


class SpAGHandle:
    """An spAG in flight: `wait()` completes it and returns (materialized, mat_ids), autograd-connected."""

    def __init__(self, owned: Tensor, plan: SparsePlan, group: dist.ProcessGroup | None, transport: str) -> None:
        self.owned, self.plan, self.group, self.transport = owned, plan, group, transport
        with torch.no_grad():
            src = owned.detach()
            self._posted = PostedExchange(src, plan.send_rows, [len(r) for r in plan.recv_rows], group, transport)
        COMM.add("spag", plan.n_send * src.shape[1] * src.element_size())
        self._done = False

    def _finish(self) -> Tensor:
        """Complete the transfers; returns the received rows [n_recv, C] usable on the current stream."""
        return self._posted.finish()

    def wait(self) -> tuple[Tensor, list[int]]:
        """Complete the gather; gradients of the result flow back to `owned` through spRS."""
        if self._done:
            raise RuntimeError("SpAGHandle.wait() called twice")
        self._done = True
        mat = _SpAG.apply(self.owned, self)
        self.owned = self._posted = None  # type: ignore[assignment]  # release buffers
        return mat, list(self.plan.mat_ids)


class SpRSHandle:
    """An spRS in flight (data only, no autograd): `wait()` returns (owned sums [n_owned, C], owned_ids).

    The body of every spRS: the blocking `sprs` (spAG's backward) posts one and waits at once;
    FSSDP posts one as soon as a layer's chunk gradients are complete, so it overlaps the backward
    of the layers before it. The owner's own rows come first, then the copies' rows by ascending
    source rank.
    """

    def __init__(self, mat: Tensor, plan: SparsePlan, group: dist.ProcessGroup | None, transport: str) -> None:
        self.plan = plan
        with torch.no_grad():
            mat = mat.detach().contiguous()
            self._posted = PostedExchange(mat, plan.recv_rows, [len(r) for r in plan.send_rows], group, transport)
            self._own = mat.index_select(0, row_index(plan.owned_in_mat, mat.device))  # [n_owned, C]
        COMM.add("sprs", plan.n_recv * mat.shape[1] * mat.element_size())
        self._done = False

    def wait(self) -> tuple[Tensor, list[int]]:
        if self._done:
            raise RuntimeError("SpRSHandle.wait() called twice")
        self._done = True
        out, recv, plan = self._own, self._posted.finish(), self.plan
        for rows, chunk in zip(plan.send_rows, recv.split([len(r) for r in plan.send_rows])):
            if rows:  # peers in ascending rank order: deterministic summation
                out.index_add_(0, row_index(rows, out.device), chunk)
        self._own = self._posted = None  # type: ignore[assignment]
        return out, list(plan.owned_ids)


def _assemble(owned: Tensor, recv: Tensor, plan: SparsePlan) -> Tensor:
    """Place owned rows and received rows at their sorted positions: -> [n_mat, C]."""
    mat = owned.new_empty((len(plan.mat_ids), owned.shape[1]))
    if plan.owned_in_mat:
        mat.index_copy_(0, row_index(plan.owned_in_mat, owned.device), owned)
    flat = tuple(i for r in plan.recv_rows for i in r)
    if flat:
        mat.index_copy_(0, row_index(flat, owned.device), recv)
    return mat


class _SpAG(torch.autograd.Function):
    """Forward: finish a posted spAG; backward: spRS of the materialized grads into the owner."""

    @staticmethod
    def forward(ctx, owned: Tensor, handle: SpAGHandle) -> Tensor:  # type: ignore[override]
        ctx.plan, ctx.group, ctx.transport = handle.plan, handle.group, handle.transport
        return _assemble(owned, handle._finish(), handle.plan)

    @staticmethod
    def backward(ctx, grad_mat: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _SpRS.apply(grad_mat, ctx.plan, ctx.group, ctx.transport), None


class _SpRS(torch.autograd.Function):
    """Forward: reduce materialized rows into owners; backward: spAG of the owner grads."""

    @staticmethod
    def forward(ctx, mat: Tensor, plan: SparsePlan, group: dist.ProcessGroup | None, transport: str) -> Tensor:  # type: ignore[override]
        ctx.plan, ctx.group, ctx.transport = plan, group, transport
        return SpRSHandle(mat, plan, group, transport).wait()[0]

    @staticmethod
    def backward(ctx, grad_owned: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        handle = SpAGHandle(grad_owned.contiguous(), ctx.plan, ctx.group, ctx.transport)
        return handle.wait()[0], None, None, None


def _check(x: Tensor, ids: list[int], expected: tuple[int, ...], what: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D tensor [rows, C], got shape {tuple(x.shape)}")
    if tuple(int(i) for i in ids) != expected:
        raise ValueError(f"{what}_ids={list(ids)} do not match the placement, which gives {list(expected)}")
    if x.shape[0] != len(expected):
        raise ValueError(f"{what}: {x.shape[0]} rows for {len(expected)} ids")


def _planned(x: Tensor, ids: list[int], owners: list[int], copies: list[list[int]],
             group: dist.ProcessGroup | None, transport: str | None, what: str) -> tuple[SparsePlan, str]:
    """This rank's plan for the placement, x checked against it ('owned' or 'mat' rows), and the transport."""
    rank, world = _group_info(group)
    plan = plan_sparse(owners, copies, rank, world)
    _check(x, ids, plan.owned_ids if what == "owned" else plan.mat_ids, what)
    return plan, plan.transport(transport or DEFAULT_TRANSPORT)


def spag_start(
    owned: Tensor,
    owned_ids: list[int],
    owners: list[int],
    copies: list[list[int]],
    group: dist.ProcessGroup | None = None,
    *,
    transport: str | None = None,
) -> SpAGHandle:
    """Post spAG sends/receives now (non-blocking); call `.wait()` right before the chunks are used."""
    plan, how = _planned(owned, owned_ids, owners, copies, group, transport, "owned")
    return SpAGHandle(owned.contiguous(), plan, group, how)


def spag(
    owned: Tensor,
    owned_ids: list[int],
    owners: list[int],
    copies: list[list[int]],
    group: dist.ProcessGroup | None = None,
    *,
    transport: str | None = None,
) -> tuple[Tensor, list[int]]:
    """Sparse all-gather: owned [n_owned, C] -> (materialized [n_mat, C], mat_ids); backward is spRS."""
    return spag_start(owned, owned_ids, owners, copies, group, transport=transport).wait()


def sprs_start(
    materialized: Tensor,
    mat_ids: list[int],
    owners: list[int],
    copies: list[list[int]],
    group: dist.ProcessGroup | None = None,
    *,
    transport: str | None = None,
) -> SpRSHandle:
    """Post an spRS now (non-blocking, data only); `.wait()` gives (owned sums [n_owned, C], owned_ids)."""
    plan, how = _planned(materialized, mat_ids, owners, copies, group, transport, "mat")
    return SpRSHandle(materialized, plan, group, how)


def sprs(
    materialized: Tensor,
    mat_ids: list[int],
    owners: list[int],
    copies: list[list[int]],
    group: dist.ProcessGroup | None = None,
    *,
    transport: str | None = None,
) -> tuple[Tensor, list[int]]:
    """Sparse reduce-scatter: materialized [n_mat, C] -> (owned sums [n_owned, C], owned_ids); backward is spAG."""
    plan, how = _planned(materialized, mat_ids, owners, copies, group, transport, "mat")
    return _SpRS.apply(materialized, plan, group, how), list(plan.owned_ids)
