"""`sparsetrain data prepare`: documents -> tokenizer (parallel worker processes) -> train/val token shards.

The output directory gets `train_NNNNNN.bin` / `val_NNNNNN.bin` shards of exactly `data.shard_tokens`
tokens (the last of each split shorter), uint16 when the vocabulary fits else uint32, and `meta.json`
(tokenizer, vocab size, dtype, token and document counts, source, fingerprint). Documents are read in a
fixed order, tokenized in batches by a pool of processes (results kept in order), split into train/val
by a hash of their key, and joined with the tokenizer's end-of-text id. The result does not depend on
the number of workers.

Idempotent: a finished directory with the same fingerprint (source files, tokenizer, split, shard
size) is left as it is. Resumable: after every shard, the directory records how many documents are
done and the split buffers' unwritten tokens (`.prepare-state.json`, `.partial-*.bin`); a new run with
the same fingerprint skips those documents and continues.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sparsetrain.config import Config
from sparsetrain.data import shards
from sparsetrain.data.corpus import is_val_key
from sparsetrain.data.errors import DataError
from sparsetrain.data.shards import FORMAT, META, VERSION, shard_name, token_dtype, write_meta, write_shard
from sparsetrain.data.sources import Source, resolve_source
from sparsetrain.data.tokenizer import Tokenizer, load_tokenizer

STATE = shards.PREPARE_STATE
BATCH_CHARS = 1 << 20  # text per task handed to a worker (~1 MB)
_SPLITS = ("train", "val")
_worker_tok: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _worker_tok
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one Rust thread per process: we have processes
    _worker_tok = load_tokenizer(spec)


def _encode(batch: list[tuple[bool, str]], tok: Tokenizer | None = None) -> list[tuple[bool, np.ndarray]]:
    """Tokenize a batch of (is_val, text); each document followed by end-of-text when the tokenizer has one."""
    tok = tok or _worker_tok
    assert tok is not None
    ids = tok.encode_batch([t for _, t in batch])
    eot = [tok.eot_id] if tok.eot_id is not None else []
    return [(v, np.asarray(x + eot, dtype=np.int64)) for (v, _), x in zip(batch, ids)]


def _batches(docs: Iterator[tuple[str, str]], val_fraction: float, skip: int) -> Iterator[list[tuple[bool, str]]]:
    """Documents after the first `skip`, as (is_val, text) batches of about BATCH_CHARS characters."""
    batch: list[tuple[bool, str]] = []
    size = 0
    for i, (key, text) in enumerate(docs):
        if i < skip:
            continue
        batch.append((is_val_key(key, val_fraction), text))
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _ShardWriter:
    """Per-split token buffers cut into shards of exactly `shard_tokens`; the state that makes it resumable."""

    def __init__(self, out: Path, dtype: str, shard_tokens: int, state: dict[str, Any] | None) -> None:
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        st = state or {}
        self.docs_done = int(st.get("docs_done", 0))
        self.shards: dict[str, list[dict]] = {s: list(st.get("shards", {}).get(s, [])) for s in _SPLITS}
        self.docs: dict[str, int] = {s: int(st.get("docs", {}).get(s, 0)) for s in _SPLITS}
        self.buffers: dict[str, list[np.ndarray]] = {s: [] for s in _SPLITS}
        self.commits = int(st.get("commits", 0))
        for s in _SPLITS:
            part = self._partial(s, self.commits)
            if state and part.exists():
                self.buffers[s].append(np.fromfile(part, dtype=np.int64))
        self.flushed = False

    def _partial(self, split: str, commit: int) -> Path:
        return self.out / f".partial-{split}-{commit}.bin"

    def tokens(self, split: str) -> int:
        return sum(e["tokens"] for e in self.shards[split]) + sum(len(b) for b in self.buffers[split])

    def add(self, split: str, ids: np.ndarray) -> None:
        self.buffers[split].append(ids)
        self.docs[split] += 1
        if sum(len(b) for b in self.buffers[split]) >= self.shard_tokens:
            flat = np.concatenate(self.buffers[split])
            while len(flat) >= self.shard_tokens:
                self._write(split, flat[: self.shard_tokens])
                flat = flat[self.shard_tokens:]
            self.buffers[split] = [flat]

    def _write(self, split: str, tokens: np.ndarray) -> None:
        path = self.out / shard_name(split, len(self.shards[split]))
        self.shards[split].append(write_shard(path, tokens, self.dtype))
        self.flushed = True

    def commit(self, fingerprint: str) -> None:
        """Record progress (documents done, shards, unwritten tokens) so a new run can resume here.

        The unwritten tokens go to files named by the commit number and the state file, replaced last,
        names that number: a crash at any point leaves the previous commit intact.
        """
        n = self.commits + 1
        for s in _SPLITS:
            (np.concatenate(self.buffers[s]) if self.buffers[s] else np.zeros(0, np.int64)).tofile(self._partial(s, n))
        state = {"fingerprint": fingerprint, "commits": n, "docs_done": self.docs_done, "shards": self.shards,
                 "docs": self.docs}
        tmp = self.out / f"{STATE}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.out / STATE)
        for s in _SPLITS:
            self._partial(s, self.commits).unlink(missing_ok=True)
        self.commits, self.flushed = n, False

    def finish(self) -> None:
        for s in _SPLITS:
            if self.buffers[s]:
                rest = np.concatenate(self.buffers[s])
                if len(rest):
                    self._write(s, rest)
                self.buffers[s] = []
        for f in [self.out / STATE, *self.out.glob(".partial-*.bin")]:
            f.unlink(missing_ok=True)


def fingerprint(source: Source, tok: Tokenizer, val_fraction: float, shard_tokens: int) -> str:
    """What the output depends on; a finished directory with the same fingerprint is up to date."""
    rec = tok.record()
    key = [source.fingerprint(), rec.get("sha256") or rec["name"], rec["vocab_size"], val_fraction, shard_tokens]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def _start_state(out: Path, fp: str, overwrite: bool) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(finished meta if up to date, resumable state) for `out`; clears it when starting over."""
    meta_path, state_path = out / META, out / STATE
    if meta_path.exists() and not overwrite:
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("complete") and meta.get("fingerprint") == fp:
            return meta, None
        if meta.get("complete"):
            raise DataError(f"{out} holds a corpus prepared from another source, tokenizer or split; "
                            f"pass --overwrite to replace it, or choose another data.corpus")
    if state_path.exists() and not overwrite:
        try:
            state = json.loads(state_path.read_text())
        except json.JSONDecodeError:
            state = {}
        if state.get("fingerprint") == fp:
            return None, state
    for pattern in ("train_*.bin", "val_*.bin", ".partial-*.bin"):  # only what prepare writes
        for f in out.glob(pattern):
            f.unlink()
    meta_path.unlink(missing_ok=True)
    state_path.unlink(missing_ok=True)
    return None, None


