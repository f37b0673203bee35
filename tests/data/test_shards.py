"""Token shards: uint16/uint32 round trip, several shards, sequential epochs, val split, corrupt shards refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain.config import load_config
from sparsetrain.data import DataError, TokenBatches, load_corpus
from sparsetrain.data.shards import FORMAT, META, VERSION, shard_name, token_dtype, write_meta, write_shard

pytestmark = [pytest.mark.unit]

S = 16


def _cfg(corpus: Path, vocab: int, *extra: str):
    return load_config("tiny", ["launch.workers=1", f"model.seq_len={S}", "data.batch_size=8",
                                f"data.corpus={corpus}", f"model.vocab_size={vocab}", *extra])


def write_dir(root: Path, splits: dict[str, list[np.ndarray]], vocab: int, tokenizer: dict | None = None) -> dict:
    """A shard directory as `data prepare` leaves it (no tokenizer record unless given)."""
    root.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab)
    entries = {split: [write_shard(root / shard_name(split, i), arr, dtype) for i, arr in enumerate(arrs)]
               for split, arrs in splits.items()}
    meta = {"format": FORMAT, "version": VERSION, "dtype": dtype, "vocab_size": vocab, "complete": True,
            "shards": entries, **({"tokenizer": tokenizer} if tokenizer else {})}
    write_meta(root, meta)
    return meta


@pytest.mark.parametrize("vocab,dtype", [(300, np.uint16), (65_536, np.uint16), (65_537, np.uint32),
                                         (200_000, np.uint32)])
def test_shard_round_trip_both_dtypes(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    arrs = [rng.integers(0, vocab, n, dtype=np.int64) for n in (700, 900)]
    arrs[0][5] = vocab - 1  # the largest id survives the round trip
    val = rng.integers(0, vocab, 300, dtype=np.int64)
    write_dir(tmp_path, {"train": arrs, "val": [val]}, vocab)
    shards = load_corpus(str(tmp_path), 0.05)
    assert shards.meta["dtype"] == np.dtype(dtype).name
    assert [p.dtype for p in shards.train + shards.val] == [np.dtype(dtype)] * 3
    assert isinstance(shards.train[0], np.memmap)
    for got, want in zip(shards.train + shards.val, arrs + [val]):
        np.testing.assert_array_equal(np.asarray(got).astype(np.int64), want)
    assert (tmp_path / shard_name("train", 1)).stat().st_size == 900 * np.dtype(dtype).itemsize
    b = TokenBatches(_cfg(tmp_path, vocab))
    x, y = b.train_batch(0)
    assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < vocab


def _is_window_of(row: np.ndarray, parts: list[np.ndarray]) -> bool:
    for p in parts:
        for s in np.flatnonzero(p[: len(p) - len(row) + 1] == row[0]):
            if np.array_equal(p[s:s + len(row)], row):
                return True
    return False


def test_random_windows_cover_all_shards_never_cross(tmp_path):
    # distinct id ranges per shard show which shard a window came from
    arrs = [np.arange(100, 160) % 1000, np.arange(200, 400), np.arange(500, 517)]  # last: S + 1 tokens, no start
    write_dir(tmp_path, {"train": arrs, "val": [np.arange(800, 900)]}, 1000)
    b = TokenBatches(_cfg(tmp_path, 1000))
    assert b.train_split.positions == (60 - S - 1) + (200 - S - 1)
    seen = set()
    for step in range(30):
        x, y = b.train_batch(step)
        for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
            assert _is_window_of(row, arrs), row
            seen.add(int(row[0]) // 100)
    assert seen == {1, 2, 3}  # shards 0 and 1 (ids 100..159, 200..399); never the too-short shard 2
    x1, _ = TokenBatches(_cfg(tmp_path, 1000)).train_batch(4)
    assert torch.equal(x1, b.train_batch(4)[0])  # a pure function of (seed, step)


def test_sequential_epochs_see_every_token_once(tmp_path):
    arrs = [np.arange(0, 8 * S + 1), np.arange(1000, 1000 + 8 * S + 5)]  # 8 windows each (tail of 4 unused)
    write_dir(tmp_path, {"train": arrs, "val": [np.arange(3000, 3100)]}, 4000)
    b = TokenBatches(_cfg(tmp_path, 4000, "data.sampling=sequential"))
    assert b.train_split.positions == 16
    targets = torch.cat([b.train_batch(step)[1] for step in (0, 1)])  # 2 steps x 8 rows = one epoch
    want = np.concatenate([arrs[0][1:8 * S + 1], arrs[1][1:8 * S + 1]])
    np.testing.assert_array_equal(np.sort(targets.flatten().numpy()), np.sort(want))
    assert b.position(0) == (0, 0) and b.position(1) == (0, 8) and b.position(2) == (1, 0)
    assert torch.equal(b.train_batch(2)[0], b.train_batch(0)[0])  # epoch 2 repeats the order
    x0 = b.train_batch(0)[0]
    assert torch.equal(x0[0], torch.arange(0, S)) and torch.equal(x0[1], torch.arange(S, 2 * S))


def test_sequential_ranks_and_accum_partition_the_global_batch(tmp_path):
    write_dir(tmp_path, {"train": [np.arange(0, 40 * S + 1)], "val": [np.arange(0, 200)]}, 4000)
    cfg = _cfg(tmp_path, 4000, "data.sampling=sequential", "train.grad_accum=2")
    full = TokenBatches(cfg).train_batch(1)[0]
    parts = [TokenBatches(cfg, rank=r, world=2).train_batch(1)[0] for r in range(2)]
    # micro-batch k of both ranks == micro-batch k of the single process
    assert torch.equal(torch.cat([parts[0][:2], parts[1][:2]]), full[:4])
    assert torch.equal(torch.cat([parts[0][2:], parts[1][2:]]), full[4:])


def test_val_split_by_fraction_holds_out_train_tail(tmp_path):
    arrs = [np.arange(0, 500), np.arange(500, 560)]
    write_dir(tmp_path, {"train": arrs, "val": [np.arange(900, 1000)]}, 1000)
    b = TokenBatches(_cfg(tmp_path, 1000, "data.val_split=fraction", "data.val_fraction=0.25"))
    assert b.val_source == "fraction"
    np.testing.assert_array_equal(b.val, np.arange(420, 560))  # last 25% of 560 tokens, across two shards
    np.testing.assert_array_equal(b.train, np.arange(0, 420))
    assert int(b.val_batch(0)[0].min()) >= 420 and int(b.train_batch(0)[1].max()) < 420
    assert TokenBatches(_cfg(tmp_path, 1000)).val_source == "files"


def test_truncated_shard_refused_naming_file(tmp_path):
    write_dir(tmp_path, {"train": [np.arange(200), np.arange(300)], "val": [np.arange(100)]}, 1000)
    f = tmp_path / shard_name("train", 1)
    f.write_bytes(f.read_bytes()[:-2])  # one uint16 token short
    with pytest.raises(DataError, match="truncated or corrupt") as ei:
        load_corpus(str(tmp_path), 0.05)
    assert str(f) in str(ei.value)


def test_odd_bytes_and_missing_shard_refused(tmp_path):
    meta = write_dir(tmp_path, {"train": [np.arange(200)], "val": [np.arange(100)]}, 1000)
    (tmp_path / shard_name("val", 0)).unlink()
    with pytest.raises(DataError, match="missing shard"):
        load_corpus(str(tmp_path), 0.05)
    meta["shards"]["val"] = []
    write_meta(tmp_path, meta)
    (tmp_path / shard_name("train", 0)).write_bytes(b"\x01\x00\x02")
    meta["shards"]["train"][0]["tokens"] = 1
    write_meta(tmp_path, meta)
    with pytest.raises(DataError, match="3 bytes"):
        load_corpus(str(tmp_path), 0.05)


def test_unfinished_or_foreign_meta_refused(tmp_path):
    meta = write_dir(tmp_path, {"train": [np.arange(200)], "val": [np.arange(100)]}, 1000)
    write_meta(tmp_path, {**meta, "complete": False})
    with pytest.raises(DataError, match="did not finish"):
        load_corpus(str(tmp_path), 0.05)
    write_meta(tmp_path, {**meta, "dtype": "int8"})
    with pytest.raises(DataError, match="int8"):
        load_corpus(str(tmp_path), 0.05)
    (tmp_path / META).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_corpus(str(tmp_path), 0.05)
    (tmp_path / META).write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not a sparsetrain shard index"):
        load_corpus(str(tmp_path), 0.05)


def test_recorded_max_id_over_vocab_refused(tmp_path):
    write_dir(tmp_path, {"train": [np.arange(5000)], "val": [np.arange(100)]}, 5000)
    with pytest.raises(DataError, match="token id 4999 >= model.vocab_size=4096"):
        TokenBatches(_cfg(tmp_path, 4096))


def test_short_shards_only_refused(tmp_path):
    write_dir(tmp_path, {"train": [np.arange(10), np.arange(12)], "val": [np.arange(100)]}, 1000)
    with pytest.raises(DataError, match="train split .* has 22 tokens"):
        TokenBatches(_cfg(tmp_path, 1000))


@pytest.mark.parametrize("key,value", [("data.sampling", "shuffle"), ("data.val_split", "random"),
                                       ("data.source_format", "csv")])
def test_data_choices_checked_at_load(key, value):
    from sparsetrain.config import ConfigError

    with pytest.raises(ConfigError, match=f"{key}='{value}'; allowed"):
        load_config("tiny", [f"{key}={value}"])
