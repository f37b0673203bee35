"""Bad bytes refused in one line naming the file: ids over the vocab in a batch, binary tokenizer and sources."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sparsetrain.data import DataError, TokenBatches
from sparsetrain.data import prepare as prep
from sparsetrain.data.loader import TokenSplit
from sparsetrain.data.tokenizer import load_tokenizer
from tests.data.conftest import data_cfg

pytestmark = [pytest.mark.unit]
QUIET = {"workers": 1, "progress": False, "log": lambda m: None}
BINARY = bytes(range(256)) * 4  # 0x80.. is never valid UTF-8 after 0x7f


@pytest.fixture()
def byte_corpus(tmp_path):
    """A prepared byte-level corpus (one train shard, no val) whose meta.json records max_id < 256."""
    src = tmp_path / "src.txt"
    src.write_text("def f(x):\n    return x + 1\n" * 400)
    out = tmp_path / "corpus"
    prep.prepare(data_cfg(f"data.source={src}", f"data.corpus={out}", "data.val_fraction=0.001"), **QUIET)
    return out


def test_id_over_vocab_in_a_batch_names_the_shard(byte_corpus):
    shard = byte_corpus / "train_000000.bin"
    a = np.memmap(shard, dtype=np.uint16, mode="r+")
    a[5000] = 60000  # meta.json still records the old max_id: only the batch can see it
    a.flush()
    del a
    b = TokenBatches(data_cfg(f"data.corpus={byte_corpus}", "data.sampling=sequential", "data.val_split=fraction"))
    bad_step = (5000 // 32) // 4  # window 156 of seq_len 32, 4 windows per global batch
    for step in range(bad_step):
        assert int(b.train_batch(step)[0].max()) < 256
    with pytest.raises(DataError) as ei:
        b.train_batch(bad_step)
    msg = str(ei.value)
    assert "\n" not in msg and str(shard) in msg and "token id 60000" in msg and "model.vocab_size=256" in msg


def test_id_over_vocab_without_a_file_names_the_split():
    s = TokenSplit("val", [np.full(100, 7, dtype=np.uint16), np.full(100, 300, dtype=np.uint16)], 8, "sequential",
                   vocab_size=256, corpus="mem")
    s.windows(np.array([0, 1]))  # part 0 only: fine
    with pytest.raises(DataError, match=r"the val split of data.corpus='mem' has token id 300 >= model.vocab_size=256"):
        s.windows(np.array([0, 12]))


def test_binary_tokenizer_file_is_one_line(tmp_path):
    pytest.importorskip("tokenizers")
    bad = tmp_path / "tok.bin"
    bad.write_bytes(BINARY)
    for spec in (bad, tmp_path / "tok.json"):
        spec.write_bytes(BINARY)
        with pytest.raises(DataError, match=f"data.tokenizer='{spec}': not a UTF-8 tokenizer JSON"):
            load_tokenizer(str(spec))


def test_prepare_refuses_binary_text_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello world\n" * 50)
    (src / "b.txt").write_bytes(BINARY)
    with pytest.raises(DataError, match=f"data.source: {src / 'b.txt'} is not UTF-8 text") as ei:
        prep.prepare(data_cfg(f"data.source={src}", f"data.corpus={tmp_path / 'out'}"), **QUIET)
    assert "\n" not in str(ei.value)


def test_prepare_refuses_binary_jsonl_line(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + b'{"text": "bad \xff"}\n')
    with pytest.raises(DataError, match=f"{src} is not UTF-8 text \\(line 2: byte 0xff at offset 14 of the line\\); "):
        prep.prepare(data_cfg(f"data.source={src}", f"data.corpus={tmp_path / 'out'}"), **QUIET)


def test_prepare_still_accepts_utf8_text(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("héllo ✓ wörld\n" * 200, encoding="utf-8")
    meta = prep.prepare(data_cfg(f"data.source={src}", f"data.corpus={tmp_path / 'out'}", "data.val_fraction=0.001"),
                        **QUIET)
    assert meta["complete"] and meta["tokens"]["train"] > 0


def test_every_strict_utf8_read_names_the_first_bad_byte_the_same_way(tmp_path) -> None:
    from sparsetrain.config import ConfigError, load_config
    from sparsetrain.model.workloads import load_trace
    from sparsetrain.textio import decode_utf8, read_utf8

    bad = tmp_path / "bad.bin"
    bad.write_bytes(BINARY)  # 0x00..0x7f decode, 0x80 at offset 128 does not
    tail = "(byte 0x80 at offset 128)"
    with pytest.raises(KeyError, match=r"^'x: not UTF-8 \(byte 0x80 at offset 128\)'$"):
        read_utf8(bad, "x: not UTF-8", KeyError)
    assert decode_utf8("é".encode(), "x", ValueError) == "é"
    with pytest.raises(DataError) as tok:
        load_tokenizer(str(bad))
    with pytest.raises(ConfigError) as cfg:
        load_config(bad)
    with pytest.raises(ValueError) as trace:
        load_trace(bad)
    for e in (tok, cfg, trace):
        assert str(e.value).endswith(tail) and "\n" not in str(e.value), str(e.value)
