"""Compressed N:M export and checkpoint helpers (values + packed in-group positions)."""
from __future__ import annotations

import torch

from sparsetrain.kernels.nm_format import NMCompressed, compress_nm, decompress, is_nm_sparse

VALUES, INDICES, META = ".__nm_values", ".__nm_indices", ".__nm_meta"


def to_compressed_state_dict(sd: dict[str, torch.Tensor], n: int = 2, m: int = 4,
                             keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Replace every N:M-sparse floating tensor (>= 2-D; or only `keys`) by values/indices/meta tensors."""
    out: dict[str, torch.Tensor] = {}
    wanted = set(keys) if keys is not None else None
    for k, v in sd.items():
        candidate = isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2 \
            and (wanted is None or k in wanted)
        if candidate and is_nm_sparse(v, n, m):
            c = compress_nm(v, n, m)
            out[k + VALUES] = c.values
            out[k + INDICES] = c.indices
            out[k + META] = torch.tensor([n, m, *c.shape], dtype=torch.int64)
        elif wanted is not None and k in wanted:
            raise ValueError(f"{k}: tensor of shape {tuple(v.shape)} is not {n}:{m} sparse along its last dim")
        else:
            out[k] = v
    return out


def from_compressed_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of to_compressed_state_dict: dense tensors under the original names, exact."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith(META):
            base = k[: -len(META)]
            n, m, *shape = (int(x) for x in v.tolist())
            out[base] = decompress(NMCompressed(sd[base + VALUES], sd[base + INDICES], tuple(shape), n, m))
        elif not (k.endswith((VALUES, INDICES))):
            out[k] = v
    return out


def state_dict_nbytes(sd: dict[str, torch.Tensor]) -> int:
    """Total tensor bytes of a state dict."""
    return sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))
