"""Triton N:M GEMMs that read the compressed form (values + packed positions).

Imported lazily by the dispatcher only; importing this module imports triton.
Each program rebuilds a dense [BLOCK_O, BLOCK_C] weight tile in registers from the
compressed values, so the weight traffic from memory is the compressed bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from sparsetrain.kernels.nm_format import NMCompressed


@triton.jit
def _weight_tile(v_ptr, p_ptr, offs_o, offs_c, OUT, IN, stride_v, stride_p,
                 N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                 BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    """Dense W[offs_o, offs_c] tile [BLOCK_O, BLOCK_C] (fp32) rebuilt from the compressed form."""
    group = offs_c // M
    pos_in_group = offs_c % M
    valid = (offs_o[:, None] < OUT) & (offs_c[None, :] < IN)
    acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    for s in tl.static_range(N):
        q = group * N + s  # compressed column holding the s-th kept value of this group
        v = tl.load(v_ptr + offs_o[:, None] * stride_v + q[None, :], mask=valid, other=0.0)
        byte = tl.load(p_ptr + offs_o[:, None] * stride_p + (q // PER)[None, :], mask=valid, other=0)
        pos = (byte.to(tl.int32) >> ((q % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
        acc += tl.where(pos == pos_in_group[None, :], v.to(tl.float32), 0.0)
    return acc


@triton.jit
def _nm_fwd_kernel(x_ptr, v_ptr, p_ptr, y_ptr, B, OUT, IN,
                   stride_xb, stride_xc, stride_v, stride_p, stride_yb, stride_yo,
                   N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    """y[b, o] = sum_c x[b, c] * W[o, c]."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    for c0 in range(0, IN, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_c[None, :] * stride_xc,
                    mask=(offs_b[:, None] < B) & (offs_c[None, :] < IN), other=0.0)
        w = _weight_tile(v_ptr, p_ptr, offs_o, offs_c, OUT, IN, stride_v, stride_p,
                         N, M, BITS, PER, BLOCK_O, BLOCK_C)
        acc += tl.dot(x, tl.trans(w).to(x.dtype))
    tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_o[None, :] * stride_yo, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_b[:, None] < B) & (offs_o[None, :] < OUT))


@triton.jit
def _nm_dgrad_kernel(dy_ptr, v_ptr, p_ptr, dx_ptr, B, OUT, IN,
                     stride_db, stride_do, stride_v, stride_p, stride_xb, stride_xc,
                     N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx[b, c] = sum_o dy[b, o] * W[o, c]."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for o0 in range(0, OUT, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        dy = tl.load(dy_ptr + offs_b[:, None] * stride_db + offs_o[None, :] * stride_do,
                     mask=(offs_b[:, None] < B) & (offs_o[None, :] < OUT), other=0.0)
        w = _weight_tile(v_ptr, p_ptr, offs_o, offs_c, OUT, IN, stride_v, stride_p,
                         N, M, BITS, PER, BLOCK_O, BLOCK_C)
        acc += tl.dot(dy, w.to(dy.dtype))
    tl.store(dx_ptr + offs_b[:, None] * stride_xb + offs_c[None, :] * stride_xc, acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_b[:, None] < B) & (offs_c[None, :] < IN))


def _blocks(x: torch.Tensor) -> tuple[int, int, int]:
    """Tile sizes: 16 (tl.dot minimum) under the CPU interpreter, larger on GPU."""
    return (16, 16, 16) if not x.is_cuda else (64, 64, 64)


def _meta(w: NMCompressed) -> dict:
    return {"N": w.n, "M": w.m, "BITS": w.bits, "PER": 8 // w.bits}


def _interpreted_half(t: torch.Tensor) -> bool:
    """A 16-bit float on the CPU interpreter (TRITON_INTERPRET=1), whose tl.dot on bf16/fp16 gives wrong sums."""
    return not t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def nm_matmul_fwd(x: torch.Tensor, w: NMCompressed) -> torch.Tensor:
    """x [B, in] @ W.T with W compressed [out, in] -> [B, out]. Under the interpreter a bf16/fp16 x runs in fp32
    and the result is cast back (as on a GPU: 16-bit products summed in fp32, rounded once)."""
    if _interpreted_half(x):
        return nm_matmul_fwd(x.float(), w).to(x.dtype)
    out_f, in_f = w.shape
    vals, idx = w.values.contiguous(), w.indices.contiguous()
    y = torch.empty(x.shape[0], out_f, device=x.device, dtype=x.dtype)
    bb, bo, bc = _blocks(x)
    grid = (triton.cdiv(x.shape[0], bb), triton.cdiv(out_f, bo))
    _nm_fwd_kernel[grid](x, vals, idx, y, x.shape[0], out_f, in_f, x.stride(0), x.stride(1),
                         vals.stride(0), idx.stride(0), y.stride(0), y.stride(1), **_meta(w),
                         BLOCK_B=bb, BLOCK_O=bo, BLOCK_C=bc)
    return y


def nm_matmul_dgrad(dy: torch.Tensor, w: NMCompressed) -> torch.Tensor:
    """dy [B, out] @ W with W compressed [out, in] -> [B, in] (fp32 under the interpreter, as nm_matmul_fwd)."""
    if _interpreted_half(dy):
        return nm_matmul_dgrad(dy.float(), w).to(dy.dtype)
    out_f, in_f = w.shape
    vals, idx = w.values.contiguous(), w.indices.contiguous()
    dx = torch.empty(dy.shape[0], in_f, device=dy.device, dtype=dy.dtype)
    bb, bo, bc = _blocks(dy)
    grid = (triton.cdiv(dy.shape[0], bb), triton.cdiv(in_f, bc))
    _nm_dgrad_kernel[grid](dy, vals, idx, dx, dy.shape[0], out_f, in_f, dy.stride(0), dy.stride(1),
                           vals.stride(0), idx.stride(0), dx.stride(0), dx.stride(1), **_meta(w),
                           BLOCK_B=bb, BLOCK_O=bo, BLOCK_C=bc)
    return dx
