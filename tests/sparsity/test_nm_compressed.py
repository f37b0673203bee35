"""Compressed N:M form: exact round-trip, packed index metadata, byte ratio, state-dict helpers."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsetrain.kernels.nm_format import index_bits, pack_indices, unpack_indices

from sparsetrain.sparsity import (
    compress_nm,
    decompress,
    from_compressed_state_dict,
    nm_mask,
    state_dict_nbytes,
    to_compressed_state_dict,
    transposable_nm_mask,
)

pytestmark = pytest.mark.unit


@settings(max_examples=40, deadline=None)
@given(nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 8), (2, 8), (5, 16)]), rows=st.integers(1, 5),
       groups=st.integers(1, 7), lead=st.integers(0, 1), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 10**6))
def test_round_trip_exact(nm: tuple[int, int], rows: int, groups: int, lead: int, dtype: torch.dtype,
                          seed: int) -> None:
    n, m = nm
    w = torch.randn((2,) * lead + (rows, groups * m), generator=torch.Generator().manual_seed(seed)).to(dtype)
    wm = w * nm_mask(w, n, m)
    c = compress_nm(wm, n, m)
    assert c.values.shape == (*w.shape[:-1], groups * n) and c.indices.dtype == torch.uint8
    assert torch.equal(decompress(c), wm)
    assert torch.equal(c.positions().max() < m, torch.tensor(True))


def test_round_trip_with_zeros_and_transposable() -> None:
    w = torch.randn(8, 16)
    w[0, :4] = 0  # a group with fewer than n non-zeros
    wm = w * transposable_nm_mask(w, 2, 4)
    assert torch.equal(compress_nm(wm, 2, 4).decompress(), wm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_2_4_bytes_at_most_57_percent(dtype: torch.dtype) -> None:
    w = torch.randn(64, 128).to(dtype)
    c = compress_nm(w, 2, 4)
    assert c.dense_nbytes == w.numel() * w.element_size()
    assert c.nbytes / c.dense_nbytes == pytest.approx(0.5625)
    assert c.nbytes <= 0.57 * c.dense_nbytes


@pytest.mark.parametrize("m", [2, 3, 4, 5, 8, 16, 200])
def test_pack_unpack(m: int) -> None:
    bits = index_bits(m)
    idx = torch.randint(0, m, (3, 13))
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-13 * bits // 8)
    assert torch.equal(unpack_indices(packed, bits, 13), idx)


def test_compressed_state_dict_round_trip() -> None:
    w = torch.randn(16, 32)
    sd = {"a.weight": w * nm_mask(w, 2, 4), "dense.weight": torch.randn(4, 8), "bias": torch.randn(8),
          "steps": torch.tensor(3)}
    csd = to_compressed_state_dict(sd, 2, 4)
    assert "a.weight" not in csd and "dense.weight" in csd and "a.weight.__nm_values" in csd
    back = from_compressed_state_dict(csd)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert state_dict_nbytes(csd) < state_dict_nbytes(sd)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        to_compressed_state_dict(sd, 2, 4, keys=["dense.weight"])


def test_compress_errors() -> None:
    with pytest.raises(ValueError, match="divisible by m=4"):
        compress_nm(torch.randn(2, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < n <= m"):
        compress_nm(torch.randn(2, 8), 0, 4)
