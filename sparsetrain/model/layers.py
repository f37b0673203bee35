"""Dense transformer pieces: RMSNorm, RoPE, causal attention, SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.kernels import cpu_row_blocks
from sparsetrain.model.kv_cache import LayerKV


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [S, head_dim/2] for rotary embeddings."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)  # [S, hd/2]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, hd] rotated pairwise (first half / second half convention)."""
    s = x.shape[-2]
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, H, S, hd/2] each
    c, sn = cos[:s], sin[:s]
    return torch.cat([x1 * c - x2 * sn, x1 * sn + x2 * c], dim=-1).type_as(x)


class Attention(nn.Module):
    """Multi-head causal self-attention through scaled_dot_product_attention."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV | None = None) -> torch.Tensor:
        """x [B, S, d] at positions given by cos/sin (offset by kv.pos when decoding with a cache)."""
        b, s, d = x.shape
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # [B, S, d] -> [B, H, S, hd]
        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is None or kv.pos == 0:
            if kv is not None:
                kv.update(k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, hd]
        else:
            past = kv.pos
            k, v = kv.update(k, v)  # [B, H, past + S, hd]
            mask = None  # one new position attends to every cached one
            if s > 1:  # query i sits at position past + i: keys 0 .. past + i
                key_pos = torch.arange(k.shape[2], device=x.device)  # [past + S]
                mask = key_pos[None, :] <= past + torch.arange(s, device=x.device)[:, None]  # [S, past + S]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, S, hd]
        return self.wo(y.transpose(1, 2).reshape(b, s, d))  # [B, H, S, hd] -> [B, S, d]


class MLP(nn.Module):
    """Dense SwiGLU feed-forward."""

    def __init__(self, d_model: int, d_ffn: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ffn, bias=False)
        self.w3 = nn.Linear(d_model, d_ffn, bias=False)
        self.w2 = nn.Linear(d_ffn, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [N, d]; on CPU in cache-sized row blocks, as the experts
        blocks = cpu_row_blocks(rows, self.w1.out_features)
        if len(blocks) == 1:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        out = torch.cat([self.w2(F.silu(self.w1(b)) * self.w3(b)) for b in blocks])  # [N, d]
        return out.view(*x.shape[:-1], out.shape[-1])
