"""`sparsetrain data train-tokenizer`: a byte-level BPE (GPT-2 style) trained offline on `data.source`.

Byte-level pre-tokenization means every string encodes (no unknown token) and decoding is exact;
`<|endoftext|>` is special token 0, appended after each document by `data prepare`. Only the train
documents of the source (the same key hash as the shard split) are used, so validation text stays unseen.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from sparsetrain.config import Config
from sparsetrain.data.corpus import is_val_key
from sparsetrain.data.errors import DataError
from sparsetrain.data.sources import resolve_source
from sparsetrain.data.tokenizer import EOT, HFTokenizer, _import_tokenizers, read_tokenizer_json

MIN_VOCAB = 256 + 1  # the byte alphabet and end-of-text


def train_bpe(cfg: Config, out: str | Path | None = None, vocab_size: int | None = None, min_frequency: int = 2,
              overwrite: bool = False, progress: bool = True, log=print) -> HFTokenizer:
    """Train a byte-level BPE on data.source's train documents; write it to `out` (default data.tokenizer)."""
    d = cfg.data
    path = Path(out or d.tokenizer)
    if path.suffix != ".json":
        raise DataError(f"train-tokenizer writes a tokenizer.json; data.tokenizer={str(path)!r} is not a .json "
                        f"path (use --out or set data.tokenizer)")
    vocab = vocab_size or cfg.model.vocab_size
    if vocab < MIN_VOCAB:
        raise DataError(f"train-tokenizer: vocab size {vocab} is below {MIN_VOCAB} (256 bytes + end-of-text); "
                        f"set --vocab-size or model.vocab_size")
    if path.exists() and not overwrite:
        tok = HFTokenizer.from_json(read_tokenizer_json(path), str(path))
        log(f"{path}: exists (vocab {tok.vocab_size}); nothing to do (--overwrite to train again)")
        return tok
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    source = resolve_source(d)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)

    def texts() -> Iterator[str]:
        for key, text in source.documents():
            if not is_val_key(key, d.val_fraction):
                yield text

    t0 = time.perf_counter()
    tok.train_from_iterator(texts(), trainer=trainer, length=source.total)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    out_tok = HFTokenizer.from_json(read_tokenizer_json(path), str(path))
    log(f"{path}: byte-level BPE, vocab {out_tok.vocab_size} (asked {vocab}), trained on {source.spec} in "
        f"{time.perf_counter() - t0:.1f}s")
    return out_tok
