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
    max_id, how = _scan_ids(cfg, b)
    return {"max_token_id": max_id, "ids_checked": how, "corpus": cfg.data.corpus, "tokenizer": b.tokenizer.record(),
            "model_vocab_size": cfg.model.vocab_size,
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


SCAN_TOKENS = 1 << 24  # tokens per read of the full scan (32-64 MiB): memory stays bounded on huge shards


def _scan_ids(cfg: Config, b: TokenBatches) -> tuple[int, str]:
    """(largest token id, how it was found): the maxima `data prepare` recorded, else a read of every token of
    every part (train only reads a prefix of such corpora before starting); DataError naming the part and the
    first offset of an id >= model.vocab_size."""
    from sparsetrain.data.errors import DataError
    from sparsetrain.data.loader import maxima_recorded, recorded_shards

    recorded = recorded_shards(b.shards.meta)
    if maxima_recorded(recorded):
        return max(int(e["max_id"]) for e in recorded), "recorded by data prepare"
    vocab, top = cfg.model.vocab_size, -1
    for split in (b.train_split, b.val_split):
        for i, part in enumerate(split.parts):
            for start in range(0, len(part), SCAN_TOKENS):
                chunk = part[start:start + SCAN_TOKENS]
                vmax = int(chunk.max()) if len(chunk) else -1
                if vmax >= vocab:
                    at = start + int((chunk >= vocab).argmax())
                    raise DataError(f"{split.name} part {i} of data.corpus={cfg.data.corpus!r} has token id "
                                    f"{int(part[at])} >= model.vocab_size={vocab} at token {at}")
                top = max(top, vmax)
    return top, "full scan"
