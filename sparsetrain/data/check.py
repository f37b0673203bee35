"""Check a run's data before any process starts: tokenizer vs model.vocab_size, corpus and resumed checkpoint;
every shard's size."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparsetrain.config import Config

if TYPE_CHECKING:
    from sparsetrain.data.loader import TokenBatches


def check_data(cfg: Config) -> dict[str, Any]:
    """Open the corpus as a rank would (raises DataError naming the problem); returns a summary."""
    from sparsetrain.data.loader import TokenBatches

    b = TokenBatches(cfg)
    _check_resume(cfg, b)
    meta = b.shards.meta
    return {"corpus": cfg.data.corpus, "tokenizer": b.tokenizer.record(), "model_vocab_size": cfg.model.vocab_size,
            "dtype": meta.get("dtype", str(b.train_split.parts[0].dtype)), "sampling": cfg.data.sampling,
            "val_split": b.val_source, "train_tokens": b.train_split.tokens, "val_tokens": b.val_split.tokens,
            "train_shards": len(b.train_split.parts), "val_shards": len(b.val_split.parts),
            "source": meta.get("source")}


def _check_resume(cfg: Config, b: TokenBatches) -> None:
    """The checkpoint a run would resume was trained with this run's tokenizer (JSON only, nothing unpickled)."""
    if not cfg.checkpoint.resume:
        return
    import json

    from sparsetrain.data.tokenizer import check_resume_tokenizer
    from sparsetrain.train.checkpoint import EXTRA, checkpoint_root, committed

    root = checkpoint_root(cfg.train.out_dir, cfg.checkpoint.dir)
    for path in reversed(committed(root)):
        try:
            extra = json.loads((path / EXTRA).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(extra, dict):
            check_resume_tokenizer(extra.get("tokenizer"), b.tokenizer, str(path))
        return
