"""Data: stdlib corpus, deterministic rank-sharded batches, file-level split, nanoGPT .bin dirs and their errors."""
from __future__ import annotations

import copy
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain.config import load_config
from sparsetrain.data import DataError, TokenBatches, load_corpus
from sparsetrain.data.corpus import STDLIB_MAX_BYTES, is_val_key, stdlib_files

pytestmark = [pytest.mark.unit]

SMALL = ["launch.workers=1", "model.seq_len=16", "data.batch_size=8"]


def _cfg(*extra: str):
    return load_config("tiny", SMALL + list(extra))


@pytest.fixture(scope="module")
def stdlib_batches() -> TokenBatches:
    return TokenBatches(_cfg())


def test_stdlib_corpus_nonempty_bytes(stdlib_batches):
    tr, va = stdlib_batches.train, stdlib_batches.val
    assert len(tr) > 100_000 and len(va) > 1_000
    assert tr.dtype == np.uint8 and va.dtype == np.uint8
    assert len(tr) + len(va) <= STDLIB_MAX_BYTES + max(f.stat().st_size for f in stdlib_files()[:2000])
    assert b"def " in bytes(tr[:200_000])


def test_batches_deterministic_per_step(stdlib_batches):
    x1, y1 = stdlib_batches.train_batch(3)
    x2, y2 = TokenBatches(_cfg()).train_batch(3)  # a fresh instance: a pure function of (seed, step)
    assert x1.shape == (8, 16) and x1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    x3, _ = stdlib_batches.train_batch(4)
    assert not torch.equal(x1, x3)
    x4, _ = TokenBatches(_cfg("train.seed=5")).train_batch(3)
    assert not torch.equal(x1, x4)
    v1, _ = stdlib_batches.val_batch(0)
    assert torch.equal(v1, stdlib_batches.val_batch(0)[0])
    assert not torch.equal(v1, stdlib_batches.val_batch(1)[0])


def _as_rank(b: TokenBatches, rank: int, world: int) -> TokenBatches:
    """Same corpus arrays, another rank (avoids re-reading the corpus per rank)."""
    out = copy.copy(b)
    out.rank, out.world = rank, world
    return out


