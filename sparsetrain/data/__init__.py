"""Data: the embedded stdlib byte corpus, token shard directories, tokenizers, deterministic rank-sharded batches.

Names load on first use, so `sparsetrain data ...` commands and the CLI do not import torch to start.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"DataError": "sparsetrain.data.errors", "TokenBatches": "sparsetrain.data.loader",
            "load_corpus": "sparsetrain.data.corpus", "load_tokenizer": "sparsetrain.data.tokenizer"}
__all__ = ["DataError", "TokenBatches", "load_corpus", "load_tokenizer"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsetrain.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
