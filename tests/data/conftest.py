"""Small real corpora for the data tests: a few stdlib files copied as text, and a BPE trained on them."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from sparsetrain.config import load_config
from sparsetrain.data.corpus import stdlib_files


def data_cfg(*extra: str):
    """tiny with a 64-token context and small batches, plus data.* overrides; its own empty out_dir, so a
    checkpoint of an earlier `make run` (runs/tiny) is never taken for this run's."""
    out = tempfile.mkdtemp(prefix="st-data-test-")
    return load_config("tiny", ["launch.workers=1", "model.seq_len=32", "data.batch_size=4",
                                f"train.out_dir={out}", *extra])


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """40 stdlib sources (<= 6 KB each) under nested folders: documents with known text."""
    root = tmp_path_factory.mktemp("texts")
    picked = [f for f in stdlib_files() if 1_000 < f.stat().st_size][:40]
    for i, f in enumerate(picked):
        dest = root / f"d{i % 3}" / f"{f.stem}_{i}.txt"
        dest.parent.mkdir(exist_ok=True)
        dest.write_text(f.read_text(errors="replace")[:6_000])
    return root


@pytest.fixture(scope="session")
def bpe_json(text_dir, tmp_path_factory) -> Path:
    """A 320-token byte-level BPE trained on text_dir."""
    pytest.importorskip("tokenizers")
    from sparsetrain.data.train_tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(data_cfg(f"data.source={text_dir}"), out=out, vocab_size=320, progress=False, log=lambda m: None)
    return out
