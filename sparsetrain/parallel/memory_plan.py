"""What one rank holds during a training step, from the config alone: `memory_plan(cfg) -> MemoryPlan`.

Counted per rank, in the dtypes the run uses: parameters (fp32 master weights under every precision),
gradients (fp32), AdamW state (two fp32 moments), bf16 compute copies (FSDP2 all-gathered blocks, spAG
chunks, autocast weight casts), FSDP2 unsharded blocks, FSSDP gathered expert copies and their gradient
stash, saved activations and logits of one micro-batch (offload / recomputation on or off),
communication buffers, on CPU the token corpus held in memory, and a fixed per-process runtime share.

FSSDP copies are planned for the worst step: placements change every step with the loads (and the copy
cost gate may drop them), so each rank is given the most copies per layer its planner can place
(`slots_per_rank`; hecate with an overlap budget t <= slots_per_rank: t), or more if the first placement
already holds more.

Activation bytes per token follow the tensors autograd saves in this repo's model (measured with
`torch.distributed._tools.mem_tracker.MemTracker`; tests/parallel/test_memory_plan.py checks them):
attention block 8*d values (+ fp32 logsumexp per head; + 4.5*d fp32 values under bf16 autocast), MoE block 3*d per token + (3*d + 4*d_ffn) per
routed slot (+ index bytes and fp32 router logits / probs), dense MLP block 2*d + 4*d_ffn_dense, head
3*d values (embedding, final norm) + the logits and cross entropy's fp32 log-softmax [T, V].

Peak = the largest of: end of forward (state + activations + gathered weights), start of backward
(+ a layer's activation gradients and the logits gradient), end of backward (state + gradients +
copy-gradient stash + communication buffers) and the optimizer step (state + gradients + AdamW's
temporaries: none with the fused kernel, else up to 2x the largest parameter tensor + the second largest,
`adamw_transient_bytes`); on CPU plus the corpus. The flat all-reduce buffer of expert grads exists only
where experts have replicas (dp; EP with parallel.ep_size < world); FSSDP layers without copies and EP over
the whole world have none. CUDA measures live bytes (`torch.cuda.max_memory_allocated`); CPU measures the
RSS high-water, which follows live bytes when the trainer has glibc return freed blocks
(`train.cpu_exact_memory`, see `telemetry.memory.return_freed_memory`); without it the RSS also holds the
allocator's free blocks.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from sparsetrain.config import Config
from sparsetrain.parallel.placement import LayerPlacement, initial_owners
from sparsetrain.parallel.planners import get_planner
from sparsetrain.parallel.topology import Topology
from sparsetrain.telemetry.flops import is_moe_layer, model_size

__all__ = ["MemoryPlan", "RankMemory", "adamw_transient_bytes", "initial_placement", "memory_plan", "overlap_budget"]

MIB = 2**20
FP32 = 4
# What a trainer process holds beyond its tensors. CPU: interpreter objects, thread stacks, glibc heap of
# small blocks; measured (2026-12-02) as the peak of 3-step runs of a near-empty model (d_model 16, corpus and
# tensors subtracted): 28.5 MiB on 1 rank; with a gloo process group (buffers, threads) 33-35 MiB on 2 and 4
# ranks, for fssdp, ep and dp alike. CUDA: cuBLAS / cuBLASLt workspaces taken from the caching allocator
# (up to 32 MiB each on sm90 for the main and one side stream; an estimate, not measured here).
RUNTIME_BYTES = {"cpu": 28 * MIB, "cuda": 64 * MIB}
PROCESS_GROUP_BYTES = {"cpu": 6 * MIB}  # added when world > 1
# static expert partitions over parallel.ep_size ranks (the peers' layers are planned like ours)
EXPERT_PARALLEL = ("ep", "deepspeed_moe", "megatron_moe")


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds, by kind (see the module docstring), and its peak."""

    rank: int
    owned_experts: int  # expert chunks this rank owns, all MoE layers
    expert_copies: int  # non-owner copies it materializes, all MoE layers (FSSDP)
    params: int  # fp32 parameters this rank owns (master weights)
    grads: int
    optimizer: int  # AdamW exp_avg + exp_avg_sq
    compute_copies: int  # bf16 casts of owned weights used in compute (autocast); 0 in fp32
    gathered_dense: int  # FSDP2 unsharded blocks alive at once (current + prefetched, root)
    gathered_experts: int  # FSSDP gathered copy buffers alive at once (forward)
    copy_grads: int  # FSSDP gradient stash of gathered copies until spRS
    activations: int  # saved for backward, one micro-batch (what stays on the device)
    backward_transient: int  # activation gradients of one layer + the logits gradient
    comm_buffers: int  # flat all-reduce / spRS receive buffers at their largest
    host_data: int  # CPU: token corpus in memory (0 on CUDA)
    offloaded: int  # activations moved to host memory (not part of the device peak)
    phases: dict[str, int] = field(default_factory=dict)  # forward / backward / optimizer totals
    peak: int = 0

    @property
    def peak_mib(self) -> float:
        """Peak in MiB."""
        return self.peak / MIB


