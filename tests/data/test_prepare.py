"""data prepare: text/JSONL/Parquet sources, parallel = serial, idempotent, resumable; train-tokenizer offline."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparsetrain.data import DataError, load_corpus
from sparsetrain.data import prepare as prep
from sparsetrain.data.corpus import is_val_key
from sparsetrain.data.shards import META
from sparsetrain.data.tokenizer import ByteTokenizer, load_tokenizer
from tests.data.conftest import data_cfg

pytestmark = [pytest.mark.unit]
QUIET = {"progress": False, "log": lambda m: None}


def _tokens(root: Path, split: str) -> np.ndarray:
    parts = getattr(load_corpus(str(root), 0.05), split)
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if parts else np.zeros(0, np.int64)


def _run(src, out: Path, *extra: str, **kw) -> dict:
    cfg = data_cfg(f"data.source={src}", f"data.corpus={out}", *extra)
    return prep.prepare(cfg, **{**QUIET, **kw})


def test_bpe_round_trip_and_record(bpe_json):
    tok = load_tokenizer(str(bpe_json))
    assert tok.vocab_size == 320 and tok.eot_id == 0
    text = "def f(x):\n    return x  # héllo ✓\n"
    (ids,) = tok.encode_batch([text])
    assert tok.decode(ids) == text and max(ids) < 320
    assert len(ids) < len(text.encode())  # merges learned
    rec = tok.record(with_content=True)
    assert rec["kind"] == "hf_file" and len(rec["sha256"]) == 64 and json.loads(rec["json"])["model"]["type"] == "BPE"


def test_prepare_text_files_split_by_file_and_decode_back(text_dir, bpe_json, tmp_path):
    meta = _run(text_dir, tmp_path / "c", f"data.tokenizer={bpe_json}", "data.shard_tokens=3000",
                "data.val_fraction=0.2", workers=1)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 320 and meta["complete"]
    assert len(meta["shards"]["train"]) > 2 and all(e["tokens"] == 3000 for e in meta["shards"]["train"][:-1])
    assert meta["docs"]["train"] + meta["docs"]["val"] == 40 and meta["docs"]["val"] > 0
    tok = load_tokenizer(str(bpe_json))
    files = sorted(f for f in text_dir.rglob("*.txt"))
    for split in ("train", "val"):
        want = [f.read_text() for f in files if is_val_key(str(f.relative_to(text_dir)), 0.2) == (split == "val")]
        ids = _tokens(tmp_path / "c", split)
        assert meta["tokens"][split] == len(ids)
        docs = np.split(ids, np.flatnonzero(ids == tok.eot_id) + 1)[:-1]  # every document ends with end-of-text
        assert [tok.decode(d[:-1].tolist()) for d in docs] == want


def test_parallel_workers_write_identical_shards(text_dir, bpe_json, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_CHARS", 20_000)  # several tasks per worker
    extra = (f"data.tokenizer={bpe_json}", "data.shard_tokens=5000")
    _run(text_dir, tmp_path / "one", *extra, workers=1)
    _run(text_dir, tmp_path / "two", *extra, workers=2)
    for split in ("train", "val"):
        np.testing.assert_array_equal(_tokens(tmp_path / "one", split), _tokens(tmp_path / "two", split))


def test_idempotent_and_refuses_other_inputs(text_dir, tmp_path):
    out = tmp_path / "c"
    _run(text_dir, out, workers=1)
    stamp = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    _run(text_dir, out, workers=1)  # up to date: nothing rewritten
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamp
    with pytest.raises(DataError, match="--overwrite"):
        _run(text_dir, out, "data.shard_tokens=777", workers=1)
    meta = _run(text_dir, out, "data.shard_tokens=777", workers=1, overwrite=True)
    assert meta["shard_tokens"] == 777 and meta["tokenizer"]["kind"] == "byte"


def test_resume_after_interrupt_equals_uninterrupted(text_dir, bpe_json, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_CHARS", 10_000)
    extra = (f"data.tokenizer={bpe_json}", "data.shard_tokens=4000")
    _run(text_dir, tmp_path / "ref", *extra, workers=1)
    real_commit, calls = prep._ShardWriter.commit, []

    def commit_then_die(self, fp):
        real_commit(self, fp)
        calls.append(self.docs_done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep._ShardWriter, "commit", commit_then_die)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _run(text_dir, out, *extra, workers=1)
    assert not (out / META).exists() and (out / prep.STATE).exists()
    with pytest.raises(DataError, match="did not finish"):
        load_corpus(str(out), 0.05)
    monkeypatch.setattr(prep._ShardWriter, "commit", real_commit)
    logs: list[str] = []
    _run(text_dir, out, *extra, workers=1, progress=False, log=logs.append)
    assert any(f"resuming after {calls[-1]}" in m for m in logs)
    for split in ("train", "val"):
        np.testing.assert_array_equal(_tokens(out, split), _tokens(tmp_path / "ref", split))
    assert not list(out.glob(".partial-*")) and not (out / prep.STATE).exists()


def test_jsonl_and_parquet_sources(tmp_path):
    rows = [{"text": f"document number {i} " * (i % 5 + 1), "id": i} for i in range(60)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    meta = _run(tmp_path / "a.jsonl", tmp_path / "j", workers=1)
    assert meta["source"]["format"] == "jsonl" and meta["docs"]["train"] + meta["docs"]["val"] == 60
    ids = np.concatenate([_tokens(tmp_path / "j", s) for s in ("train", "val")])
    assert len(ids) == sum(len(r["text"].encode()) for r in rows)  # byte tokenizer: no separator
    with pytest.raises(DataError, match=r"a.jsonl:1: no field 'body'.*found: id, text"):
        _run(tmp_path / "a.jsonl", tmp_path / "j2", "data.text_field=body", workers=1)

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": [r["text"] for r in rows], "id": list(range(60))}), tmp_path / "p.parquet")
    meta = _run(tmp_path / "p.parquet", tmp_path / "p", "data.text_field=content", workers=1)
    assert meta["source"]["format"] == "parquet" and meta["tokens"]["train"] + meta["tokens"]["val"] == len(ids)
    with pytest.raises(DataError, match="no column 'text'.*content, id"):
        _run(tmp_path / "p.parquet", tmp_path / "p2", workers=1)


def test_hf_dataset_from_local_path(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"row {i} text" for i in range(30)]})
    ds.save_to_disk(str(tmp_path / "ds"))
    meta = _run(f"hf:{tmp_path / 'ds'}", tmp_path / "out", workers=1)
    assert meta["source"]["format"] == "hf" and meta["docs"]["train"] + meta["docs"]["val"] == 30


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="no files found"):
        _run(tmp_path / "missing", tmp_path / "o", workers=1)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.jsonl").write_text("{}\n")
    (tmp_path / "m" / "b.txt").write_text("x")
    with pytest.raises(DataError, match="mixes formats"):
        _run(tmp_path / "m", tmp_path / "o", workers=1)
    with pytest.raises(DataError, match="output directory"):
        prep.prepare(data_cfg(f"data.source={tmp_path / 'm' / 'b.txt'}"), **QUIET)  # data.corpus=stdlib
    with pytest.raises(DataError, match="tokenizer.json path|file not found"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="allowed: byte"):
        load_tokenizer("bogus")
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
