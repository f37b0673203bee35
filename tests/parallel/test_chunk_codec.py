"""Compressed expert chunks: exact round trip of N:M-masked rows, byte ratio, when the codec applies."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.config import load_config
from sparsetrain.model.gpt import build_model
from sparsetrain.parallel.chunk_codec import NMChunkCodec, chunk_codec_for
from sparsetrain.sparsity import NMConfig, nm_mask, sparsify_

pytestmark = [pytest.mark.unit]


def _masked_rows(codec: NMChunkCodec, count: int, dtype: torch.dtype) -> torch.Tensor:
    parts = []
    for o, i in codec.shapes:
        w = torch.randn(count, o, i).to(dtype)
        parts.append((w * nm_mask(w, codec.n, codec.m)).reshape(count, -1))
    return torch.cat(parts, dim=1)  # [count, C]


@pytest.mark.parametrize("n,m,dtype", [(2, 4, torch.float32), (2, 4, torch.bfloat16), (1, 4, torch.float16),
                                       (4, 8, torch.float32)])
def test_round_trip_is_exact(n, m, dtype):
    codec = NMChunkCodec(16, 32, n, m, dtype)
    rows = _masked_rows(codec, 3, dtype)
    data = codec.encode(rows)
    assert data.dtype == torch.uint8 and data.shape == (3, codec.row_bytes)
    assert torch.equal(codec.decode(data), rows)
    assert codec.encode(rows[:0]).shape == (0, codec.row_bytes)


def test_compressed_bytes_ratio():
    dense = 3 * 16 * 32
    assert NMChunkCodec(16, 32, 2, 4, torch.bfloat16).row_bytes <= 0.57 * dense * 2
    assert NMChunkCodec(16, 32, 2, 4, torch.float32).row_bytes <= 0.54 * dense * 4


def test_codec_only_when_copies_can_use_it():
    cfg = load_config("tiny", ["model.d_model=32", "model.n_layers=1", "moe.d_ffn=32", "launch.workers=1"])
    assert chunk_codec_for(build_model(cfg), True, 32, 32, torch.float32) is None  # dense model
    plain = sparsify_(build_model(cfg), NMConfig(n=2, m=4))
    assert chunk_codec_for(plain, True, 32, 32, torch.float32) is not None
    assert chunk_codec_for(plain, False, 32, 32, torch.float32) is None  # switched off
    transposable = sparsify_(build_model(cfg), NMConfig(n=2, m=4, transposable=True))
    assert chunk_codec_for(transposable, True, 32, 32, torch.float32) is None
    decaying = sparsify_(build_model(cfg), NMConfig(n=2, m=4, mask_decay_steps=10))
    assert chunk_codec_for(decaying, True, 32, 32, torch.float32) is None  # beta(0) = 1: copies need dense W