@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank memory of a config on `world` ranks of `device` ('cuda' or 'cpu')."""

    world: int
    device: str
    precision: str
    strategy: str
    tokens_per_micro_batch: int  # per rank
    ranks: list[RankMemory]

    @property
    def memory_mib_per_rank(self) -> list[float]:
        """Planned peak per rank (MiB), rank order."""
        return [round(r.peak_mib, 1) for r in self.ranks]

    @property
    def max_mib(self) -> float:
        """The largest rank's planned peak (MiB)."""
        return max(r.peak_mib for r in self.ranks)

    def fits(self, capacity_gib: float, headroom: float = 0.10) -> bool:
        """Whether every rank's peak leaves `headroom` (fraction) of `capacity_gib` free."""
        return self.max_mib <= capacity_gib * 1024 * (1 - headroom)

    def to_json(self) -> str:
        """JSON with `memory_mib_per_rank` and every rank's breakdown (bytes)."""
        out = {"world": self.world, "device": self.device, "precision": self.precision, "strategy": self.strategy,
               "tokens_per_micro_batch": self.tokens_per_micro_batch,
               "memory_mib_per_rank": self.memory_mib_per_rank, "max_mib": round(self.max_mib, 1),
               "ranks": [asdict(r) for r in self.ranks]}
        return json.dumps(out, indent=1)


def _device(cfg: Config, device: str | None) -> str:
    if device is not None:
        return device
    if cfg.train.device != "auto":
        return cfg.train.device
    return "cuda" if cfg.launch.gpus_per_worker > 0 else "cpu"


def initial_placement(cfg: Config, world: int) -> tuple[Topology, list[int], LayerPlacement, torch.Tensor]:
    """First-step placement of layer 0: loads uniform, or the routing workload's first-step target shares."""
    from sparsetrain.model.workloads import RoutingWorkload

    topo = Topology.from_env(world, cfg.parallel.pretend_nodes if world > 1 else 0)
    e = cfg.moe.num_experts
    workload = RoutingWorkload.from_config(cfg.moe)
    loads = workload.target(0, 0) if workload is not None else torch.full((e,), 1.0 / e)
    owners = initial_owners(e, world)
    f = cfg.parallel.fssdp
    budget = overlap_budget(cfg, world)
    placement = get_planner(f.planner)(loads, owners, topo, f.slots_per_rank,
                                       budget if budget >= 0 else f.slots_per_rank)
    return topo, owners, placement, loads


def _placement_counts(cfg: Config, world: int) -> tuple[list[int], list[int]]:
    """Per rank: owned experts per MoE layer, and non-owner copies per layer (FSSDP's first placement)."""
    _topo, owners, placement, _loads = initial_placement(cfg, world)
    return [owners.count(r) for r in range(world)], placement.extra_count(world)


def overlap_budget(cfg: Config, world: int, device: str | None = None) -> int:
    """The overlap budget t as FSSDP fixes it at set-up (config, or attention time x link bandwidth / chunk
    bytes with the device defaults); -1 when it is measured at set-up (`parallel.fssdp.link_GBps=-1`)."""
    from sparsetrain.parallel.copy_cost import DEVICE_DEFAULTS, attention_flops_per_token, overlap_budget_from_model

    f, m = cfg.parallel.fssdp, cfg.model
    if f.overlap_budget >= 0:
        return f.overlap_budget
    if f.link_GBps < 0:
        return -1
    intra, inter, tflops = DEVICE_DEFAULTS["cuda" if _device(cfg, device) == "cuda" else "cpu"]
    nodes = Topology.from_env(world, cfg.parallel.pretend_nodes if world > 1 else 0).num_nodes
    bandwidth = 1e9 * (f.link_GBps or (inter if nodes > 1 else intra))
    tokens = cfg.data.batch_size * m.seq_len // (world * cfg.train.grad_accum)
    chunk = model_size(cfg).per_expert * (2 if cfg.train.precision == "bf16" else FP32)
    return overlap_budget_from_model(tokens * attention_flops_per_token(m.d_model, m.seq_len),
                                     1e12 * (f.expert_TFLOPs or tflops), bandwidth, chunk, cfg.moe.num_experts)


