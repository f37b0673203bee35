"""Deterministic batch sampling: the global batch of step s is a pure function of (seed, s), split by rank.

Sampling (`data.sampling`):
- `random` (default): every row is a window of seq_len + 1 tokens starting at a position drawn
  uniformly over all shards of the split by `numpy.random.default_rng([seed, split, step])`; shards
  weigh by their number of start positions, windows never cross a shard boundary.
- `sequential`: the split's shards cut in order into non-overlapping windows (stride seq_len, so every
  token is a target exactly once per epoch); the global batch of step s takes windows s*B .. s*B+B-1,
  wrapping into the next epoch. `position(step)` reports (epoch, window) for exact token accounting.

Validation (`data.val_split`): `files` uses the corpus's val shards (split by file/document when the
corpus was prepared), `fraction` holds out the last `data.val_fraction` of the train tokens, `auto`
picks files when the corpus has val shards, else fraction.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from sparsetrain.config import Config
from sparsetrain.data.corpus import load_corpus
from sparsetrain.data.errors import DataError
from sparsetrain.data.shards import ShardSet
from sparsetrain.data.tokenizer import check_tokenizer

_TAGS = {"train": 0, "val": 1}


class TokenSplit:
    """One split as a list of token arrays; positions index windows across them."""

    def __init__(self, name: str, parts: list[np.ndarray], seq_len: int, sampling: str,
                 vocab_size: int | None = None, corpus: str = "") -> None:
        self.name, self.parts, self.seq_len, self.sampling = name, parts, seq_len, sampling
        self.vocab_size, self.corpus = vocab_size, corpus  # ids >= vocab_size are refused per batch (host side)
        if sampling == "sequential":  # non-overlapping windows: [j*S, j*S + S + 1)
            per = [max((len(p) - 1) // seq_len, 0) for p in parts]
        else:  # random starts in [0, len - S - 1): the windows the single-array sampler always drew
            per = [max(len(p) - seq_len - 1, 0) for p in parts]
        self.offsets = np.concatenate([[0], np.cumsum(per, dtype=np.int64)])  # [parts + 1]

    @property
    def tokens(self) -> int:
        return int(sum(len(p) for p in self.parts))

    @property
    def positions(self) -> int:
        """Start positions (random) or windows (sequential) available in this split."""
        return int(self.offsets[-1])

    def locate(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions [n] -> (part index [n], token offset inside the part [n])."""
        part = np.searchsorted(self.offsets, pos, side="right") - 1
        local = pos - self.offsets[part]
        return part, local * self.seq_len if self.sampling == "sequential" else local

    def windows(self, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets [n, S] for global positions [n]."""
        part, start = self.locate(pos)
        rows = [np.asarray(self.parts[p][s:s + self.seq_len + 1]) for p, s in zip(part.tolist(), start.tolist())]
        stacked = np.stack(rows)  # [n, S+1] on the host, before anything goes to a device
        if self.vocab_size is not None and stacked.size and int(stacked.max()) >= self.vocab_size:
            self._refuse_ids(stacked, part)
        chunk = torch.from_numpy(stacked.astype(np.int64))  # [n, S+1]
        return chunk[:, :-1], chunk[:, 1:]  # inputs, targets [n, S]

    def _refuse_ids(self, rows: np.ndarray, part: np.ndarray) -> None:
        """DataError naming the shard file(s) of the rows [n, S+1] that hold ids >= vocab_size."""
        bad = rows.max(axis=1) >= self.vocab_size  # [n]
        files = sorted({str(getattr(self.parts[p], "filename", None) or "") for p in part[bad].tolist()} - {""})
        where = f"shard {', '.join(files)}" if files else f"the {self.name} split"
        raise DataError(f"{where} of data.corpus={self.corpus!r} has token id {int(rows.max())} "
                        f">= model.vocab_size={self.vocab_size} (a corrupt shard, or a corpus prepared with "
                        f"another tokenizer); re-run `sparsetrain data prepare`")


def _hold_out_tail(parts: list[np.ndarray], fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split arrays into (head, tail) where the tail is the last `fraction` of all tokens."""
    want = math.ceil(sum(len(p) for p in parts) * fraction)
    head, tail = list(parts), []
    while want > 0 and head:
        last = head.pop()
        take = min(want, len(last))
        tail.insert(0, last[len(last) - take:])
        if take < len(last):
            head.append(last[:len(last) - take])
        want -= take
    return head, tail


def split_corpus(shards: ShardSet, val_split: str, val_fraction: float) -> tuple[list, list, str]:
    """(train parts, val parts, how val was chosen) for `data.val_split`."""
    if val_split == "files" and not shards.val:
        raise DataError("data.val_split=files but the corpus has no val shards; use data.val_split=fraction "
                        "or prepare the corpus with data.val_fraction > 0")
    if val_split == "files" or (val_split == "auto" and shards.val):
        return shards.train, shards.val, "files"
    train, val = _hold_out_tail(shards.train, val_fraction)
    return train, val, "fraction"


def recorded_shards(meta: dict) -> list[dict]:
    """The shard entries `meta.json` lists for both splits (with `max_id` where `data prepare` recorded it)."""
    return [e for split in ("train", "val") for e in meta.get("shards", {}).get(split, [])]


def maxima_recorded(recorded: list[dict]) -> bool:
    """Whether every shard has its largest id recorded (else ids must be read from the files)."""
    return bool(recorded) and all("max_id" in e for e in recorded)


class TokenBatches:
    """Windows of the corpus; every rank draws the same global batch and keeps its slice."""

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1) -> None:
        d = cfg.data
        self.seq_len, self.seed = cfg.model.seq_len, cfg.train.seed
        self.global_batch, self.rank, self.world = d.batch_size, rank, world
        self.micro_batches = cfg.train.grad_accum
        self.shards = load_corpus(d.corpus, d.val_fraction)
        self.tokenizer = check_tokenizer(d.tokenizer, cfg.model.vocab_size, d.corpus, self.shards.meta.get("tokenizer"))
        train, val, self.val_source = split_corpus(self.shards, d.val_split, d.val_fraction)
        vocab = cfg.model.vocab_size
        self.train_split = TokenSplit("train", train, self.seq_len, d.sampling, vocab, d.corpus)
        self.val_split = TokenSplit("val", val, self.seq_len, d.sampling, vocab, d.corpus)
        for s in (self.train_split, self.val_split):
            if s.positions <= 0:
                raise DataError(f"{s.name} split of data.corpus={d.corpus!r} has {s.tokens} tokens "
                                f"(longest part {max((len(p) for p in s.parts), default=0)}); need a shard of more "
                                f"than model.seq_len + 1 = {self.seq_len + 1}")
        self._check_ids(cfg)

    def _check_ids(self, cfg: Config) -> None:
        """Token ids below model.vocab_size: each shard's max recorded by `data prepare`, else a prefix of each part."""
        vocab = cfg.model.vocab_size
        recorded = recorded_shards(self.shards.meta)
        for e in recorded:
            if int(e.get("max_id", -1)) >= vocab:
                raise DataError(f"shard {e['file']} of data.corpus={cfg.data.corpus!r} has token id {e['max_id']} "
                                f">= model.vocab_size={vocab}")
        if maxima_recorded(recorded):
            return  # sizes were checked against meta.json on open: the recorded maxima describe these files
        for s in (self.train_split, self.val_split):
            for p in s.parts:  # a prefix: shards may be huge
                vmax = int(p[: 1 << 20].max())
                if vmax >= vocab:
                    raise DataError(f"{s.name} split of data.corpus={cfg.data.corpus!r} has token id {vmax} "
                                    f">= model.vocab_size={vocab}")

    # single-array views kept for callers that read the corpus directly (the stdlib corpus is one array)
    @property
    def train(self) -> np.ndarray:
        return self.train_split.parts[0] if len(self.train_split.parts) == 1 else np.concatenate(self.train_split.parts)

    @property
    def val(self) -> np.ndarray:
        return self.val_split.parts[0] if len(self.val_split.parts) == 1 else np.concatenate(self.val_split.parts)

    def _global_positions(self, split: TokenSplit, index: int, n: int) -> np.ndarray:
        """Window positions [n] of global batch `index` of `split`."""
        if split.sampling == "sequential":
            return (index * n + np.arange(n, dtype=np.int64)) % split.positions
        rng = np.random.default_rng([self.seed, _TAGS[split.name], index])
        return rng.integers(0, split.positions, size=n)

    def position(self, step: int) -> tuple[int, int]:
        """Sequential sampling: (epoch, first window) of the global batch of `step`."""
        first = step * self.global_batch
        return first // self.train_split.positions, first % self.train_split.positions

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
        pos = self._global_positions(self.train_split, step, self.global_batch)
        micro = pos.reshape(self.micro_batches, -1)  # [accum, B/accum]
        local = micro[:, self.local_slice(micro.shape[1])].reshape(-1)  # [accum * B/(accum*world)]
        return self.train_split.windows(local)

    def val_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the fixed validation batch number i."""
        pos = self._global_positions(self.val_split, i, self.global_batch)
        return self.val_split.windows(pos[self.local_slice(self.global_batch)])
