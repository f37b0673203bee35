"""Compressed N:M format: kept values plus packed in-group positions (the index metadata)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

_BIT_WIDTHS = (1, 2, 4, 8)


def index_bits(m: int) -> int:
    """Bits stored per in-group position for group size m (1, 2, 4 or 8)."""
    if not 1 <= m <= 256:
        raise ValueError(f"N:M group size m={m} is out of range; allowed 1..256")
    need = max(1, (m - 1).bit_length())
    return next(b for b in _BIT_WIDTHS if b >= need)


def pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack small ints [..., K] (each < 2**bits) into uint8 [..., ceil(K * bits / 8)]."""
    per = 8 // bits
    k = idx.shape[-1]
    pad = (-k) % per
    if pad:
        idx = torch.nn.functional.pad(idx, (0, pad))
    idx = idx.to(torch.int32).reshape(*idx.shape[:-1], -1, per)  # [..., K] -> [..., K/per, per]
    shifts = torch.arange(per, device=idx.device, dtype=torch.int32) * bits
    return (idx << shifts).sum(-1).to(torch.uint8)  # [..., K/per]


def unpack_indices(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_indices: uint8 [..., B] -> int64 [..., k]."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    vals = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., B, per]
    return vals.reshape(*packed.shape[:-1], -1)[..., :k].to(torch.int64)  # [..., B*per] -> [..., k]


@dataclass
class NMCompressed:
    """N:M weight: values [..., cols*n/m], packed positions (uint8), dense shape, n, m."""

    values: torch.Tensor
    indices: torch.Tensor
    shape: tuple[int, ...]
    n: int
    m: int

    @property
    def bits(self) -> int:
        """Bits per stored in-group position."""
        return index_bits(self.m)

    @property
    def nbytes(self) -> int:
        """Bytes held by values plus index metadata."""
        return self.values.numel() * self.values.element_size() + self.indices.numel() * self.indices.element_size()

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the equivalent dense tensor in the values' dtype."""
        return _numel(self.shape) * self.values.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def positions(self) -> torch.Tensor:
        """Unpacked in-group positions, int64 [..., cols*n/m]."""
        return unpack_indices(self.indices, self.bits, self.values.shape[-1])

    def columns(self) -> torch.Tensor:
        """Dense column of every stored value, int64 [..., cols*n/m]."""
        k = self.values.shape[-1]
        group = torch.arange(k, device=self.values.device) // self.n
        return group * self.m + self.positions()

    def to(self, *args, **kwargs) -> NMCompressed:
        """Move/cast values (indices keep uint8)."""
        v = self.values.to(*args, **kwargs)
        return NMCompressed(v, self.indices.to(v.device), self.shape, self.n, self.m)

    def __getitem__(self, i: int) -> NMCompressed:
        """Slice the leading dim (e.g. one expert of a stacked [E, out, in] weight)."""
        return NMCompressed(self.values[i], self.indices[i], tuple(self.shape[1:]), self.n, self.m)

    def decompress(self) -> torch.Tensor:
        """Dense tensor with zeros at pruned positions."""
        return decompress(self)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _check_nm(shape: tuple[int, ...], n: int, m: int) -> None:
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < n <= m, got {n}:{m}")
    if len(shape) < 1 or shape[-1] % m:
        raise ValueError(f"last dim of shape {tuple(shape)} must be divisible by m={m}")


def compress_nm(w: torch.Tensor, n: int, m: int) -> NMCompressed:
    """Keep the n largest |w| per group of m along the last dim; exact for an already N:M-masked w."""
    _check_nm(tuple(w.shape), n, m)
    groups = w.detach().reshape(*w.shape[:-1], -1, m)  # [..., cols] -> [..., G, m]
    pos = groups.abs().topk(n, dim=-1, sorted=False).indices.sort(dim=-1).values  # [..., G, n]
    values = groups.gather(-1, pos).reshape(*w.shape[:-1], -1)  # [..., G*n]
    packed = pack_indices(pos.reshape(*w.shape[:-1], -1), index_bits(m))
    return NMCompressed(values.contiguous(), packed.contiguous(), tuple(w.shape), n, m)


def decompress(c: NMCompressed) -> torch.Tensor:
    """Exact dense form of a compressed N:M tensor."""
    out = c.values.new_zeros(*c.shape[:-1], c.shape[-1] // c.m, c.m)  # [..., G, m]
    pos = c.positions().reshape(*c.shape[:-1], -1, c.n)  # [..., G*n] -> [..., G, n]
    out.scatter_(-1, pos, c.values.reshape(*c.shape[:-1], -1, c.n))
    return out.reshape(c.shape)  # [..., G, m] -> [..., cols]


def is_nm_sparse(w: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of m along the last dim has at most n non-zeros."""
    if w.dim() < 1 or w.shape[-1] % m:
        return False
    nnz = (w.reshape(*w.shape[:-1], -1, m) != 0).sum(-1)  # [..., G]
    return bool((nnz <= n).all())
