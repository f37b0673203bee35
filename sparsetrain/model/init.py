"""Meta-device construction and sharding-independent initialisation.

The model is built on the `meta` device (no memory); parallel passes decide what each rank holds
(expert rows, FSDP2 shards); `materialize_` then allocates only that and fills it. Every value depends
only on (seed, parameter name, global row) -- each row of a dense matrix and each expert of a stacked
expert weight draws from its own generator -- so a rank holding rows 512-1023 of a matrix or experts
{3, 17} gets exactly the numbers a single process holding everything gets, and every parity test
compares like with like.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from sparsetrain.model.experts import GroupedExperts, expert_ids_of

__all__ = ["init_weights_", "materialize_", "param_init_std", "row_seed"]

_OUT_PROJ = ("attn.wo.weight", "ffn.w2.weight")  # residual-branch outputs: GPT-2 scaled init


def row_seed(seed: int, name: str, row: int) -> int:
    """A 63-bit seed for one row of one parameter."""
    digest = hashlib.blake2b(f"{seed}/{name}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def logical_name(name: str) -> str:
    """`x.parametrizations.weight.original` -> `x.weight` (N:M parametrizations keep the init)."""
    return name.replace(".parametrizations.", ".").replace(".original", "")


def param_init_std(name: str, std: float, n_layers: int) -> float:
    """N(0, std) for matrices; residual outputs (attention wo, FFN and expert w2) std / sqrt(2 n_layers)."""
    last = name.rsplit(".", 1)[-1]
    is_out = last == "w2" or name.endswith(_OUT_PROJ)
    return std / math.sqrt(2 * n_layers) if is_out else std


def _global_row_offset(p: torch.Tensor) -> int:
    """First global row (dim 0) of this rank's shard: 0 for plain tensors, the shard offset for DTensors."""
    if not hasattr(p, "to_local"):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0])


def _fill_rows(local: torch.Tensor, seed: int, name: str, rows: list[int], std: float) -> None:
    """local[i] ~ N(0, std) from the generator of global row rows[i]; drawn on CPU, copied once."""
    if local.numel() == 0:
        return
    buf = torch.empty(local.shape, dtype=torch.float32)
    gen = torch.Generator()
    for i, r in enumerate(rows):
        gen.manual_seed(row_seed(seed, name, r))
        buf[i].normal_(0.0, std, generator=gen)
    with torch.no_grad():
        local.copy_(buf)


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int, std: float, n_layers: int) -> None:
    """Initialise every parameter this rank holds; values depend on (seed, name, global row) only."""
    stacked = {f"{m}.{w}" if m else w: mod for m, mod in model.named_modules() if isinstance(mod, GroupedExperts)
               for w in ("w1", "w2", "w3")}
    for name, p in model.named_parameters():
        logical = logical_name(name)
        local = p.to_local() if hasattr(p, "to_local") else p
        if p.dim() < 2:  # RMSNorm gains
            local.fill_(1.0)
            continue
        sd = param_init_std(logical, std, n_layers)
        if name in stacked or logical in stacked:  # [E_here, out, in]: one generator per global expert id
            mod = stacked.get(name) or stacked[logical]
            ids = expert_ids_of(mod)  # the experts this module holds
            off = _global_row_offset(p)  # dp under FSDP2 shards the stack on dim 0: this rank's rows start here
            _fill_rows(local, seed, logical, ids[off:off + local.shape[0]], sd)
        else:  # [rows_here, in]: one generator per global row
            off = _global_row_offset(p)
            _fill_rows(local, seed, logical, list(range(off, off + local.shape[0])), sd)


def materialize_(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """Allocate what this rank holds of a meta-built model on `device` (Parameter objects kept, so the
    strategies' parameter sets stay valid), initialise parameters and buffers, refuse leftovers."""
    device = torch.device(device)
    if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        return model  # already real (e.g. a peer adapter materialized it to copy weights into its own layers)
    prev = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(prev)
    cfg = model.cfg  # type: ignore[attr-defined]
    init_weights_(model, seed, cfg.model.init_std, cfg.model.n_layers)
    for mod in model.modules():
        if mod is not model and hasattr(mod, "init_buffers"):
            mod.init_buffers()
    if hasattr(model, "init_buffers"):
        model.init_buffers()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"materialize_: still on the meta device after init: {left[:5]}")
    return model
