"""FSSDP's per-layer path: gather a layer's copies (spAG), dispatch tokens to copies, compute.

`FSSDPDispatcher` is the MoE layer's `Dispatcher` under FSSDP. A rank computes its own experts on their
Parameters (their gradients land there through autograd) and the copies it holds for other owners on the
gathered rows; `_Materialized` joins those rows to the autograd graph and stashes their gradient for spRS,
which the strategy (`sparsetrain.parallel.fssdp.FSSDP`) posts at points that are the same on every rank.
"""
from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch

from sparsetrain.model.experts import GroupedExperts
from sparsetrain.model.router import RouterOutput
from sparsetrain.offload.saved import PASS, saved_layer
from sparsetrain.parallel.routing import choose_replicas
from sparsetrain.parallel.token_exchange import exchange_and_compute
from sparsetrain.telemetry.timers import span


class LayerHost(Protocol):
    """What the per-layer path needs from the FSSDP strategy (`sparsetrain.parallel.fssdp.FSSDP`);
    a protocol, so this module does not import the strategy that imports it."""

    cfg: Any
    fcfg: Any
    info: Any
    topo: Any
    placements: list[Any]
    pending: dict[int, Any]
    copy_ids: dict[int, list[int]]
    rank_tokens: dict[int, float]
    grad_stash: dict[int, torch.Tensor]
    sprs_pending: dict[int, Any]
    regathered: dict[int, torch.Tensor]
    codec: Any
    anchor: torch.Tensor
    sprs_in_backward: bool
    regather_skipped: int  # layer-steps on the grouped GEMM: copies kept in its stacks, no re-gather
    model_ref: Any
    owner_index: list[torch.Tensor]

    def replicated(self, li: int) -> bool: ...
    def start_gather(self, li: int, experts: GroupedExperts) -> Any: ...
    def regather(self, li: int, experts: GroupedExperts) -> None: ...
    def post_sprs(self, li: int, experts: GroupedExperts) -> None: ...
    def grad_dtype(self, experts: GroupedExperts) -> torch.dtype: ...


def split_chunks(mat: torch.Tensor, d_model: int, d_ffn: int) -> dict[str, torch.Tensor]:
    """[n, C] rows -> stacked views w1/w3 [n, d_ffn, d], w2 [n, d, d_ffn] (no copies)."""
    n, hd = mat.shape[0], d_model * d_ffn
    return {"w1": mat[:, :hd].view(n, d_ffn, d_model), "w2": mat[:, hd:2 * hd].view(n, d_model, d_ffn),
            "w3": mat[:, 2 * hd:].view(n, d_ffn, d_model)}


class FSSDPDispatcher:
    """Per-layer dispatcher: gather copies (spAG), topology-aware slot routing, exchange, compute."""

    def __init__(self, strategy: LayerHost, layer: int) -> None:
        self.s, self.layer = strategy, layer

    def __call__(self, experts: GroupedExperts, x: torch.Tensor, route: RouterOutput) -> tuple[torch.Tensor, int]:
        s, li = self.s, self.layer
        if not s.replicated(li):
            # P1 = P0 this step: EP's path. Slots go to their expert's owner, the owners compute on their own
            # Parameters; no spAG, no spRS, no copies
            slot_rank = s.owner_index[li][route.expert_ids.reshape(-1)]  # [T*k]
            out, dropped, counts = exchange_and_compute(
                x, route, slot_rank, experts.num_experts, experts.expert_ids,
                experts.bind(ids=experts.expert_ids), None, s.cfg.moe.capacity_factor,
                s.cfg.moe.capacity_renorm, s.cfg.moe.capacity_priority, sum_route_counts=True,
                overlap=s.cfg.parallel.a2a_overlap)
            s.rank_tokens[li] = float(counts.sum())
            return out, dropped
        slot_rank = choose_replicas(route.expert_ids.reshape(-1), s.info.rank, s.placements[li], s.topo)  # [T*k]
        handle = s.pending.pop(li, None) or s.start_gather(li, experts)
        with span("spag_wait"):  # exposed part of the gather (the rest hid behind compute)
            mat, copy_ids = handle.wait()  # [n_copies, C] data only; gradients go home in finish_backward (spRS)
        if s.codec is not None:
            mat = s.codec.decode(mat)  # [n_copies, B] bytes -> [n_copies, C] masked weights
        s.copy_ids[li] = copy_ids
        if torch.is_grad_enabled():
            mat = _Materialized.apply(s.anchor, mat, s, li)
        # the grouped GEMM saves joined stacks, no view of `mat`: a backward re-gather would bring rows nothing
        # reads (the per-expert rows and the N:M weight transform save views of `mat`: released, re-gathered)
        keep = s.fcfg.keep_materialized or experts.uses_grouped_gemm(x)
        s.regather_skipped += keep and not s.fcfg.keep_materialized
        layer = ChunkLayer(s, li, mat, release=not keep)
        # one layer of the saved-tensor stack (offload.saved): chunk views are released (re-gathered in
        # backward) or kept, never offloaded; every other saved tensor goes on to offload's layer, if any
        ctx = saved_layer(layer) if torch.is_grad_enabled() else contextlib.nullcontext(False)
        with ctx as active:  # not active inside a checkpointed region: its replay gathers again by spAG
            # bound inside the layer: what the weight transform saves (views of `mat`) is claimed here too.
            # Local experts: this rank's own (on their Parameters), then its copies (on the gathered rows)
            expert_fn = experts.bind(ids=experts.expert_ids,
                                     copies=(copy_ids, split_chunks(mat, experts.d_model, experts.d_ffn)))
            local_ids = list(experts.expert_ids) + copy_ids
            out, dropped, counts = exchange_and_compute(x, route, slot_rank, experts.num_experts, local_ids, expert_fn,
                                                        None, s.cfg.moe.capacity_factor,
                                                        s.cfg.moe.capacity_renorm, s.cfg.moe.capacity_priority,
                                                        sum_route_counts=True,  # the world group: global counts
                                                        overlap=s.cfg.parallel.a2a_overlap)
        if active and not keep and out.requires_grad:
            # the layer's output grad arrives at the same point of backward on every rank: re-gather there
            out.register_hook(lambda g: s.regather(li, experts))
        if s.sprs_in_backward and x.requires_grad:
            # x's grad is complete only after every expert GEMM of this layer ran backward, and autograd
            # runs the (later-created) chunk-grad nodes before x's producer: the stash is final here, on
            # every rank at the same point. Post spRS now so it overlaps the earlier layers' backward.
            x.register_hook(lambda g: s.post_sprs(li, experts))
        s.rank_tokens[li] = float(counts.sum())
        return out, dropped


