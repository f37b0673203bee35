"""Execution paths for an N:M linear: pure-torch reference, Triton (compressed), CUDA 2:4 semi-structured.

Every path computes y = x @ W.T (+ bias) for a 2-D x and a weight given either compressed
(`NMCompressed`) or as a dense tensor that is already N:M-masked, and is differentiable in x
and in the weight (the dense tensor, or the compressed values).
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sparsetrain.kernels.grouped import compute_dtype
from sparsetrain.kernels.nm_format import NMCompressed, compress_nm, decompress

NMWeight = torch.Tensor | NMCompressed


def dense_of(w: NMWeight) -> torch.Tensor:
    """Dense (masked) form of either weight representation."""
    return decompress(w) if isinstance(w, NMCompressed) else w


def _nm_of(w: NMWeight, n: int, m: int) -> tuple[int, int]:
    return (w.n, w.m) if isinstance(w, NMCompressed) else (n, m)


# --- reference -----------------------------------------------------------------------------------

def reference_linear(x: torch.Tensor, w: NMWeight, bias: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """Masked dense matmul: decompress (if needed) then F.linear."""
    return F.linear(x, dense_of(w), bias)


def _reference_prepare(w: torch.Tensor, n: int, m: int) -> None:
    return None


def _reference_prepared(x: torch.Tensor, prepared: None, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _reference_eligible(x: torch.Tensor, w: NMWeight, n: int, m: int) -> tuple[bool, str]:
    return True, "always available"


# --- triton --------------------------------------------------------------------------------------

class _TritonNMLinear(torch.autograd.Function):
    """Forward and input-grad by the Triton N:M kernels; weight grad by a dense GEMM."""

    @staticmethod
    def forward(ctx, x, values, dense_w, c: NMCompressed):  # type: ignore[override]
        from sparsetrain.kernels import nm_triton

        ctx.c = c
        ctx.save_for_backward(x, dense_w)
        return nm_triton.nm_matmul_fwd(x, c)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        from sparsetrain.kernels import nm_triton

        x, _dense_w = ctx.saved_tensors
        c = ctx.c
        dy = dy.contiguous()
        dx = nm_triton.nm_matmul_dgrad(dy, c) if ctx.needs_input_grad[0] else None
        d_values = d_dense = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw = dy.t() @ x  # [out, B] @ [B, in] -> [out, in]
            if ctx.needs_input_grad[2]:
                d_dense = dw
            if ctx.needs_input_grad[1]:
                d_values = dw.gather(-1, c.columns())  # [out, in] -> [out, in*n/m]
        return dx, d_values, d_dense, None


def triton_linear(x: torch.Tensor, w: NMWeight, bias: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """Triton N:M GEMM from the compressed form (a dense masked weight is compressed first)."""
    if x.shape[0] == 0:  # empty expert: no launch
        return reference_linear(x, w, bias, n, m)
    dense_w = None
    if isinstance(w, NMCompressed):
        c = w
    else:
        dense_w = w
        # nonzeros per group [out, in/m]: compression would silently drop any beyond n
        kept = (w.detach().reshape(*w.shape[:-1], -1, m) != 0).sum(-1) if w.shape[-1] % m == 0 else None
        if kept is not None and bool((kept > n).any()):
            raise ValueError(f"weight {tuple(w.shape)} is not {n}:{m} sparse (a group of {m} has up to "
                             f"{int(kept.max())} nonzeros): mask it first (nm_mask) or pass an NMCompressed weight")
        c = compress_nm(w.detach(), n, m)
    y = _TritonNMLinear.apply(x.contiguous(), c.values, dense_w, c)
    return y + bias if bias is not None else y


def _triton_prepare(w: torch.Tensor, n: int, m: int) -> NMCompressed:
    """The compressed form the kernels read (exact for an N:M-masked w)."""
    return compress_nm(w.detach(), n, m)


def _triton_prepared(x: torch.Tensor, c: NMCompressed, w: torch.Tensor) -> torch.Tensor:
    """Forward/input-grad from the prepared compressed form; the weight grad flows into the dense masked `w`."""
    if x.shape[0] == 0:
        return F.linear(x, w)
    return _TritonNMLinear.apply(x.contiguous(), c.values, w, c)


def triton_available() -> bool:
    """True if triton is installed (not imported here)."""
    return importlib.util.find_spec("triton") is not None


def _triton_eligible(x: torch.Tensor, w: NMWeight, n: int, m: int) -> tuple[bool, str]:
    if not triton_available():
        return False, "triton is not installed (pip install 'sparsetrain[triton]')"
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "CPU tensor and TRITON_INTERPRET is not 1"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False, f"dtype {x.dtype} not supported (float32/float16/bfloat16)"
    if x.dim() != 2 or len(w.shape) != 2:
        return False, "needs a 2-D input and a 2-D weight"
    return True, "triton available"


# --- CUDA 2:4 semi-structured --------------------------------------------------------------------

def _to_semi_structured(w: torch.Tensor) -> torch.Tensor:
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(w.detach().contiguous())


def _is_2_4(w: torch.Tensor) -> bool:
    g = (w.reshape(*w.shape[:-1], -1, 4) != 0).sum(-1)  # [out, in/4]
    return bool((g <= 2).all())


class _Cuda24Linear(torch.autograd.Function):
    """Forward with a 2:4 semi-structured weight; input-grad sparse when W.T is also 2:4 (transposable). Runs in
    the compute dtype (`compute_dtype`: the autocast dtype under autocast) with autocast off: semi-structured
    tensors support neither fp32 (cuSPARSELt) nor autocast's casts of them; gradients in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, w, dt):  # type: ignore[override]
        xc = x.to(dt)
        ctx.save_for_backward(xc, w)
        ctx.dtypes = (x.dtype, w.dtype, dt)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(xc, _to_semi_structured(w.to(dt)))

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, w = ctx.saved_tensors
        x_dtype, w_dtype, dt = ctx.dtypes
        dy = dy.to(dt)
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                wt = w.t().contiguous().to(dt)  # [in, out]: 2:4 along out only if the mask is transposable
                dx = (F.linear(dy, _to_semi_structured(wt)) if _is_2_4(wt) else dy @ w.to(dt)).to(x_dtype)
            if ctx.needs_input_grad[1]:
                dw = (dy.t() @ x).to(w_dtype)  # [out, B] @ [B, in] -> [out, in]
        return dx, dw, None


