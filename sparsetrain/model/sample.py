"""Autoregressive sampling with a KV cache: temperature, top-k, top-p (nucleus), greedy at temperature 0.

Context: the model sees at most model.seq_len positions. When the context is full, it restarts from
the last seq_len // 2 tokens (one prefill of those, then one position per new token again). The path
without a cache (`use_cache=False`, the full forward over the same context every step) follows the
same rule, so both give the same logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsetrain.model.gpt import GPT


@dataclass
class Generation:
    ids: list[int]  # the new tokens (not the prompt)
    positions: int = 0  # positions run through the model (prefills + one per cached step)
    logits: list[torch.Tensor] = field(default_factory=list)  # [V] per new token, when asked for


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] with everything outside the top-k and outside the top-p probability mass at -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)  # [..., V]
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before a token already reaches top_p (first always kept)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


@torch.no_grad()
def generate(model: GPT, prompt: list[int], new_tokens: int, temperature: float = 0.8, top_k: int = 40,
             top_p: float = 1.0, seed: int = 0, use_cache: bool = True, vocab_limit: int | None = None,
             stop_id: int | None = None, keep_logits: bool = False) -> Generation:
    """Sample up to `new_tokens` ids after `prompt` (stops early at `stop_id`); ids >= vocab_limit never drawn."""
    if not prompt:
        raise ValueError("generate needs at least one prompt token")
    g = torch.Generator().manual_seed(seed)
    seq_len = model.cfg.model.seq_len
    device = model.tok_emb.weight.device
    ids = list(prompt)
    start = max(0, len(ids) - seq_len)  # first position of the context window
    cache = model.new_cache() if use_cache else None
    out = Generation([])
    for _ in range(new_tokens):
        if len(ids) - start > seq_len:  # window full: keep the last half
            start = len(ids) - seq_len // 2
            if cache is not None:
                cache.reset()
        if cache is None:
            feed = ids[start:]
        else:  # only positions not cached yet: the whole window after a reset, else the newest token
            feed = ids[start + cache.pos:]
        x = torch.tensor([feed], dtype=torch.long, device=device)  # [1, S]
        logits = model(x, cache=cache).logits[0, -1].float().cpu()  # [V]
        out.positions += len(feed)
        if vocab_limit is not None:
            logits[vocab_limit:] = float("-inf")  # padded vocabulary rows: no token behind them
        if keep_logits:
            out.logits.append(logits)
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = int(torch.multinomial(probs, 1, generator=g))
        ids.append(nxt)
        out.ids.append(nxt)
        if stop_id is not None and nxt == stop_id:
            break
    return out