def test_rank_constructor_sets_slice():
    b = TokenBatches(_cfg(), rank=1, world=2)
    assert (b.rank, b.world) == (1, 2) and b.local_slice(8) == slice(4, 8)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_rank_slices_concatenate_to_global_batch(stdlib_batches, world):
    for step in (0, 7):
        full_x, full_y = stdlib_batches.train_batch(step)
        parts = [_as_rank(stdlib_batches, r, world).train_batch(step) for r in range(world)]
        assert all(p[0].shape == (8 // world, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
        assert torch.equal(torch.cat([p[1] for p in parts]), full_y)
    vparts = [_as_rank(stdlib_batches, r, world).val_batch(1)[0] for r in range(world)]
    assert torch.equal(torch.cat(vparts), stdlib_batches.val_batch(1)[0])


@pytest.mark.parametrize("world,accum", [(2, 2), (2, 4), (4, 2)])
def test_micro_batch_k_of_all_ranks_is_single_process_micro_batch_k(world, accum):
    """Grad accumulation: ranks shard each micro-batch, not the whole step's batch."""
    single = TokenBatches(_cfg(f"train.grad_accum={accum}"))
    full_x, _ = single.train_batch(2)
    mb = 8 // accum
    for k in range(accum):
        ranks = [_as_rank(single, r, world).train_batch(2)[0] for r in range(world)]
        per = mb // world  # rows of micro-batch k on each rank
        assert torch.equal(torch.cat([x[k * per:(k + 1) * per] for x in ranks]), full_x[k * mb:(k + 1) * mb])


def test_train_val_split_by_file_is_disjoint(stdlib_batches):
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = [str(f.relative_to(root)) for f in stdlib_files()]
    val = {r for r in rels if is_val_key(r, 0.05)}
    train = {r for r in rels if not is_val_key(r, 0.05)}
    assert val and train and not (val & train)
    assert all(is_val_key(r, 0.05) == is_val_key(r, 0.05) for r in rels[:200])  # deterministic
    assert 0.01 < len(val) / len(rels) < 0.15
    # a sizeable val file that made it into the corpus lands in val bytes only
    total, picked = 0, None
    for f in stdlib_files():
        total += f.stat().st_size
        rel = str(f.relative_to(root))
        if total >= STDLIB_MAX_BYTES:
            break
        if is_val_key(rel, 0.05) and 5_000 < f.stat().st_size < 50_000:
            picked = f
            break
    assert picked is not None
    data = picked.read_bytes()
    assert bytes(stdlib_batches.val).find(data) >= 0
    assert bytes(stdlib_batches.train).find(data) == -1


def _write_bins(d: Path, n_train: int = 2000, n_val: int = 500, vocab: int = 300) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rng.integers(0, vocab, n_train, dtype=np.uint16).tofile(d / "train.bin")
    rng.integers(0, vocab, n_val, dtype=np.uint16).tofile(d / "val.bin")


def test_nanogpt_bin_dir_loads(tmp_path):
    _write_bins(tmp_path)
    shards = load_corpus(str(tmp_path), 0.05)
    (tr,), (va,) = shards.train, shards.val
    assert len(tr) == 2000 and len(va) == 500 and tr.dtype == np.uint16
    b = TokenBatches(_cfg(f"data.corpus={tmp_path}", "model.vocab_size=300"))
    x, _ = b.train_batch(0)
    assert x.shape == (8, 16) and int(x.max()) < 300
    expect = np.fromfile(tmp_path / "train.bin", dtype=np.uint16).astype(np.int64)
    # every row is a contiguous window of train.bin
    for row in x:
        r = row.numpy()
        starts = np.flatnonzero(expect[: len(expect) - 16] == r[0])
        assert any(np.array_equal(expect[s:s + 16], r) for s in starts)


def test_missing_dir_names_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        load_corpus(str(missing), 0.05)


def test_missing_train_file_names_path(tmp_path):
    _write_bins(tmp_path)
    (tmp_path / "train.bin").unlink()
    with pytest.raises(DataError, match=str(tmp_path / "train.bin")):
        load_corpus(str(tmp_path), 0.05)


def test_missing_val_file_holds_out_train_tail(tmp_path):
    _write_bins(tmp_path)
    (tmp_path / "val.bin").unlink()
    b = TokenBatches(_cfg(f"data.corpus={tmp_path}", "model.vocab_size=300"))
    assert b.val_source == "fraction"
    assert len(b.val) == 100 and len(b.train) == 1900  # ceil(2000 * 0.05) tokens held out
    with pytest.raises(DataError, match="no val shards"):
        TokenBatches(_cfg(f"data.corpus={tmp_path}", "model.vocab_size=300", "data.val_split=files"))


def test_empty_file_names_path(tmp_path):
    _write_bins(tmp_path)
    (tmp_path / "val.bin").write_bytes(b"")
    with pytest.raises(DataError, match=str(tmp_path / "val.bin")):
        load_corpus(str(tmp_path), 0.05)


def test_odd_size_file_rejected(tmp_path):
    _write_bins(tmp_path)
    (tmp_path / "train.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="odd"):
        load_corpus(str(tmp_path), 0.05)


def test_too_short_split(tmp_path):
    _write_bins(tmp_path, n_val=10, vocab=256)
    with pytest.raises(DataError, match="val split"):
        TokenBatches(_cfg(f"data.corpus={tmp_path}"))


@pytest.mark.parametrize("which", ["train", "val"])
def test_token_id_over_vocab(tmp_path, which):
    _write_bins(tmp_path, vocab=256)
    arr = np.fromfile(tmp_path / f"{which}.bin", dtype=np.uint16)
    arr[37] = 256
    arr.tofile(tmp_path / f"{which}.bin")
    with pytest.raises(DataError, match="256") as ei:
        TokenBatches(_cfg(f"data.corpus={tmp_path}"))
    assert "vocab_size" in str(ei.value)
