"""Data: the embedded stdlib byte corpus, token shard directories, deterministic rank-sharded batches."""
from sparsetrain.data.corpus import load_corpus
from sparsetrain.data.errors import DataError
from sparsetrain.data.loader import TokenBatches

__all__ = ["DataError", "TokenBatches", "load_corpus"]
