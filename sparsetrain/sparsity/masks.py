"""N:M mask selection: pure functions of a weight tensor."""
from __future__ import annotations

import functools
import itertools

import torch


def _check(w: torch.Tensor, n: int, m: int, dims: int = 1) -> None:
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < n <= m, got {n}:{m}")
    if w.dim() < dims or any(s % m for s in w.shape[-dims:]):
        raise ValueError(f"last {dims} dim(s) of weight shape {tuple(w.shape)} must be divisible by m={m}")


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the n largest |w| in every group of m along the last (input) dim."""
    _check(w, n, m)
    groups = w.detach().abs().reshape(*w.shape[:-1], -1, m)  # [..., in] -> [..., in/m, m]
    keep = groups.topk(n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(w.shape)  # [..., in/m, m] -> [..., in]


@functools.lru_cache(maxsize=16)
def _tile_patterns(n: int, m: int) -> torch.Tensor:
    """All m x m 0/1 tiles with n ones in every row and column, as [P, m*m] float (small m only)."""
    rows = list(itertools.combinations(range(m), n))
    pats = []
    for choice in itertools.product(rows, repeat=m):
        cols = [0] * m
        for r in choice:
            for c in r:
                cols[c] += 1
        if all(c == n for c in cols):
            pats.append([1.0 if c in r else 0.0 for r in choice for c in range(m)])
    return torch.tensor(pats, dtype=torch.float32)  # as the tiles scored against them, whatever the default dtype


def _greedy(a: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Greedy by |w| per tile: accept an entry while its row and column have room. a [T, m, m] -> bool."""
    t = a.shape[0]
    flat = a.reshape(t, m * m)
    order = flat.argsort(dim=-1, descending=True)  # [T, m*m]
    row_cnt = torch.zeros(t, m, dtype=torch.int64, device=a.device)
    col_cnt = torch.zeros_like(row_cnt)
    keep = torch.zeros(t, m * m, dtype=torch.bool, device=a.device)
    ar = torch.arange(t, device=a.device)
    for k in range(m * m):
        idx = order[:, k]
        r, c = idx // m, idx % m
        ok = (row_cnt[ar, r] < n) & (col_cnt[ar, c] < n)
        keep[ar, idx] = ok
        row_cnt[ar, r] += ok.long()
        col_cnt[ar, c] += ok.long()
    return keep.reshape(t, m, m)


def _augment(keep: list[list[bool]], n: int, m: int) -> None:
    """Grow one row and one column of a deficient tile by an alternating path (in place)."""
    r0 = next(r for r in range(m) if sum(keep[r]) < n)
    prev: dict[tuple[str, int], tuple[str, int] | None] = {("r", r0): None}
    queue = [("r", r0)]
    while queue:
        kind, i = queue.pop(0)
        if kind == "c" and sum(keep[r][i] for r in range(m)) < n:
            node: tuple[str, int] | None = (kind, i)
            while node is not None and prev[node] is not None:  # flip the path back to r0
                p = prev[node]
                r, c = (p[1], node[1]) if node[0] == "c" else (node[1], p[1])
                keep[r][c] = not keep[r][c]
                node = p
            return
        nxt = [("c", c) for c in range(m) if not keep[i][c]] if kind == "r" else \
            [("r", r) for r in range(m) if keep[r][i]]
        for nd in nxt:
            if nd not in prev:
                prev[nd] = (kind, i)
                queue.append(nd)
    raise RuntimeError("no augmenting path in an N:M tile (cannot happen for a complete bipartite tile)")


def transposable_nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask with exactly n kept per m along rows and columns of every m x m tile.

    m <= 4: the best of all valid tile patterns; larger m: greedy by |w|, then alternating-path repair.
    A meta tensor (a model built on meta, before its weights exist) gets a meta mask of the same shape: the
    repair reads values, and the real mask is computed from the materialized weight on its first use.
    """
    _check(w, n, m, dims=2)
    if w.is_meta:
        return torch.empty(w.shape, dtype=torch.bool, device=w.device)
    *lead, rows, cols = w.shape
    tiles = w.detach().abs().float().reshape(*lead, rows // m, m, cols // m, m)  # -> [..., R/m, m, C/m, m]
    tiles = tiles.movedim(-3, -2).reshape(-1, m, m)  # -> [T, m, m]
    if m <= 4:
        pats = _tile_patterns(n, m).to(w.device)  # [P, m*m]
        best = (tiles.reshape(-1, m * m) @ pats.t()).argmax(-1)  # [T]
        keep = pats[best].bool().reshape(-1, m, m)
    else:
        keep = _greedy(tiles, n, m)
        bad = ((keep.sum(-1) != n).any(-1) | (keep.sum(-2) != n).any(-1)).nonzero().flatten().tolist()
        for t in bad:  # few tiles: repair each with alternating paths
            k = keep[t].tolist()
            while any(sum(row) < n for row in k):
                _augment(k, n, m)
            keep[t] = torch.tensor(k, dtype=torch.bool)
    keep = keep.reshape(*lead, rows // m, cols // m, m, m).movedim(-2, -3)  # -> [..., R/m, m, C/m, m]
    return keep.reshape(w.shape)


def kept_fraction(w: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of sum |w| that the mask keeps."""
    a = w.detach().abs().float()
    total = a.sum()
    return float((a * mask).sum() / total) if total > 0 else 1.0


def select_mask(w: torch.Tensor, n: int, m: int, transposable: bool = False) -> torch.Tensor:
    """nm_mask or transposable_nm_mask by flag."""
    return transposable_nm_mask(w, n, m) if transposable else nm_mask(w, n, m)