class ChunkLayer:
    """Saved-tensor layer for one MoE layer's gathered copies `mat` [n_copies, C].

    Views of `mat` saved by the expert GEMMs are claimed here so offload never copies expert weights to
    host: with `release` they become (offset, shape, stride) and backward reads them from the buffer
    `regather` brings back; without it (keep_materialized) they stay on device as they are.
    """

    def __init__(self, s: LayerHost, li: int, mat: torch.Tensor, release: bool) -> None:
        self.s, self.li, self.release = s, li, release
        self.ptr = mat.untyped_storage().data_ptr()
        self.shape, self.dtype, self.device = tuple(mat.shape), mat.dtype, mat.device

    def pack(self, t: torch.Tensor) -> Any:
        # empty tensors all have data_ptr 0: match only real views of the (non-empty) gathered buffer
        if not (self.ptr and t.numel() and t.dtype == self.dtype and t.device == self.device
                and t.untyped_storage().data_ptr() == self.ptr):
            return PASS
        if not self.release:
            return t.detach()
        return (t.storage_offset(), tuple(t.shape), t.stride())

    def unpack(self, p: Any) -> torch.Tensor:
        if isinstance(p, torch.Tensor):
            return p
        buf = self.s.regathered.get(self.li)
        if buf is None or tuple(buf.shape) != self.shape:
            raise RuntimeError(f"FSSDP layer {self.li}: gathered chunks needed in backward were not re-gathered")
        return buf.as_strided(p[1], p[2], p[0])


class _Materialized(torch.autograd.Function):
    """Marks gathered copies as differentiable; backward stashes their grad for spRS (no comm here).

    Communication inside autograd callbacks runs in an order that depends on each rank's graph, which
    differs between ranks with different placements (a rank whose copies got no token never runs this
    node); blocking collectives here deadlocked. So spRS is posted either from the layer's input-grad hook
    (every rank has it, at the same point of backward) or after backward, layer by layer on every rank.
    """

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, mat: torch.Tensor, s: LayerHost, li: int) -> torch.Tensor:  # type: ignore[override]
        ctx.s, ctx.li = s, li
        return mat.view_as(mat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        s, li = ctx.s, ctx.li
        if li in s.sprs_pending:
            raise RuntimeError(f"FSSDP layer {li}: chunk gradients arrived after their spRS was posted; "
                               "set parallel.fssdp.sprs_post=after and report this")
        grad = grad.to(s.grad_dtype(s.model_ref.moe_layers()[li].experts))  # fp32 accumulation under bf16
        s.grad_stash[li] = grad if li not in s.grad_stash else s.grad_stash[li] + grad
        s.regathered.pop(li, None)  # every use of this layer's copies is done
        return torch.zeros((), dtype=grad.dtype), None, None, None
