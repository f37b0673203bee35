"""N:M masks: exact counts per group (and per column group when transposable), magnitude kept."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrain.sparsity import kept_fraction, nm_mask, select_mask, transposable_nm_mask

pytestmark = pytest.mark.unit
NM = st.sampled_from([(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (7, 8)])


@settings(max_examples=40, deadline=None)
@given(nm=NM, lead=st.integers(0, 2), rows=st.integers(1, 6), groups=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_nm_mask_exactly_n_per_group(nm: tuple[int, int], lead: int, rows: int, groups: int, seed: int) -> None:
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    shape = (2,) * lead + (rows, groups * m)
    w = torch.randn(shape, generator=g)
    mask = nm_mask(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    per_group = mask.reshape(*shape[:-1], groups, m).sum(-1)
    assert bool((per_group == n).all())
    # kept entries are the n largest |w| of each group
    a = w.abs().reshape(*shape[:-1], groups, m)
    km = mask.reshape(*shape[:-1], groups, m)
    smallest_kept = torch.where(km, a, torch.inf).amin(-1)
    largest_pruned = torch.where(km, -torch.inf, a).amax(-1)
    assert bool((smallest_kept >= largest_pruned).all())


@settings(max_examples=30, deadline=None)
@given(nm=st.sampled_from([(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)]), lead=st.integers(0, 1), rt=st.integers(1, 3),
       ct=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_transposable_mask_n_per_row_and_column(nm: tuple[int, int], lead: int, rt: int, ct: int, seed: int) -> None:
    n, m = nm
    w = torch.randn((3,) * lead + (rt * m, ct * m), generator=torch.Generator().manual_seed(seed))
    mask = transposable_nm_mask(w, n, m)
    assert mask.shape == w.shape
    assert bool((mask.reshape(*w.shape[:-1], ct, m).sum(-1) == n).all())  # along rows (input dim)
    mt = mask.transpose(-1, -2)
    assert bool((mt.reshape(*mt.shape[:-1], rt, m).sum(-1) == n).all())  # along columns (output dim)
    assert kept_fraction(w, mask) <= kept_fraction(w, nm_mask(w, n, m)) + 1e-6


def test_transposable_keeps_most_magnitude_on_tile() -> None:
    w = torch.tensor([[9.0, 8.0, 0.1, 0.2], [7.0, 0.3, 6.0, 0.4], [0.5, 5.0, 0.6, 4.0], [0.7, 0.8, 3.0, 2.0]])
    mask = transposable_nm_mask(w, 2, 4)
    expect = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expect)


def test_select_mask_and_errors() -> None:
    w = torch.randn(8, 8)
    assert torch.equal(select_mask(w, 2, 4), nm_mask(w, 2, 4))
    assert torch.equal(select_mask(w, 2, 4, transposable=True), transposable_nm_mask(w, 2, 4))
    with pytest.raises(ValueError, match="divisible by m=4"):
        nm_mask(torch.randn(4, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < n <= m"):
        nm_mask(w, 5, 4)
    with pytest.raises(ValueError, match="divisible by m=4"):
        transposable_nm_mask(torch.randn(6, 8), 2, 4)