def _copy_cap(cfg: Config, world: int, device: str) -> int:
    """Most extra copies one rank can hold in a layer at any step: slots_per_rank, or for hecate with an overlap
    budget t <= slots_per_rank the t hottest experts."""
    f = cfg.parallel.fssdp
    t = overlap_budget(cfg, world, device)
    if f.planner != "hecate" or t < 0:
        return f.slots_per_rank
    return min(t, f.slots_per_rank)


def _activation_bytes(cfg: Config, tokens: int, slots: float, act: int, mode: str | None = None
                      ) -> tuple[list[int], int, int]:
    """Saved bytes per block (depth order), head bytes (embedding, final norm, logits) and logits-grad bytes, with
    `mode` (default train.activation_checkpointing) deciding what a block keeps."""
    m, e = cfg.model, cfg.moe
    d, v = m.d_model, m.vocab_size
    # bf16 autocast: RMSNorm outputs (bf16 x times the fp32 weight) and their kin stay fp32, about 1.5 * d
    # fp32 values per token per block beyond the bf16 tensors (MemTracker, CPU autocast; the MoE combine's slot
    # rows are bf16 since it scatters in the experts' dtype)
    mixed = 6 * d if act != FP32 else 0
    attn = tokens * (8 * d * act + FP32 * m.n_heads + mixed)
    blocks = []
    mode = mode or cfg.train.activation_checkpointing  # full: the block input only; selective: attention + FFN input
    for i in range(m.n_layers):
        if mode == "full":
            blocks.append(tokens * d * act)
            continue
        if mode == "selective":  # ffn_norm input and output (the recomputed FFN's input) and its fp32 rstd
            blocks.append(int(attn + tokens * (2 * d * act + FP32)))
            continue
        if is_moe_layer(cfg, i):
            ffn = tokens * (3 * d * act + 2 * FP32 * e.num_experts) + slots * ((3 * d + 4 * e.d_ffn) * act + 40)
        else:
            ffn = tokens * (2 * d + 4 * (m.d_ffn_dense or 4 * d)) * act
        blocks.append(int(attn + ffn))
    # the logits (held by the model output) + fp32 log-softmax saved by cross entropy (+ its fp32 copy under bf16)
    logits = tokens * v * (act + FP32 + (FP32 if act != FP32 else 0))
    head = tokens * 3 * d * act + logits
    return blocks, int(head), tokens * v * FP32 * 2


def _offload_selected(cfg: Config, i: int) -> bool:
    """Whether offload takes block i (as OffloadController.selected)."""
    k = cfg.offload.every_k_layers
    return i % k == k - 1


def _replay_bytes(cfg: Config, blocks: list[int], whole: list[int], block_input: int) -> int:
    """The most a backward replay saves beyond what its block kept from the forward: checkpointed blocks (`whole`:
    unchecked saved bytes, `blocks`: kept) and blocks offload recomputes (`offload.checkpoint_activations`)."""
    o = cfg.offload
    recomputed = o.enabled and o.checkpoint_activations
    extra = [w - b for w, b in zip(whole, blocks)]
    if recomputed and cfg.train.activation_checkpointing == "none":
        extra = [w - block_input if _offload_selected(cfg, i) else 0 for i, w in enumerate(whole)]
    return max(extra, default=0)


def _device_activations(cfg: Config, blocks: list[int], block_input: int, device: str) -> tuple[int, int]:
    """(bytes kept on the device, bytes offloaded to host) for the saved activations of all blocks."""
    o = cfg.offload
    if not o.enabled:
        return sum(blocks), 0
    kept = off = 0
    for i, b in enumerate(blocks):
        selected = _offload_selected(cfg, i)
        if selected and o.checkpoint_activations:
            b = block_input  # only the block input is saved; the block is recomputed in backward
        if selected and device == "cuda":
            off += b
        else:
            kept += b
    bound = int(o.max_host_mib * 2**20)
    if bound and off > bound:  # the bounded host pool refuses the rest: it stays on the device
        kept, off = kept + off - bound, bound
    in_flight = 2 * max(blocks) if off else 0  # the block being offloaded and the one prefetched back
    return kept + min(off, in_flight), max(0, off - in_flight)


