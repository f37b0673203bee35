"""Compressed N:M model export: one torch.save file with masked weights as values + packed indices.

`export_compressed(model, path)` writes the hard-masked (beta = 0) weights of a `sparsify_`-ed model — the same
tensors as `masked_state_dict(model)` — with every N:M weight stored as `<key>.__nm_values` / `.__nm_indices` /
`.__nm_meta` (see `to_compressed_state_dict`) and everything else dense, under a small header:

    {"header": {"format": "sparsetrain.nm_export", "version": 1, "n": 2, "m": 4, "target": [2, 4], ...},
     "tensors": {name: tensor}}

`load_compressed(model, path)` restores it exactly into a sparsified model of the same architecture (dense
weights go to the parametrized `original`s / expert stacks; the schedule position is restored), or into a plain
unsparsified model (it then simply holds the masked weights). The masked forward of the loaded model is bitwise
equal to the exporting model's. Single-process (unsharded) models only: gather FSDP / expert-parallel shards first.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetrain.sparsity.compressed import from_compressed_state_dict, state_dict_nbytes, to_compressed_state_dict
from sparsetrain.sparsity.sparsify import NMSparsifier, masked_state_dict, nm_sparsifier

FORMAT = "sparsetrain.nm_export"
VERSION = 1
PathLike = str | os.PathLike


@dataclass
class ExportInfo:
    """What export_compressed wrote: file size, tensor bytes, and the same for the dense masked export."""

    path: Path
    file_bytes: int
    tensor_bytes: int
    dense_file_bytes: int
    dense_tensor_bytes: int
    n: int
    m: int
    sparse_keys: int

    @property
    def ratio(self) -> float:
        """Compressed file bytes / dense masked export file bytes."""
        return self.file_bytes / max(self.dense_file_bytes, 1)


def _check_unsharded(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if hasattr(p, "to_local") or hasattr(p, "device_mesh"):
            raise ValueError(f"export_compressed: parameter {name} is sharded (DTensor); export an unsharded model")
    for name, mod in model.named_modules():
        ids = getattr(mod, "expert_ids", None)
        total = getattr(mod, "num_experts", None)
        if ids is not None and total is not None and len(list(ids)) != total:
            raise ValueError(f"export_compressed: {name} holds {len(list(ids))} of {total} experts; "
                             "export an unsharded model")


def _serialized_nbytes(obj: Any) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def compressed_payload(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The object export_compressed saves: {"header": ..., "tensors": compressed masked state dict}."""
    _check_unsharded(model)
    sp = nm_sparsifier(model)
    n, m = sp.state.n, sp.state.m  # current structure stage (the target n:m once decay stages are over)
    sd = _cast(masked_state_dict(model), dtype)
    sparse = sorted(sp.weights())
    tensors = to_compressed_state_dict(sd, n, m, keys=sparse)  # raises if a masked weight is not n:m
    header = {"format": FORMAT, "version": VERSION, "n": n, "m": m, "target": [sp.cfg.n, sp.cfg.m],
              "transposable": sp.cfg.transposable, "step": sp.state.step, "sparse_keys": sparse,
              "dtype": str(dtype).replace("torch.", "") if dtype is not None else None}
    return {"header": header, "tensors": tensors}


def export_compressed(model: nn.Module, path: PathLike, dtype: torch.dtype | None = None,
                      compare_dense: bool = True) -> ExportInfo:
    """Write the model's masked weights (N:M ones compressed) to `path`; optional cast to `dtype` (e.g. bf16).

    With compare_dense, also measures (in memory) the size of the dense masked export, torch.save(masked_state_dict).
    """
    payload = compressed_payload(model, dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    dense = _cast(masked_state_dict(model), dtype) if compare_dense else {}
    h = payload["header"]
    return ExportInfo(path=path, file_bytes=path.stat().st_size, tensor_bytes=state_dict_nbytes(payload["tensors"]),
                      dense_file_bytes=_serialized_nbytes(dense) if compare_dense else 0,
                      dense_tensor_bytes=state_dict_nbytes(dense), n=h["n"], m=h["m"],
                      sparse_keys=len(h["sparse_keys"]))


def read_compressed(path: PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, dense state dict with plain names) from an export file; checks format and version."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    header = obj.get("header") if isinstance(obj, dict) else None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    if header.get("version") != VERSION:
        raise ValueError(f"{path}: {FORMAT} version {header.get('version')} is not supported (this code reads "
                         f"version {VERSION})")
    return header, from_compressed_state_dict(obj["tensors"])


def _to_model_keys(sd: dict[str, torch.Tensor], sp: NMSparsifier) -> dict[str, torch.Tensor]:
    """Plain `<linear>.weight` names -> the parametrized `<linear>.parametrizations.weight.original` names."""
    out = dict(sd)
    for fqn in sp.linears:
        key = f"{fqn}.weight"
        if key in out:
            out[f"{fqn}.parametrizations.weight.original"] = out.pop(key)
    return out


@torch.no_grad()
def load_compressed(model: nn.Module, path: PathLike, strict: bool = True) -> dict[str, Any]:
    """Load an export_compressed file into `model` (sparsified or plain); returns the header.

    Sparsified model: its target n:m must match the file's, the file's sparse weights must be exactly the model's,
    and the sparsifier's schedule step is restored (masks are recomputed from the loaded, already-masked weights,
    so the forward reproduces the exporting model's masked forward bitwise).
    """
    header, sd = read_compressed(path)
    sp = getattr(model, "nm_sparsifier", None)
    if isinstance(sp, NMSparsifier):
        if [sp.cfg.n, sp.cfg.m] != list(header["target"]):
            raise ValueError(f"{path}: exported for target {header['target'][0]}:{header['target'][1]}, model is "
                             f"sparsified for {sp.cfg.n}:{sp.cfg.m}")
        mine = sorted(sp.weights())
        if strict and mine != list(header["sparse_keys"]):
            diff = sorted(set(mine) ^ set(header["sparse_keys"]))
            raise ValueError(f"{path}: sparse weights differ from the model's (e.g. {diff[:4]})")
        sd = _to_model_keys(sd, sp)
    model.load_state_dict(sd, strict=strict)
    if isinstance(sp, NMSparsifier):
        sp.load_state_dict({"step": int(header["step"])})
    return header
