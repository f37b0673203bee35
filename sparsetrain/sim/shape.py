"""What the simulator needs to know about a run: model shape, batch, strategy knobs; FLOPs per token/slot."""
from __future__ import annotations

from dataclasses import dataclass, replace

from sparsetrain.config import Config

STRATEGIES = ("dp", "ep", "fssdp")


@dataclass(frozen=True)
class SimSetup:
    """Model, batch and strategy of one simulated step (global batch split evenly over all ranks)."""

    d_model: int
    n_layers: int
    n_moe: int  # MoE layers among n_layers
    seq_len: int
    vocab_size: int
    num_experts: int
    top_k: int
    d_ffn: int  # one expert's hidden size
    d_ffn_dense: int
    batch_size: int  # global sequences per step
    dense_params: int  # everything but the experts (embeddings, attention, dense MLPs, routers)
    strategy: str = "fssdp"
    planner: str = "hecate"
    slots_per_rank: int = 2
    overlap_budget: int = -1  # -1: attention time x bandwidth / chunk bytes, as the runtime measures it
    keep_materialized: bool = False
    cost_gate: bool = True  # parallel.fssdp.cost_gate: copies kept only where they pay (parallel/copy_cost.py)
    sprs_post: str = "auto"  # auto | backward | after (as parallel.fssdp.sprs_post)
    link_GBps: float = 0.0  # parallel.fssdp.link_GBps: the gate's bandwidth (0 device default, -1 measured)
    expert_TFLOPs: float = 0.0  # parallel.fssdp.expert_TFLOPs: the gate's expert throughput (0 device default)
    ep_size: int = 0  # 0: the largest divisor of the world that divides num_experts
    dense: str = "fsdp2"  # fsdp2 | ddp
    bf16: bool = False  # autocast: activations and spAG chunks in bf16 (params fp32)
    a2a_overlap: bool = True  # parallel.a2a_overlap: own slots computed while the dispatch (and its reverse) travel

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} unknown to the simulator; allowed: {', '.join(STRATEGIES)}")

    @property
    def expert_params(self) -> int:
        """Parameters of one expert (SwiGLU: w1, w2, w3)."""
        return 3 * self.d_model * self.d_ffn

    @property
    def act_bytes(self) -> int:
        """Bytes per activation value."""
        return 2 if self.bf16 else 4

    @property
    def tokens(self) -> int:
        """Tokens per step, all ranks."""
        return self.batch_size * self.seq_len

    def attn_fwd_flops(self) -> float:
        """Forward FLOPs per token of one block's attention (QKVO projections + scores and weighted sum)."""
        return 2.0 * 4 * self.d_model ** 2 + 4.0 * self.seq_len * self.d_model

    def expert_fwd_flops(self) -> float:
        """Forward FLOPs of one routed token slot in one expert."""
        return 2.0 * self.expert_params

    def other_fwd_flops(self) -> float:
        """Forward FLOPs per token outside attention and experts: dense MLP blocks, routers, LM head."""
        dense_mlp = (self.n_layers - self.n_moe) * 2.0 * 3 * self.d_model * self.d_ffn_dense
        return dense_mlp + self.n_moe * 2.0 * self.d_model * self.num_experts + 2.0 * self.d_model * self.vocab_size

    def model_flops_per_step(self) -> float:
        """Training FLOPs of one step (3x forward), the MFU numerator."""
        per_token = self.n_layers * self.attn_fwd_flops() + self.other_fwd_flops()
        per_token += self.n_moe * self.top_k * self.expert_fwd_flops()
        return 3.0 * per_token * self.tokens

    def with_(self, **kw) -> SimSetup:
        """A copy with some fields changed."""
        return replace(self, **kw)


def setup_from_config(cfg: Config) -> SimSetup:
    """The simulator's view of a config (strategy 'none' is simulated as dp)."""
    from sparsetrain.parallel.plan_report import layer_sizes

    m, e, f = cfg.model, cfg.moe, cfg.parallel.fssdp
    dense, _, n_moe = layer_sizes(cfg)
    strategy = cfg.parallel.strategy if cfg.parallel.strategy in STRATEGIES else "dp"
    return SimSetup(d_model=m.d_model, n_layers=m.n_layers, n_moe=n_moe, seq_len=m.seq_len, vocab_size=m.vocab_size,
                    num_experts=e.num_experts, top_k=e.top_k, d_ffn=e.d_ffn, d_ffn_dense=m.d_ffn_dense or 4 * m.d_model,
                    batch_size=cfg.data.batch_size, dense_params=dense, strategy=strategy, planner=f.planner,
                    slots_per_rank=f.slots_per_rank, overlap_budget=f.overlap_budget,
                    keep_materialized=f.keep_materialized, cost_gate=f.cost_gate, sprs_post=f.sprs_post,
                    link_GBps=f.link_GBps, expert_TFLOPs=f.expert_TFLOPs, ep_size=cfg.parallel.ep_size,
                    dense=cfg.parallel.dense, bf16=cfg.train.precision == "bf16",
                    a2a_overlap=cfg.parallel.a2a_overlap)
