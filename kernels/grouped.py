"""Grouped expert GEMM: many small matmuls, one per expert, on uneven token counts."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("sparsetrain.kernels.grouped")
_logged: set[str] = set()


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype GEMMs on `t` run in: the autocast dtype where autocast is on for its device (bf16 training
    keeps fp32 activations and master weights that autocast casts per GEMM), else `t`'s own."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and t.is_floating_point() else t.dtype


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (indices, offsets) on `device` without a host sync: to a GPU through pinned memory
    with a non-blocking copy (a plain copy of pageable memory waits for the stream); unchanged on CPU."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def grouped_linear_reference(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """y[rows of expert e] = x[rows of e] @ weight[e].T; x [N, in] sorted by expert, weight [E, out, in]."""
    # experts without rows are skipped: in decoding (one token) most of them are empty. unbind, not weight[e]:
    # each select's backward zero-fills a full [E, out, in] grad to add into the buffer (E full-size fills per
    # call); unbind's stacks the expert grads once (same values; CPU, 8 experts 512x256: backward 28 -> 7 ms)
    ws = weight.unbind(0)
    outs = [xe @ ws[e].t() for e, xe in enumerate(torch.split(x, counts, dim=0)) if counts[e]]
    return torch.cat(outs, dim=0) if outs else x.new_zeros(0, weight.shape[1])  # [N, out]


# CPU: one expert's rows are computed in blocks whose [rows, d_ffn] intermediates take about this many bytes, so
# silu and the gating product (forward and backward) read them from cache. A hot expert's whole [1760, 2048] fp32
# intermediates did not fit: one rank's Zipf(1.2) experts took 1.10x the forward + backward time of the same rows
# in blocks of 512 (`benchmarks/expert_blocks.py`; benchmarks/RESULTS.md, "Row blocks for hot experts on CPU").
# GPUs run each expert's GEMMs whole.
CPU_BLOCK_BYTES = 4 << 20


def _row_block(x: torch.Tensor, d_ffn: int) -> int:
    """Rows per block of one expert's SwiGLU on x's device (0 = the expert's rows in one piece)."""
    return max(64, CPU_BLOCK_BYTES // (d_ffn * x.element_size())) if x.device.type == "cpu" else 0


def cpu_row_blocks(x: torch.Tensor, d_ffn: int) -> tuple[torch.Tensor, ...]:
    """Rows of x [N, d] in the blocks a SwiGLU of hidden size d_ffn runs them in (`CPU_BLOCK_BYTES`; one piece
    on GPUs or when they fit): the dense MLP and DeepSpeed's experts compute as sparsetrain's experts do."""
    block = _row_block(x, d_ffn)
    return torch.split(x, block, dim=0) if block and x.shape[0] > block else (x,)


def swiglu_experts_reference(x: torch.Tensor, counts: list[int], w1: torch.Tensor | tuple[torch.Tensor, ...],
                             w2: torch.Tensor | tuple[torch.Tensor, ...],
                             w3: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """SwiGLU experts one expert at a time: x [N, d] sorted by expert, w1/w3 [E, d_ffn, d], w2 [E, d, d_ffn] (or
    each already unbound into E rows: `GroupedExperts.bind` unbinds once for several calls) -> [N, d]. Each
    expert's [rows, d_ffn] intermediates are made and used while in cache (on CPU a hot expert's rows in blocks
    of `CPU_BLOCK_BYTES`); grouping each weight's GEMM over all experts first made silu and the gating product
    (forward and backward) stream [N, d_ffn] tensors through memory: 5x the time per element on CPU
    (benchmarks/RESULTS.md). Same math; silu's vector loop may round a chunk's tail elements an ulp
    differently, and a blocked expert's weight gradient sums its blocks' products."""
    # unbind, not w[e]: see grouped_linear_reference
    w1s, w2s, w3s = (w if isinstance(w, tuple) else w.unbind(0) for w in (w1, w2, w3))
    outs = []
    for e, xe in enumerate(torch.split(x, counts, dim=0)):
        if not counts[e]:
            continue
        for xb in cpu_row_blocks(xe, w1s[e].shape[0]):  # [rows <= block, d]
            outs.append((F.silu(xb @ w1s[e].t()) * (xb @ w3s[e].t())) @ w2s[e].t())  # [rows, d_ffn] -> [rows, d]
    return torch.cat(outs, dim=0) if outs else x.new_zeros(0, w2s[0].shape[0] if w2s else x.shape[1])  # [N, d]


def grouped_mm_input_eligible(x: torch.Tensor) -> tuple[bool, str]:
    """The checks of `grouped_mm_eligible` on the input alone (torch._grouped_mm present, x CUDA bf16 on sm90+):
    whether preparing weights for a grouped GEMM can pay."""
    if not hasattr(torch, "_grouped_mm"):
        return False, "torch._grouped_mm not in this torch"
    if not x.is_cuda:
        return False, "not CUDA tensors"
    if x.dtype != torch.bfloat16:
        return False, f"dtype {x.dtype} (needs bfloat16)"
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False, "GPU older than sm90"
    return True, "CUDA bf16 sm90+"


def grouped_mm_dims_ok(*dims: int) -> bool:
    """torch._grouped_mm's operand strides must be 16-byte aligned: every GEMM dim a multiple of 8 in bf16."""
    return all(d % 8 == 0 for d in dims)


def grouped_mm_eligible(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> tuple[bool, str]:
    """Whether torch._grouped_mm (CUDA, bf16, sm90+, 16-byte aligned strides) can run this call."""
    ok, why = grouped_mm_input_eligible(x)
    if not ok:
        return ok, why
    if not weight.is_cuda:
        return False, "not CUDA tensors"
    if weight.dtype != torch.bfloat16:
        return False, f"dtype {x.dtype}/{weight.dtype} (needs bfloat16)"
    if not grouped_mm_dims_ok(x.shape[-1], weight.shape[1]):
        return False, f"dims in={x.shape[-1]} out={weight.shape[1]} not multiples of 8 (16-byte strides)"
    if len(counts) != weight.shape[0]:
        return False, f"{len(counts)} counts for {weight.shape[0]} experts"
    return True, "CUDA bf16 sm90+"


def grouped_linear_grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """One torch._grouped_mm call: offs are cumulative end rows per expert (int32), built on the host and copied
    without blocking (a plain copy to the GPU waits for the stream: a host sync per GEMM)."""
    offs = host_to_device(torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32), x.device)
    return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)  # [N, in] x [E, in, out] -> [N, out]


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Grouped linear over experts; picks the fastest correct path for the device."""
    if x.is_cuda:
        ok, why = grouped_mm_eligible(x, weight, counts)
        if ok:
            try:
                y = grouped_linear_grouped_mm(x, weight, counts)
                _log_once("grouped_linear: path=grouped_mm (CUDA bf16 sm90+)")
                return y
            except RuntimeError as e:  # unsupported build/shape: fall back, never silently wrong
                _log_once(f"grouped_linear: path=reference (torch._grouped_mm failed: {str(e).splitlines()[0]})")
        else:
            _log_once(f"grouped_linear: path=reference ({why})")
    return grouped_linear_reference(x, weight, counts)
