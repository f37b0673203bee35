"""Decoder-only GPT with MoE FFNs (every k-th layer); single-device code, no ranks."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.config import Config
from sparsetrain.model.init import init_weights_
from sparsetrain.model.kv_cache import KVCache, LayerKV
from sparsetrain.model.layers import MLP, Attention, RMSNorm, rope_tables
from sparsetrain.model.moe import MoELayer
from sparsetrain.model.router import CountReducer
from sparsetrain.model.workloads import RoutingWorkload
from sparsetrain.telemetry.timers import span


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V]
    loss: torch.Tensor | None = None  # cross entropy (nats/token), no aux terms
    aux_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    z_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    tokens_per_expert: torch.Tensor | None = None  # [L_moe, E] this rank's routed slots
    global_tokens_per_expert: torch.Tensor | None = None  # [L_moe, E] summed over ranks, when the forward reduced
    dropped: int = 0


class Block(nn.Module):
    def __init__(self, cfg: Config, use_moe: bool, workload: RoutingWorkload | None = None,
                 moe_index: int = 0) -> None:
        super().__init__()
        m, e = cfg.model, cfg.moe
        self.attn_norm = RMSNorm(m.d_model, m.norm_eps)
        self.attn = Attention(m.d_model, m.n_heads)
        self.ffn_norm = RMSNorm(m.d_model, m.norm_eps)
        self.ffn: nn.Module
        if use_moe:
            self.ffn = MoELayer(m.d_model, e.num_experts, e.top_k, e.d_ffn, aux_loss_coef=e.aux_loss_coef,
                                z_loss_coef=e.z_loss_coef, balance=e.balance, bias_update_rate=e.bias_update_rate,
                                workload=workload, layer_index=moe_index, capacity_factor=e.capacity_factor,
                                capacity_renorm=e.capacity_renorm, capacity_priority=e.capacity_priority)
        else:
            self.ffn = MLP(m.d_model, m.d_ffn_dense or 4 * m.d_model)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV | None = None) -> torch.Tensor:
        with span("attention"):
            x = x + self.attn(self.attn_norm(x), cos, sin, kv)
        if self.is_moe:
            return x + self.ffn(self.ffn_norm(x))
        with span("dense_ffn"):
            return x + self.ffn(self.ffn_norm(x))


class GPT(nn.Module):
    """Token embedding -> blocks -> RMSNorm -> LM head (tied by default)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.tok_emb = nn.Embedding(m.vocab_size, m.d_model)
        use_moe = [(i % m.moe_every == m.moe_every - 1) or m.moe_every == 1 for i in range(m.n_layers)]
        workload = RoutingWorkload.from_config(cfg.moe)
        self.layers = nn.ModuleList(Block(cfg, use_moe[i], workload, sum(use_moe[:i])) for i in range(m.n_layers))
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        hd = m.d_model // m.n_heads
        # Strategies set this to sum [L_moe, E] counts over the data-parallel ranks: one collective per
        # forward for every layer's aux loss / aux-free bias (the routers defer theirs to the model).
        self.reduce_counts: CountReducer = lambda c: c
        for moe in self.moe_layers():
            moe.router.defer_aux = True
        self.register_buffer("rope_cos", torch.empty(m.seq_len, hd // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(m.seq_len, hd // 2), persistent=False)
        if not self.tok_emb.weight.is_meta:  # built for real: initialise now (build_model goes through meta)
            init_weights_(self, cfg.train.seed, m.init_std, m.n_layers)
            self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """RoPE tables on the buffers' device (they are not saved; meta construction leaves them empty)."""
        m = self.cfg.model
        cos, sin = rope_tables(m.seq_len, m.d_model // m.n_heads, m.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def set_routing_step(self, step: int) -> None:
        """Tell the routers the training step (routing workloads change their targets with it)."""
        for moe in self.moe_layers():
            moe.router.step = step

    def drop_routing_counts(self) -> None:
        """Forget the routing counts noted since the last bias update (a skipped or rolled-back step)."""
        for moe in self.moe_layers():
            moe.router.drop_pending_counts()

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in depth order."""
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoELayer)]

    def reset_parameters(self) -> None:
        """GPT-2 style init, N(0, init_std), residual outputs / sqrt(2 n_layers); sharding-independent
        (sparsetrain.model.init)."""
        init_weights_(self, self.cfg.train.seed, self.cfg.model.init_std, self.cfg.model.n_layers)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        """idx [B, S] token ids -> logits [B, S, V] and the losses when targets are given.

        With a KVCache, idx holds positions cache.pos .. cache.pos + S - 1 (decoding: S = 1); earlier
        positions come from the cache, and the cache advances by S.
        """
        x = self.tok_emb(idx)  # [B, S, d]
        if cache is None:
            for block in self.layers:
                x = block(x, self.rope_cos, self.rope_sin)
        else:
            start, end = cache.pos, cache.pos + idx.shape[1]
            if end > self.rope_cos.shape[0]:
                raise ValueError(f"positions up to {end} exceed model.seq_len={self.rope_cos.shape[0]}")
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
            for i, block in enumerate(self.layers):
                x = block(x, cos, sin, cache.layer(i))
            cache.advance(idx.shape[1])
        logits = self.lm_head(self.norm(x))  # [B, S, V]
        out = ModelOutput(logits=logits)
        moes = self.moe_layers()
        if moes:
            routes = [m.last_route for m in moes]
            out.z_loss = sum(r.z_loss for r in routes)
            out.tokens_per_expert = torch.stack([r.tokens_per_expert for r in routes])  # [L_moe, E]
            out.aux_loss, out.global_tokens_per_expert = self._deferred_aux(moes, routes, out.tokens_per_expert)
            out.dropped = sum(m.last_dropped for m in moes)
        if targets is not None:
            out.loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return out

    def _deferred_aux(self, moes: list[MoELayer], routes: list, local: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every layer's aux loss from ONE reduction of the [L_moe, E] counts (instead of one per layer), or from
        none when every layer's dispatcher already summed its counts over the ranks (`global_tokens_per_expert`);
        returns (summed aux loss, the global counts or None when no router needed them and no dispatcher summed
        them). Capacity-mode routers (`local_aux`) take f from this rank's own counts."""
        aux = sum(r.aux_loss for r in routes)  # routers that are not deferred (peer layers) computed theirs
        for m, r, c in zip(moes, routes, local):  # capacity mode: f from this rank's own counts (no reduction)
            if getattr(m.router, "defer_aux", False) and m.router.local_aux and r.probs_mean is not None:
                aux = aux + m.router.aux_loss_from(c.detach().float(), r.probs_mean)
        summed = [r.global_tokens_per_expert for r in routes]
        have = all(g is not None for g in summed)  # the dispatchers' count exchanges already summed them (free)
        if not have and not any(getattr(m.router, "defer_aux", False) and m.router.needs_global_counts()
                                for m in moes):
            return aux, None
        if have:
            global_counts = torch.stack(summed).to(local.device).float()  # [L_moe, E]
        else:
            global_counts = self.reduce_counts(local.detach().float())  # [L_moe, E]
        for m, r, g in zip(moes, routes, global_counts):
            if getattr(m.router, "defer_aux", False):
                m.router.note_global_counts(g)
                if r.probs_mean is not None and not m.router.local_aux:
                    aux = aux + m.router.aux_loss_from(g, r.probs_mean)
        return aux, global_counts

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KVCache for this model (max_len defaults to model.seq_len)."""
        m, p = self.cfg.model, self.tok_emb.weight
        return KVCache(m.n_layers, batch, m.n_heads, m.d_model // m.n_heads, max_len or m.seq_len, p.device, p.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: Config, device: str | torch.device = "cpu") -> GPT:
    """Build the model on the meta device, then (unless `device` is 'meta') allocate and initialise it
    deterministically from train.seed. Strategies shard a meta model first and materialize after."""
    with torch.device("meta"):
        model = GPT(cfg)
    if torch.device(device).type == "meta":
        return model
    from sparsetrain.model.init import materialize_

    return materialize_(model, device, cfg.train.seed)
