"""Activation memory per block from the config alone: what `sparsetrain plan` reports and the meter checks.

Counts the tensors autograd saves in one block of our GPT for one micro-batch on one rank (T tokens,
d_model d, heads H, top_k k, expert hidden f, dense hidden f_d), deduplicated like `ActivationMeter`:
- attention half: the block input, the norm's rstd and output, q/k before and after RoPE (two halves
  each), v, the SDPA output and log-sum-exp, the re-laid-out SDPA output feeding wo: 11 T d + T (1 + H);
- FFN half: ffn_norm input/rstd/output (2 T d + T); MoE: token rows in slot order going in and out of
  the experts (4 T k d), four d_ffn-wide tensors per slot (w1/w3 outputs, silu, their product: 4 T k f),
  router probs and logits (2 T E), slot indices (int64: 8 T k in 4-byte units); dense MLP: 4 T f_d + T d.
Checked against the meter on CPU fp32 (tests/offload/test_accounting.py: within 2%). Like the meter it counts
bytes per saved tensor (two saved views of one buffer count twice), an upper bound on the storage held;
`parallel.memory_plan` (storage level, checked against MemTracker, honours the same checkpointing and offload
settings) is what the plan's per-rank memory table uses.
Checkpointing keeps the block input only (full) or the attention half plus the FFN input (selective);
offload moves the selected blocks' saved tensors to host (`min_tensor_bytes`-sized ones stay). Under EP
and FSSDP expert rows per rank vary with routing: the estimate assumes balanced routing (T k slots).
"""
from __future__ import annotations

from sparsetrain.config import Config


def _is_moe(cfg: Config, i: int) -> bool:
    m = cfg.model
    return m.moe_every == 1 or i % m.moe_every == m.moe_every - 1


def block_activation_bytes(cfg: Config, world: int, moe: bool, mode: str = "none") -> int:
    """Saved bytes of one block for one micro-batch on one rank under checkpointing `mode`."""
    m, e = cfg.model, cfg.moe
    t = cfg.data.batch_size // max(world * cfg.train.grad_accum, 1) * m.seq_len  # tokens per micro-batch and rank
    d, h = m.d_model, m.n_heads
    elt = 2 if cfg.train.precision == "bf16" else 4
    if mode == "full":
        return t * d * elt
    attn = 11 * t * d + t * (1 + h)
    ffn_in = 2 * t * d + t
    if mode == "selective":
        return (attn + ffn_in) * elt
    if moe:
        # the per-expert SwiGLU (CPU; CUDA without torch._grouped_mm) saves 3 [slots, d] tensors (measured by
        # ActivationMeter); the grouped-GEMM formulation it replaced saved 4 (the grouped_mm path: not measured)
        ffn = 3 * t * e.top_k * d + 4 * t * e.top_k * e.d_ffn + 2 * t * e.num_experts + 8 * t * e.top_k
    else:
        ffn = 4 * t * (m.d_ffn_dense or 4 * d) + t * d
    return (attn + ffn_in + ffn) * elt


def activation_bytes_by_block(cfg: Config, world: int, mode: str | None = None,
                              offload: bool | None = None) -> dict[int, dict[str, int]]:
    """Per block: saved bytes and the bytes left on device (after offload) for one micro-batch on one rank."""
    mode = cfg.train.activation_checkpointing if mode is None else mode
    off = cfg.offload.enabled if offload is None else offload
    k = cfg.offload.every_k_layers
    out = {}
    for i in range(cfg.model.n_layers):
        saved = block_activation_bytes(cfg, world, _is_moe(cfg, i), mode)
        offloaded = off and i % k == k - 1
        out[i] = {"saved": saved, "on_device": 0 if offloaded else saved}
    return out


def activation_plan_lines(cfg: Config, world: int) -> list[str]:
    """Text rows for `sparsetrain plan`: activation MiB per rank by checkpointing mode, without/with offload."""
    head = (f"activations per rank and micro-batch (MiB; offload every {cfg.offload.every_k_layers} block(s); "
            f"configured: checkpointing={cfg.train.activation_checkpointing}, offload={cfg.offload.enabled})")
    rows = ["", head, "checkpointing  on device  with offload  largest block"]
    for mode in ("none", "selective", "full"):
        plain = activation_bytes_by_block(cfg, world, mode, offload=False)
        off = activation_bytes_by_block(cfg, world, mode, offload=True)
        dev = sum(v["on_device"] for v in plain.values())
        dev_off = sum(v["on_device"] for v in off.values())
        top = max(v["saved"] for v in plain.values())
        rows.append(f"{mode:<13}  {dev / 2**20:9.2f}  {dev_off / 2**20:12.2f}  {top / 2**20:13.2f}")
    return rows
