"""Data: the embedded stdlib byte corpus, nanoGPT .bin memmaps, deterministic rank-sharded batches."""
from sparsetrain.data.corpus import DataError, load_corpus
from sparsetrain.data.loader import TokenBatches

__all__ = ["DataError", "TokenBatches", "load_corpus"]
