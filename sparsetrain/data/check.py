"""Check a run's data before any process starts: tokenizer vs model.vocab_size and corpus, every shard's size."""
from __future__ import annotations

from typing import Any

from sparsetrain.config import Config


def check_data(cfg: Config) -> dict[str, Any]:
    """Open the corpus as a rank would (raises DataError naming the problem); returns a summary."""
    from sparsetrain.data.loader import TokenBatches

    b = TokenBatches(cfg)
    meta = b.shards.meta
    return {"corpus": cfg.data.corpus, "tokenizer": b.tokenizer.record(), "model_vocab_size": cfg.model.vocab_size,
            "dtype": meta.get("dtype", str(b.train_split.parts[0].dtype)), "sampling": cfg.data.sampling,
            "val_split": b.val_source, "train_tokens": b.train_split.tokens, "val_tokens": b.val_split.tokens,
            "train_shards": len(b.train_split.parts), "val_shards": len(b.val_split.parts),
            "source": meta.get("source")}
