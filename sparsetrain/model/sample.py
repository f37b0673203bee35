"""Autoregressive sampling for a byte-level model."""
from __future__ import annotations

import torch

from sparsetrain.model.gpt import GPT


@torch.no_grad()
def sample(model: GPT, prompt: str, new_tokens: int, temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    """Sample `new_tokens` bytes after `prompt` (temperature + top-k), decode as UTF-8 with replacement."""
    g = torch.Generator().manual_seed(seed)
    seq_len = model.cfg.model.seq_len
    ids = torch.tensor([list(prompt.encode("utf-8")) or [10]], dtype=torch.long)  # [1, P]
    for _ in range(new_tokens):
        logits = model(ids[:, -seq_len:]).logits[:, -1, :].float()  # [1, V]
        logits = logits / max(temperature, 1e-5)
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=g)  # [1, 1]
        ids = torch.cat([ids, nxt], dim=1)
    return bytes(ids[0].tolist()).decode("utf-8", errors="replace")
