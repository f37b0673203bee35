"""Model size and training FLOPs from the config alone, and peak FLOP/s per device: MFU in the user's units.

FLOPs follow the PaLM (appendix B) / Megatron accounting: a training step costs 6 FLOPs per token per
matmul weight used by that token (2 forward, 4 backward) plus attention's sequence term 12 * L * d * S
per token (QK^T and AV, full square as in PaLM, no causal discount). Only ACTIVE weights count: a token
uses attention, the router and its top_k experts, not all E. Embedding lookups are not matmuls; the LM
head is (counted once when tied). Recomputation (activation checkpointing) is not counted: this is model
FLOPs utilization, not hardware FLOPs utilization.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsetrain.config import Config

__all__ = ["PEAK_TFLOPS", "ModelSize", "model_size", "peak_tflops", "train_flops_per_token"]


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of the whole model (not one rank's shard)."""

    dense: int  # everything outside the experts: embeddings, attention, norms, routers, dense MLPs, head
    per_expert: int  # one expert: w1, w2, w3
    n_moe: int  # MoE layers
    num_experts: int
    top_k: int
    matmul_active: int  # matmul weights one token multiplies by (attention, router, top_k experts, MLP, head)

    @property
    def total(self) -> int:
        """All parameters: dense + every expert of every MoE layer."""
        return self.dense + self.per_expert * self.num_experts * self.n_moe

    @property
    def active(self) -> int:
        """Parameters one token uses: dense + its top_k experts per MoE layer."""
        return self.dense + self.per_expert * self.top_k * self.n_moe


def is_moe_layer(cfg: Config, i: int) -> bool:
    """Whether block i has an MoE FFN (same rule as the model)."""
    k = cfg.model.moe_every
    return k == 1 or i % k == k - 1


def model_size(cfg: Config) -> ModelSize:
    """Parameter counts from model/moe config (matches `GPT(cfg)`; tests check it)."""
    m, e = cfg.model, cfg.moe
    d, v = m.d_model, m.vocab_size
    n_moe = sum(is_moe_layer(cfg, i) for i in range(m.n_layers))
    n_dense_ffn = m.n_layers - n_moe
    d_dense = m.d_ffn_dense or 4 * d
    attn = 4 * d * d  # wq, wk, wv, wo
    norms = 2 * d * m.n_layers + d  # two RMSNorms per block + the final one
    embed = v * d * (1 if m.tie_embeddings else 2)
    router = d * e.num_experts
    dense = embed + norms + m.n_layers * attn + n_dense_ffn * 3 * d * d_dense + n_moe * router
    per_expert = 3 * d * e.d_ffn
    matmul = m.n_layers * attn + n_dense_ffn * 3 * d * d_dense + n_moe * (router + e.top_k * per_expert) + v * d
    return ModelSize(dense, per_expert, n_moe, e.num_experts, e.top_k, matmul)


def train_flops_per_token(cfg: Config) -> float:
    """Model FLOPs of one training token (forward + backward): 6 * matmul_active + 12 * L * d * S."""
    m = cfg.model
    return 6.0 * model_size(cfg).matmul_active + 12.0 * m.n_layers * m.d_model * m.seq_len


# Dense peak TFLOP/s per GPU by name fragment (vendor datasheets, no sparsity): bf16 tensor cores and
# plain fp32 (torch's default matmul precision "highest" does not use TF32). First match wins.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "GH200": {"bf16": 989.4, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp32": 66.9},  # SXM
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp32": 31.2},
}


def peak_tflops(cfg: Config, device: torch.device) -> float:
    """Peak TFLOP/s of one rank: train.peak_tflops when set, else the device table; 0 = unknown (no MFU)."""
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops
    if device.type != "cuda":
        return 0.0  # CPUs vary too much for a table: set train.peak_tflops
    name = torch.cuda.get_device_name(device)
    dtype = "bf16" if cfg.train.precision == "bf16" else "fp32"
    for key, row in PEAK_TFLOPS.items():
        if key in name:
            return row[dtype]
    return 0.0
