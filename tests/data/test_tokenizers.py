"""Tokenizer adapters: tiktoken (a stand-in module: its real encodings download), records rebuilt from checkpoints."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from sparsetrain.data import DataError, load_corpus
from sparsetrain.data.prepare import prepare
from sparsetrain.data.tokenizer import ByteTokenizer, load_tokenizer, same_tokenizer, tokenizer_from_record
from tests.data.conftest import data_cfg

pytestmark = [pytest.mark.unit]


class _FakeEncoding:
    """tiktoken.Encoding's surface that the adapter uses: ids = bytes + 1, end-of-text 299."""

    n_vocab, eot_token = 300, 299

    def encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        return [[b + 1 for b in t.encode()] for t in texts]

    def decode(self, ids: list[int], errors: str = "strict") -> str:
        return bytes(i - 1 for i in ids if 0 < i < 257).decode(errors=errors)


@pytest.fixture
def fake_tiktoken(monkeypatch):
    def get_encoding(name: str):
        if name != "fake":
            raise ValueError(f"Unknown encoding {name}")
        return _FakeEncoding()

    monkeypatch.setitem(sys.modules, "tiktoken", types.SimpleNamespace(get_encoding=get_encoding))


def test_tiktoken_adapter_prepare_and_record(fake_tiktoken, tmp_path):
    tok = load_tokenizer("tiktoken:fake")
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("tiktoken:fake", 300, 299)
    assert tok.decode(tok.encode_batch(["héllo"])[0]) == "héllo"
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").write_text("xyz!")
    meta = prepare(data_cfg(f"data.source={tmp_path}", f"data.corpus={tmp_path / 'out'}", "data.tokenizer=tiktoken:fake",
                            "data.val_fraction=0.01"), workers=1, progress=False, log=lambda m: None)
    assert meta["tokenizer"] == {"kind": "tiktoken", "name": "tiktoken:fake", "vocab_size": 300, "eot_id": 299}
    ids = np.asarray(load_corpus(str(tmp_path / "out"), 0.05).train[0]).tolist()
    assert ids == [98, 99, 100, 299, 121, 122, 123, 34, 299]  # each document + end-of-text
    rebuilt = tokenizer_from_record(tok.record())
    assert same_tokenizer(rebuilt.record(), tok.record())
    with pytest.raises(DataError, match="tiktoken:nope: Unknown encoding nope"):
        load_tokenizer("tiktoken:nope")


def test_tiktoken_missing_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import fails
    with pytest.raises(DataError, match="needs the `tiktoken` package"):
        load_tokenizer("tiktoken:gpt2")


def test_records_rebuild_and_are_verified(bpe_json):
    tok = load_tokenizer(str(bpe_json))
    rec = tok.record(with_content=True)
    again = tokenizer_from_record(rec)
    assert again.encode_batch(["def x(): pass"]) == tok.encode_batch(["def x(): pass"])
    with pytest.raises(DataError, match="SHA-256"):
        tokenizer_from_record({**rec, "sha256": "0" * 64})
    assert isinstance(tokenizer_from_record({}, "byte"), ByteTokenizer)  # checkpoints from before the record
    assert not same_tokenizer(rec, ByteTokenizer().record())
    assert ByteTokenizer().decode([104, 105, 300]) == "hi"  # ids past the bytes are dropped, never a crash