def _tokenized(batches: Iterator[list[tuple[bool, str]]], tok: Tokenizer, spec: str, workers: int):
    """Tokenized batches in source order: inline for one worker, else a process pool (imap keeps order)."""
    if workers <= 1:
        for b in batches:
            yield _encode(b, tok)
        return
    ctx = mp.get_context("spawn")  # no fork of a process that holds torch / tokenizer threads
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
        yield from pool.imap(_encode, batches, chunksize=1)


def prepare(cfg: Config, out: str | Path | None = None, workers: int | None = None, overwrite: bool = False,
            progress: bool = True, log=print) -> dict[str, Any]:
    """Tokenize `data.source` with `data.tokenizer` into shards under `out` (default data.corpus); returns meta."""
    d = cfg.data
    out = Path(out or d.corpus)
    if str(out) == "stdlib":
        raise DataError("data.corpus=stdlib is the embedded byte corpus; give data prepare an output directory "
                        "(--out DIR or data.corpus)")
    tok, source = load_tokenizer(d.tokenizer), resolve_source(d)
    dtype = token_dtype(tok.vocab_size)
    fp = fingerprint(source, tok, d.val_fraction, d.shard_tokens)
    out.mkdir(parents=True, exist_ok=True)
    done, state = _start_state(out, fp, overwrite)
    if done is not None:
        log(f"{out}: up to date ({done['tokens']['train']:,} train / {done['tokens']['val']:,} val tokens, "
            f"{done['dtype']}); nothing to do")
        return done
    writer = _ShardWriter(out, dtype, d.shard_tokens, state)
    if state:
        log(f"{out}: resuming after {writer.docs_done:,} documents")
    workers = workers or d.prepare_workers or os.cpu_count() or 1
    from tqdm import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=source.total, initial=writer.docs_done, unit="doc", disable=not progress, dynamic_ncols=True)
    try:  # the bar ends its line even when a document is refused, so the error prints on a line of its own
        for encoded in _tokenized(_batches(source.documents(), d.val_fraction, writer.docs_done), tok, d.tokenizer,
                                  workers):
            for is_val, ids in encoded:
                writer.add("val" if is_val else "train", ids)
            writer.docs_done += len(encoded)
            bar.update(len(encoded))
            bar.set_postfix(tokens=f"{writer.tokens('train') + writer.tokens('val'):,}")
            if writer.flushed:
                writer.commit(fp)
    finally:
        bar.close()
    writer.finish()
    if not writer.shards["train"]:
        raise DataError(f"data.source={d.source!r} produced no train tokens ({writer.docs_done} documents)")
    meta = {"format": FORMAT, "version": VERSION, "complete": True, "fingerprint": fp, "dtype": dtype,
            "vocab_size": tok.vocab_size, "tokenizer": tok.record(), "source": source.describe(),
            "val_fraction": d.val_fraction, "shard_tokens": d.shard_tokens,
            "tokens": {s: writer.tokens(s) for s in _SPLITS}, "docs": writer.docs, "shards": writer.shards}
    write_meta(out, meta)
    secs = time.perf_counter() - t0
    log(f"{out}: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens ({dtype}) from "
        f"{writer.docs_done:,} documents in {len(writer.shards['train'])} + {len(writer.shards['val'])} shards, "
        f"{secs:.1f}s with {workers} worker(s)")
    return meta