def memory_plan(cfg: Config, world: int | None = None, device: str | None = None) -> MemoryPlan:
    """Per-rank memory plan for `cfg` on `world` ranks (default launch.workers) of `device` (default from cfg)."""
    world = world or cfg.launch.workers
    dev = _device(cfg, device)
    strategy = cfg.parallel.strategy if world > 1 else "none"
    size = model_size(cfg)
    m, e, t = cfg.model, cfg.moe, cfg.train
    bf16 = t.precision == "bf16"
    act = 2 if bf16 else FP32
    n_moe, per_expert = size.n_moe, size.per_expert
    tokens = cfg.data.batch_size // (world * t.grad_accum) * m.seq_len
    slots = float(tokens * e.top_k)  # uniform routing: each rank computes as many slots as it sends
    fsdp = world > 1 and cfg.parallel.dense == "fsdp2" and strategy != "none"
    dense_local = size.dense // world if fsdp else size.dense
    block_dense = 4 * m.d_model * m.d_model + 2 * m.d_model + m.d_model * e.num_experts
    # dp under FSDP2 shards the (replicated) experts with the dense blocks: each rank keeps 1/world of them and
    # a MoE block is gathered whole, its experts included (dp.apply: apply_dense_sharding, nothing ignored)
    expert_shards = world if fsdp and strategy == "dp" else 1
    if expert_shards > 1:
        block_dense += e.num_experts * per_expert
    root_dense = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.d_model
    if strategy == "fssdp":
        owned, first = _placement_counts(cfg, world)
        # placements are re-planned every step from the loads: a rank may hold up to slots_per_rank copies
        # per layer at any step, so plan for that (or for more, if the first placement already holds more)
        cap = _copy_cap(cfg, world, dev)
        extra = [min(e.num_experts - o, max(x, cap)) for o, x in zip(owned, first)]
    elif strategy in EXPERT_PARALLEL:
        ep = cfg.parallel.ep_size or world
        owned, extra = [e.num_experts // ep] * world, [0] * world
    else:
        owned, extra = [e.num_experts] * world, [0] * world
    blocks, head, logits_grad = _activation_bytes(cfg, tokens, slots, act)
    replay = _replay_bytes(cfg, blocks, _activation_bytes(cfg, tokens, slots, act, "none")[0],
                           tokens * m.d_model * act)
    kept, offloaded = _device_activations(cfg, blocks, tokens * m.d_model * act, dev)
    activations = kept + head
    host_data = _corpus_bytes(cfg) if dev == "cpu" else 0
    ranks = []
    for r in range(world):
        expert_params = owned[r] * per_expert * n_moe // expert_shards
        p = (dense_local + expert_params) * FP32
        grads, opt = p, 2 * p
        compute = (dense_local + expert_params) * 2 if bf16 else 0
        # FSDP2: a block being used + the one prefetched, and the root (kept from the end of forward to
        # the start of backward under the default reshard policy); `never` keeps every block unsharded
        held_blocks = m.n_layers if cfg.parallel.fsdp_reshard_after_forward == "never" else 2
        gathered_dense = (held_blocks * block_dense + root_dense) * act if fsdp else 0
        chunk_b = per_expert * act
        rows = extra[r]  # gathered copies per layer (own experts compute on their Parameters)
        live_layers = n_moe if cfg.parallel.fssdp.keep_materialized else min(2, n_moe)
        gathered_experts = rows * chunk_b * live_layers if strategy == "fssdp" else 0
        copy_grads = rows * per_expert * FP32 * n_moe if strategy == "fssdp" else 0
        if strategy == "dp" and not fsdp:  # one flat all-reduce buffer of every grad (dense.all_reduce_grads)
            comm = (dense_local + expert_params) * FP32
        elif strategy in EXPERT_PARALLEL and world > 1 and _expert_replicas(cfg, strategy, world) > 1:
            comm = expert_params * FP32  # one flat all-reduce buffer of the expert grads (dense.all_reduce_grads)
        elif strategy == "fssdp" and extra[r]:
            comm = owned[r] * per_expert * FP32  # spRS receive rows of one layer
        else:
            comm = 0
        if fsdp:
            comm = max(comm, block_dense * FP32)  # unsharded grads of one block before reduce-scatter
        # a2a_overlap: a layer's own slots and its received slots run as two expert calls; autograd sums their
        # weight gradients in its input buffer, so the first call's full-size grads wait for the second's
        overlap_grads = ((owned[r] + extra[r]) * per_expert * FP32
                         if cfg.parallel.a2a_overlap and strategy in ("ep", "fssdp") and world > 1 else 0)
        # backward adds the logits' gradient and, for a checkpointed block (or an offloaded one with
        # checkpoint_activations), what its replay saves beyond what the forward kept. An unchecked block's
        # backward frees its saved tensors as it makes its gradients: a tensor-level count of the tiny model
        # (4 blocks, 4,096 tokens) sees 16 MiB above the saved activations, the logits' gradient
        bwd_transient = replay + logits_grad + overlap_grads
        accum_grads = grads if t.grad_accum > 1 else 0
        forward = p + opt + compute + accum_grads + gathered_dense + gathered_experts + activations
        # from the second micro-batch on, backward runs with the accumulated grads alive
        backward_start = (p + opt + compute + accum_grads + gathered_dense + gathered_experts + activations
                          + bwd_transient)
        backward_end = (p + opt + grads + copy_grads + comm + gathered_dense
                        + gathered_experts // max(live_layers, 1))  # no MoE layer: nothing gathered
        optimizer = p + opt + grads + adamw_transient_bytes(cfg, owned[r] // expert_shards, world if fsdp else 1)
        phases = {"forward": forward, "backward_start": backward_start, "backward_end": backward_end,
                  "optimizer": optimizer}
        runtime = RUNTIME_BYTES.get(dev, 0) + (PROCESS_GROUP_BYTES.get(dev, 0) if world > 1 else 0)
        peak = max(phases.values()) + host_data + runtime
        ranks.append(RankMemory(r, owned[r] * n_moe, extra[r] * n_moe, p, grads, opt, compute, gathered_dense,
                                gathered_experts, copy_grads, activations, bwd_transient, comm, host_data,
                                offloaded, phases, int(peak)))
    return MemoryPlan(world, dev, t.precision, strategy, tokens, ranks)


def _expert_replicas(cfg: Config, strategy: str, world: int) -> int:
    """Ranks holding each expert under a static expert partition: its grads are all-reduced in one flat buffer
    over them (`dense.all_reduce_grads`); with one EP group over the world there is no such buffer, only the
    in-place mean. DeepSpeed's engine reduces in its own buckets: counted as one flat buffer."""
    if strategy == "deepspeed_moe":
        return world
    return world // (cfg.parallel.ep_size or world)


def adamw_transient_bytes(cfg: Config, owned_per_layer: int, dense_shards: int = 1) -> int:
    """AdamW's temporaries at their largest, fp32 bytes. `train.optimizer_impl=fused`: none (one kernel per
    tensor, in place; measured 0). for-loop: for a parameter, `denom = (exp_avg_sq.sqrt() / c).add_(eps)` holds
    the sqrt and the quotient at once, while the previous parameter's `denom` is still bound: at most 2 x the
    largest tensor + the second largest (measured on CPU: 11.9 MiB for stacked experts w1/w2/w3 of 4 MiB each).
    foreach: one sqrt per tensor of a group, all alive at once: the parameters' size (measured 48.0 MiB for 6
    tensors of 8 MiB, `benchmarks/optimizer_step.py`). `dense_shards`: FSDP2 shards the dense tensors."""
    if cfg.train.optimizer_impl == "fused":
        return 0
    m, e = cfg.model, cfg.moe
    expert = owned_per_layer * m.d_model * e.d_ffn
    numels = [expert] * 3 if owned_per_layer and e.num_experts else []
    numels += [m.vocab_size * m.d_model // dense_shards] * (1 if m.tie_embeddings else 2)
    numels += [m.d_model * m.d_model // dense_shards] * 4
    if any(not is_moe_layer(cfg, i) for i in range(m.n_layers)):
        numels += [m.d_model * (m.d_ffn_dense or 4 * m.d_model) // dense_shards] * 3
    if cfg.train.optimizer_impl == "foreach":
        return sum(numels) * FP32
    second, largest = sorted(numels)[-2:]
    return (2 * largest + second) * FP32


def _corpus_bytes(cfg: Config) -> int:
    """Token bytes a CPU rank reads into memory: the embedded stdlib corpus (prepared shard directories are
    memory-mapped; their resident pages depend on access and are not counted)."""
    if cfg.data.corpus != "stdlib":
        return 0
    from sparsetrain.data.corpus import build_stdlib_corpus

    train, val = build_stdlib_corpus(cfg.data.val_fraction)
    return int(train.nbytes + val.nbytes)