class _Cuda24Prepared(torch.autograd.Function):
    """2:4 forward (and input-grad when W.T is 2:4) from semi-structured forms built once per weight update, in
    their dtype (the compute dtype they were prepared in) with autocast off; gradients in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, w, sw, swt):  # type: ignore[override]
        xc = x.to(sw.dtype)
        ctx.save_for_backward(xc, w)
        ctx.swt, ctx.x_dtype = swt, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(xc, sw)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, w = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = (F.linear(dy, ctx.swt) if ctx.swt is not None else dy @ w.to(dy.dtype)).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                dw = (dy.t() @ x).to(w.dtype)  # [out, B] @ [B, in] -> [out, in]
        return dx, dw, None, None


def _cuda24_prepare(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Semi-structured forms of W and (when transposable) W.T in the compute dtype (prepared in the forward,
    under the step's autocast)."""
    w = w.detach().to(compute_dtype(w))
    wt = w.t().contiguous()  # [in, out]: 2:4 along out only if the mask is transposable
    return _to_semi_structured(w), (_to_semi_structured(wt) if _is_2_4(wt) else None)


def _cuda24_prepared(x: torch.Tensor, prepared: tuple, w: torch.Tensor) -> torch.Tensor:
    return _Cuda24Prepared.apply(x, w, *prepared)


def cuda24_linear(x: torch.Tensor, w: NMWeight, bias: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """2:4 via torch.sparse.to_sparse_semi_structured (CUTLASS / cuSPARSELt)."""
    y = _Cuda24Linear.apply(x, dense_of(w), compute_dtype(x))
    return y + bias if bias is not None else y


def _cuda24_eligible(x: torch.Tensor, w: NMWeight, n: int, m: int) -> tuple[bool, str]:
    n, m = _nm_of(w, n, m)
    if (n, m) != (2, 4):
        return False, f"{n}:{m} is not 2:4"
    if not (x.is_cuda and torch.cuda.is_available()):
        return False, "not a CUDA tensor"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return False, "GPU older than sm80"
    dt = compute_dtype(x)
    if dt not in (torch.float16, torch.bfloat16):
        return False, f"dtype {dt} (needs float16/bfloat16, or autocast to one)"
    out_f, in_f = (w.shape if isinstance(w, NMCompressed) else tuple(w.shape))[-2:]
    if out_f % 64 or in_f % 64 or out_f < 128 or in_f < 128:
        return False, f"weight {out_f}x{in_f} not a multiple of 64 (>= 128)"
    return True, "sm80+ GPU, 2:4, fp16/bf16, aligned"


@dataclass(frozen=True)
class NMPath:
    """One way to run an N:M linear: eligibility check (ok, reason) and the function.

    `prepare(w, n, m)` builds what the path reads from a dense N:M-masked weight (compressed values and
    indices, semi-structured forms); training calls it once per weight update and then `run_prepared(x,
    prepared, w)`, whose weight gradient flows into the dense masked `w` (SR-STE and mask decay see it).
    """

    name: str
    eligible: Callable[[torch.Tensor, NMWeight, int, int], tuple[bool, str]]
    run: Callable[[torch.Tensor, NMWeight, torch.Tensor | None, int, int], torch.Tensor]
    prepare: Callable[[torch.Tensor, int, int], object] = _reference_prepare
    run_prepared: Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor] = _reference_prepared


NM_PATHS: dict[str, NMPath] = {
    "reference": NMPath("reference", _reference_eligible, reference_linear, _reference_prepare, _reference_prepared),
    "triton": NMPath("triton", _triton_eligible, triton_linear, _triton_prepare, _triton_prepared),
    "cuda_2_4": NMPath("cuda_2_4", _cuda24_eligible, cuda24_linear, _cuda24_prepare, _cuda24_prepared),
}


def get_path(name: str) -> NMPath:
    """Registry lookup; unknown names raise ValueError listing the known ones."""
    if name not in NM_PATHS:
        raise ValueError(f"unknown N:M path {name!r}; known: {', '.join(NM_PATHS)}")
    return NM_PATHS[name]
