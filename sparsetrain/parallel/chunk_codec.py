"""Compressed expert chunks for spAG: N:M values + packed positions travel instead of dense rows.

A gathered copy only needs the masked weight for its forward (SR-STE passes the dense gradient straight
through and its decay is applied at the owner; magnitude masking multiplies by the mask), so when every
expert weight is masked by plain magnitude N:M with no mask decay, copies can travel compressed: about
N/M of the value bytes plus log2(M) bits per kept value.
"""
from __future__ import annotations

from typing import Any

import torch

from sparsetrain.kernels.nm_format import NMCompressed, compress_nm
from sparsetrain.model.experts import expert_shapes


class NMChunkCodec:
    """Encodes chunk rows [n, C] (w1 | w2 | w3 flattened) as bytes [n, B] and back, exactly for masked rows."""

    def __init__(self, d_model: int, d_ffn: int, n: int, m: int, dtype: torch.dtype) -> None:
        self.n, self.m, self.dtype = n, m, dtype
        self.shapes = list(expert_shapes(d_model, d_ffn).values())  # w1, w2, w3 as [out, in]
        probe = [compress_nm(torch.zeros(1, o, i, dtype=dtype), n, m) for o, i in self.shapes]
        self.value_bytes = [c.values[0].numel() * c.values.element_size() for c in probe]
        self.index_bytes = [c.indices[0].numel() for c in probe]
        self.row_bytes = sum(self.value_bytes) + sum(self.index_bytes)

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, C] dense rows -> [n, B] uint8 (N largest |w| per group of M along each weight's input dim)."""
        count = rows.shape[0]
        if count == 0:
            return torch.zeros(0, self.row_bytes, dtype=torch.uint8, device=rows.device)
        parts, off = [], 0
        for o, i in self.shapes:
            c = compress_nm(rows[:, off:off + o * i].reshape(count, o, i), self.n, self.m)
            parts += [c.values.reshape(count, -1).view(torch.uint8), c.indices.reshape(count, -1)]
            off += o * i
        return torch.cat(parts, dim=1)

    def decode(self, data: torch.Tensor) -> torch.Tensor:
        """[n, B] uint8 -> [n, C] dense masked rows."""
        count, out, off = data.shape[0], [], 0
        if count == 0:
            return torch.zeros(0, sum(o * i for o, i in self.shapes), dtype=self.dtype, device=data.device)
        for (o, i), vb, ib in zip(self.shapes, self.value_bytes, self.index_bytes):
            values = data[:, off:off + vb].contiguous().view(self.dtype).reshape(count, o, -1)
            idx = data[:, off + vb:off + vb + ib].contiguous().reshape(count, o, -1)
            out.append(NMCompressed(values, idx, (count, o, i), self.n, self.m).decompress().reshape(count, -1))
            off += vb + ib
        return torch.cat(out, dim=1)


def chunk_codec_for(model: Any, enabled: bool, d_model: int, d_ffn: int,
                    dtype: torch.dtype) -> NMChunkCodec | None:
    """A codec when the experts are N:M masked in a way copies can use compressed, else None."""
    sp = getattr(model, "nm_sparsifier", None)
    if not enabled or sp is None or not sp.experts:
        return None
    cfg, st = sp.cfg, sp.state
    if cfg.transposable or cfg.refresh_every != 1 or st.beta != 0:
        return None  # copies would need the dense weight (decayed / cached / transposable masks)
    return NMChunkCodec(d_model, d_ffn, st.n, st.m, dtype)
