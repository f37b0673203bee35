"""FSSDP: experts sharded whole across ranks, materialized per step by spAG, gradients home by spRS.

Each MoE layer's experts are chunks (one chunk = one expert's w1/w2/w3); every chunk has one owner rank
holding the Parameters and optimizer state. Before the layer runs, the chunks this rank's placement
says it needs are gathered (prefetched in the block's pre-forward hook, overlapping attention); tokens
go to a copy on their own rank, else their node, else remote; spRS (spAG's backward) sums the copies'
gradients into the owner. Placement is re-planned every step from all-reduced loads, and a layer keeps
copies only when the cost model says they save more compute than they cost (`copy_cost.py`); a layer
without copies runs exactly EP's path. Ownership is re-sharded every `fssdp.reshard_every` steps with
params and Adam state moving together, when it balances the owned load and (gate on) the expert time it
saves until the next re-shard beats the bytes it moves (`copy_cost.reshard_pays`); `fssdp.reshard_early` also
re-shards between scheduled steps (`fssdp_reshard.py`). The machine numbers
behind the overlap budget and both gates are fixed at set-up, so the placement is a deterministic function
of the seed and config.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparsetrain.model.experts import EXPERT_WEIGHTS, GroupedExperts
from sparsetrain.model.gpt import GPT
from sparsetrain.parallel import fssdp_machine, fssdp_state
from sparsetrain.parallel.chunk_codec import NMChunkCodec, chunk_codec_for
from sparsetrain.parallel.comm import all_reduce_host
from sparsetrain.parallel.copy_cost import CopyCost, copies_can_pay, gate_copies
from sparsetrain.parallel.copy_exchange import (
    CopiesHandle,
    CopyGradsHandle,
    gather_copies_start,
    return_copy_grads_start,
)
from sparsetrain.parallel.dense import compute_dtype
from sparsetrain.parallel.ep import keep_expert_rows
from sparsetrain.parallel.fssdp_layer import FSSDPDispatcher, split_chunks
from sparsetrain.parallel.fssdp_reshard import target_after_step
from sparsetrain.parallel.mesh import DistInfo
from sparsetrain.parallel.placement import LayerPlacement, LoadTracker, initial_owners
from sparsetrain.parallel.planners import get_planner
from sparsetrain.parallel.reshard import move_ownership
from sparsetrain.parallel.sparse_collectives import row_index
from sparsetrain.parallel.strategy import Strategy
from sparsetrain.parallel.topology import Topology
from sparsetrain.telemetry.timers import span


def _lists(p: LayerPlacement) -> tuple[list[int], list[list[int]]]:
    return list(p.owners), [list(c) for c in p.copies]


class FSSDP(Strategy):
    """The product strategy; see the module docstring and docs/fssdp.md."""

    name = "fssdp"
    fuses_step_reduction = True  # dense=ddp: the trainer fuses the dense all-reduce with its step reduction

    def __init__(self, cfg, info: DistInfo) -> None:
        super().__init__(cfg, info)
        self.fcfg = cfg.parallel.fssdp
        self.topo = Topology.from_env(info.world, cfg.parallel.pretend_nodes if info.world > 1 else 0)
        self.planner = get_planner(self.fcfg.planner)
        self.num_layers = 0
        self.owners: list[list[int]] = []
        self.placements: list[LayerPlacement] = []
        self.pending: dict[int, CopiesHandle] = {}
        self.rank_tokens: dict[int, float] = {}
        self.regathered: dict[int, torch.Tensor] = {}
        self.grad_stash: dict[int, torch.Tensor] = {}  # layer -> grad of its gathered copies [n_copies, C]
        self.sprs_pending: dict[int, CopyGradsHandle] = {}  # layer -> spRS posted during backward
        self.sprs_posted = {"backward": 0, "after": 0}  # spRS calls posted during backward vs after it
        self.regather_skipped = 0  # layer-steps on the grouped GEMM (copies in its joined stacks): no re-gather
        # CPU/gloo (benchmarks/RESULTS.md): posting during backward measured 0.96-1.03x the step time of
        # posting after it (2 cores, nothing idle to overlap with); on CUDA it runs on a side stream
        post = self.fcfg.sprs_post
        self.sprs_in_backward = post == "backward" or (post == "auto" and info.device.type == "cuda")
        self.last_micro = True
        self.copy_ids: dict[int, list[int]] = {}  # layer -> its gathered copies' experts, in arrival order
        self.anchor = torch.zeros((), requires_grad=True)  # lets gathered chunks join the autograd graph
        self.bandwidth: float | None = None  # spAG bytes/s per rank: config, device default, or measured once
        self.expert_flops: float | None = None  # expert FLOP/s per rank: config, device default, or measured once
        self.overlap_budget = self.fcfg.overlap_budget
        self.cost: CopyCost | None = None  # the copy cost gate's numbers (None: gate off)
        self.copies_gated = 0  # layer-steps whose proposed copies the gate dropped
        self.is_replicated: list[bool] = []  # per layer, this step: any copy beyond the owners
        self.owner_index: list[torch.Tensor] = []  # per layer: expert -> owner rank [E] (dispatch without copies)
        self.reshards = 0
        self.reshard_moves = 0  # expert chunks whose owner changed, summed over re-shards
        self.reshards_gated = 0  # scheduled re-shards that balanced the owned load but would not pay for their moves
        self.early_reshards = 0  # re-shards between scheduled ones (`fssdp_reshard.early_target`)
        self.group: dist.ProcessGroup | None = None
        self.codec: NMChunkCodec | None = None  # set per step when expert copies can travel compressed

    # ------------------------------------------------------------------ set-up
    def apply(self, model: GPT) -> GPT:
        self.install_count_reducer(model)
        if self.info.world == 1:
            return model
        moes = model.moe_layers()
        self.model_ref = model
        self.num_layers, e = len(moes), self.cfg.moe.num_experts
        self.tracker = LoadTracker(self.num_layers, e, self.fcfg.load_window)
        self.owners = [initial_owners(e, self.info.world) for _ in moes]
        self.group = dist.new_group(list(range(self.info.world)))  # once: keeps spAG p2p off the main group
        self.topo = self._link_topology(self.topo)
        self._expert_params: set[nn.Parameter] = set()
        for li, moe in enumerate(moes):
            keep_expert_rows(moe.experts, [x for x in range(e) if self.owners[li][x] == self.info.rank])
            moe.dispatcher = FSSDPDispatcher(self, li)
            self._expert_params |= set(moe.experts.parameters())
        if self.cfg.parallel.dense == "fsdp2":
            from sparsetrain.parallel.dense import apply_dense_sharding

            apply_dense_sharding(model, self.info, ignored=self._expert_params, mp_policy=self.mp_policy(),
                                 reshard=self.cfg.parallel.fsdp_reshard_after_forward)
        self.chunk_numel = len(EXPERT_WEIGHTS) * self.cfg.model.d_model * self.cfg.moe.d_ffn  # C: numbers per chunk
        self.chunk_bytes = self.chunk_numel * self.wire_dtype(moes[0].experts).itemsize  # as spAG sends it
        fssdp_machine.set_machine_numbers(self, moes[0].experts)
        self._replan()
        if self.fcfg.prefetch:
            for block in model.layers:
                if block.is_moe:
                    li = moes.index(block.ffn)
                    block.register_forward_pre_hook(lambda mod, args, li=li: self._prefetch(li))
        return model

    def _link_topology(self, topo: Topology) -> Topology:
        """On CUDA, narrow the node map to NVLink islands (`telemetry.gpu.link_domain`, from NVML) when every rank
        sees equal islands smaller than its node; unchanged on CPU, with pretend_nodes, or where ranks disagree."""
        if self.info.device.type != "cuda" or self.cfg.parallel.pretend_nodes:
            return topo
        from sparsetrain.telemetry.gpu import link_domain

        k = link_domain(topo.ranks_per_node)
        low, neg_high = all_reduce_host([k, -k], self.group, op=dist.ReduceOp.MIN).tolist()
        if low != -neg_high or low >= topo.ranks_per_node:
            return topo
        return Topology(topo.world, int(low))

    # ------------------------------------------------------------------ gathers
    def start_gather(self, li: int, experts: GroupedExperts) -> CopiesHandle:
        """Post layer li's spAG of the copies this rank holds for other owners (and of its own chunks to
        their copy holders)."""
        owners, copies = _lists(self.placements[li])
        return gather_copies_start(lambda rows: self._send_rows(experts, rows), experts.expert_ids, owners, copies,
                                   self.group)

    def wire_dtype(self, experts: GroupedExperts) -> torch.dtype:
        """Dtype expert chunks travel and compute in: bf16 under train.precision=bf16 (the owner keeps fp32
        master weights and Adam state), else the parameters' own."""
        return compute_dtype(self.cfg.train.precision) or experts.w1.dtype

    def grad_dtype(self, experts: GroupedExperts) -> torch.dtype:
        """Dtype copies' gradients are accumulated and reduced in (spRS): train.grad_reduce_dtype in either
        precision (fp32 under precision fp32 means the parameters' own dtype: fp64 stays fp64)."""
        return self.allreduce_dtype() or experts.w1.dtype  # fp32 masters under bf16 precision

    def _send_rows(self, experts: GroupedExperts, rows: tuple[int, ...]) -> torch.Tensor:
        """Owned chunks `rows` (of the owned stack) as spAG sends them: dense [n, C] in the wire dtype (w1 | w2 |
        w3 flattened, written straight from the Parameters), or N:M-compressed bytes [n, B]."""
        out = torch.empty(len(rows), self.chunk_numel, dtype=self.wire_dtype(experts), device=experts.w1.device)
        with torch.no_grad():
            for w, view in split_chunks(out, experts.d_model, experts.d_ffn).items():  # [n, out, in] views of out
                for j, r in enumerate(rows):
                    view[j].copy_(getattr(experts, w)[r])  # casts to the wire dtype
        return self.codec.encode(out) if self.codec is not None else out

    def _prefetch(self, li: int) -> None:
        """Block pre-forward hook: post this layer's spAG so it overlaps attention."""
        if li not in self.pending and self.replicated(li):
            self.pending[li] = self.start_gather(li, self.model_ref.moe_layers()[li].experts)

    def replicated(self, li: int) -> bool:
        """Whether layer li has any copy beyond its owners this step (same answer on every rank)."""
        return self.is_replicated[li]

    def regather(self, li: int, experts: GroupedExperts) -> None:
        """Backward re-gather of layer li's copies (data only), at its output-grad hook."""
        with torch.no_grad():
            buf, _ = self.start_gather(li, experts).wait()
        self.regathered[li] = self.codec.decode(buf) if self.codec is not None else buf

    def before_backward(self, last_micro: bool) -> None:
        self.last_micro = last_micro

    def _start_sprs(self, li: int, mod: GroupedExperts) -> CopyGradsHandle:
        """Post layer li's spRS of its copies' stashed grads [n_copies, C] (zeros when they got no gradient)."""
        grad = self.grad_stash.pop(li, None)
        ids = self.copy_ids.get(li, [])
        if grad is None:
            grad = torch.zeros(len(ids), self.chunk_numel, device=mod.w1.device, dtype=self.grad_dtype(mod))
        owners, copies = _lists(self.placements[li])
        return return_copy_grads_start(grad, ids, owners, copies, self.group)

    def post_sprs(self, li: int, experts: GroupedExperts) -> None:
        """Input-grad hook of layer li: post its spRS (async) once the step's last backward reaches it."""
        if not self.last_micro or li in self.sprs_pending or not self.replicated(li):
            return
        self.sprs_posted["backward"] += 1
        self.sprs_pending[li] = self._start_sprs(li, experts)

    def reduce_scatter_grads(self, model: GPT) -> None:
        """spRS for every replicated layer, last layer first (the order backward posts them in): copies' grads
        added into the owner's param grads (which hold its own tokens' share), peer by peer in rank order."""
        moes = model.moe_layers()
        for li in reversed(range(len(moes))):
            if not self.replicated(li):
                continue  # owners computed on their Parameters: the grads are already there
            mod = moes[li].experts
            handle = self.sprs_pending.pop(li, None)
            if handle is None:
                self.sprs_posted["after"] += 1
                handle = self._start_sprs(li, mod)
            for rows, got in handle.wait():  # got [n, C]: one peer's copies of `rows` of the owned stack
                idx = row_index(rows, mod.w1.device)
                for w, part in split_chunks(got, mod.d_model, mod.d_ffn).items():  # [n, out, in] views
                    p = getattr(mod, w)
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.index_add_(0, idx, part.to(p.dtype))

    # ------------------------------------------------------------------ steps
    def finish_backward(self, model: GPT) -> None:
        """Owner grads already hold the sum over all ranks' tokens (spRS): divide by world."""
        if self.info.world == 1:
            return
        self.finish_own_grads(model)
        self.all_reduce_dense_grads(model, skip=self._expert_params)

    def own_grads(self) -> set[torch.nn.Parameter]:
        return self._expert_params

    def finish_own_grads(self, model: GPT) -> None:
        """spRS still to finish, then owner expert grads / world (everything before the dense all-reduce)."""
        self.pending.clear()
        self.regathered.clear()
        with span("sprs"):  # spRS still to finish after backward (posted ones may be done)
            self.reduce_scatter_grads(model)
        for p in self._expert_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad /= self.info.world

    def replication(self, name: str, p: torch.Tensor) -> int:
        if hasattr(p, "to_local") or p in getattr(self, "_expert_params", set()):
            return 1
        return self.info.world

    def _replan(self, restored: list[LayerPlacement] | None = None) -> None:
        """This step's placement per layer: the planner's proposal, kept only where the copies pay
        (`restored`: the plan saved with a checkpoint, used as is on resume)."""
        e = self.model_ref.moe_layers()[0].experts
        self.codec = chunk_codec_for(self.model_ref, self.fcfg.compress_chunks, e.d_model, e.d_ffn,
                                     self.wire_dtype(e))
        recent = self.tracker.recent()  # [n, L, E]: the gate judges copies on each recent step
        loads = self.tracker.predicted()  # [L, E]: the planners balance the mean
        placements = list(restored or [])
        for li in range(self.num_layers if restored is None else 0):
            p, gated = self._plan(loads[li], self.owners[li], recent[:, li])
            self.copies_gated += gated
            placements.append(p)
        if [p.owners for p in placements] != [p.owners for p in self.placements]:
            self.owner_index = [torch.tensor(p.owners, dtype=torch.long, device=self.info.device) for p in placements]
        self.placements = placements
        self.is_replicated = [any(len(c) > 1 for c in p.copies) for p in placements]

    def _plan(self, loads: torch.Tensor, owners: list[int], recent: torch.Tensor) -> tuple[LayerPlacement, bool]:
        """One layer's placement for predicted loads [E] and owners: the planner's, less copies that do not
        pay on the recent steps' loads [n, E] (gate on); and whether the gate dropped proposed copies."""
        if self.cost is not None and not copies_can_pay(recent, tuple(owners), self.topo, self.cost):
            return LayerPlacement.from_owners(owners), False  # balanced enough: no planning
        p = self.planner(loads, owners, self.topo, self.fcfg.slots_per_rank, self.overlap_budget)
        gated = gate_copies(recent, p, self.topo, self.cost) if self.cost is not None else p
        return gated, gated is not p

    def after_step(self, step: int, model: GPT, optimizer: torch.optim.Optimizer,
                   counts: torch.Tensor | None) -> torch.optim.Optimizer | None:
        if self.info.world == 1:
            return None
        if counts is not None:
            self.tracker.update(counts.detach().cpu())
        new_opt = None
        new_owners, early = target_after_step(self, step, model.moe_layers()[0].experts)
        self.early_reshards += early
        if new_owners is not None:
            new_opt, self._expert_params = move_ownership([m.experts for m in model.moe_layers()], optimizer,
                                                          self.owners, new_owners, self.info.rank, self.group)
            self.reshard_moves += sum(a != b for old, new in zip(self.owners, new_owners) for a, b in zip(old, new))
            self.owners = new_owners
            self.reshards += 1
        if new_opt is not None or (step + 1) % self.fcfg.replan_every == 0:
            self._replan()
        return new_opt

    # ------------------------------------------------------------------ reporting
    def step_metrics(self, comm: dict[str, int], per_rank: dict[str, torch.Tensor]) -> dict[str, float]:
        out = {"spag_MB": comm.get("spag", 0) / 2**20, "sprs_MB": comm.get("sprs", 0) / 2**20,
               "reshard_MB": comm.get("reshard", 0) / 2**20,
               "a2a_MB": comm.get("all_to_all", 0) / 2**20, **super().step_metrics(comm, per_rank)}
        if self.info.world > 1:
            out["overlap_budget"] = self.overlap_budget
            out["replicated_layers"] = sum(self.is_replicated)
        return out

    def hottest(self, top: int = 3) -> list[dict[str, Any]]:
        """Per layer: the hottest experts, their owner and copies."""
        if not self.placements:
            return []
        loads = self.tracker.predicted()
        out = []
        for li, p in enumerate(self.placements):
            order = torch.argsort(loads[li], descending=True, stable=True)[:top].tolist()
            out.append({"layer": li, "experts": [{"expert": e, "load": round(float(loads[li][e]), 1),
                                                  "owner": p.owners[e], "copies": list(p.copies[e])} for e in order]})
        return out

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "planner": self.fcfg.planner, "nodes": self.topo.num_nodes,
                "overlap_budget": self.overlap_budget,
                "link_GBps": round(self.bandwidth / 1e9, 3) if self.bandwidth else None,
                "expert_TFLOPs": round(self.expert_flops / 1e12, 4) if self.expert_flops else None,
                "copies_gated": self.copies_gated, "reshards_gated": self.reshards_gated,
                "early_reshards": self.early_reshards,
                "reshards": self.reshards, "reshard_moves": self.reshard_moves,
                "compressed_chunks": self.codec is not None,
                "hottest_placement": self.hottest()}

    def extra_state(self) -> dict[str, Any]:
        if self.info.world == 1:
            return {}
        return fssdp_state.extra_state(self)

    def load_extra_state(self, state: dict[str, Any], model: GPT) -> None:
        """Restore tracker, ownership, plan and budget (before the checkpoint's tensors are loaded)."""
        if self.info.world == 1 or not state.get("tracker"):
            return
        fssdp_state.load_extra_state(self, state, model)
