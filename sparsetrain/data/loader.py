"""Deterministic batch sampling: the global batch of step s is a pure function of (seed, s), split by rank."""
from __future__ import annotations

import numpy as np
import torch

from sparsetrain.config import Config
from sparsetrain.data.corpus import DataError, load_corpus


class TokenBatches:
    """Random contiguous windows; every rank draws the same global batch and keeps its slice."""

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1) -> None:
        self.seq_len, self.seed = cfg.model.seq_len, cfg.train.seed
        self.global_batch, self.rank, self.world = cfg.data.batch_size, rank, world
        self.micro_batches = cfg.train.grad_accum
        self.train, self.val = load_corpus(cfg.data.corpus, cfg.data.val_fraction)
        for name, arr in (("train", self.train), ("val", self.val)):
            if len(arr) <= self.seq_len + 1:
                raise DataError(f"{name} split of data.corpus={cfg.data.corpus!r} has {len(arr)} tokens; "
                                f"need more than model.seq_len + 1 = {self.seq_len + 1}")
        for name, arr in (("train", self.train), ("val", self.val)):  # a prefix: .bin files may be huge
            vmax = int(arr[: 1 << 20].max())
            if vmax >= cfg.model.vocab_size:
                raise DataError(f"{name} split of data.corpus={cfg.data.corpus!r} has token id {vmax} "
                                f">= model.vocab_size={cfg.model.vocab_size}")

    def _windows(self, arr: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]  # [B, S+1]
        chunk = torch.from_numpy(np.asarray(arr[idx]).astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]  # inputs, targets [B, S]

    def _global_starts(self, arr: np.ndarray, tag: int, index: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, tag, index])
        return rng.integers(0, len(arr) - self.seq_len - 1, size=n)

    def local_slice(self, n: int) -> slice:
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share [B/world, S] of the global training batch of `step`.

        With grad accumulation the global batch is cut into micro-batches first and each
        micro-batch is sharded over the ranks, so micro-batch k of every rank together is
        exactly micro-batch k of a single-process run: per-micro-batch statistics reduced
        over ranks (the load-balancing loss's expert counts) equal the single-process ones.
        """
        starts = self._global_starts(self.train, 0, step, self.global_batch)
        micro = starts.reshape(self.micro_batches, -1)  # [accum, B/accum]
        local = micro[:, self.local_slice(micro.shape[1])].reshape(-1)  # [accum * B/(accum*world)]
        return self._windows(self.train, local)

    def val_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the fixed validation batch number i."""
        starts = self._global_starts(self.val, 1, i, self.global_batch)
        return self._windows(self.val, starts[self.local_slice(self.global_batch)])
