"""Grouped SwiGLU experts holding stacked 3-D weights; a functional form for gathered copies."""
from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.kernels import (
    compute_dtype,
    grouped_linear,
    grouped_mm_dims_ok,
    grouped_mm_eligible,
    grouped_mm_input_eligible,
    swiglu_experts_reference,
)

WeightTransform = Callable[[str, torch.Tensor, list[int]], torch.Tensor]
# (x [N, in] sorted by expert, weight [E, out, in] to compute with, counts, the stack it came from) -> [N, out]
GroupedLinear = Callable[[torch.Tensor, torch.Tensor, list[int], torch.Tensor], torch.Tensor]
EXPERT_WEIGHTS = ("w1", "w2", "w3")


def expert_shapes(d_model: int, d_ffn: int) -> dict[str, tuple[int, int]]:
    """Per-expert weight shapes [out, in] in chunk order."""
    return {"w1": (d_ffn, d_model), "w2": (d_model, d_ffn), "w3": (d_ffn, d_model)}


def swiglu_experts(x: torch.Tensor, counts: list[int], w1: torch.Tensor | None = None, w2: torch.Tensor | None = None,
                   w3: torch.Tensor | None = None,
                   rows: Callable[[], tuple[tuple[torch.Tensor, ...], ...]] | None = None,
                   stacks: Callable[[], tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
    """x [N, d] sorted by expert, counts per expert (len E_here) -> [N, d]: one grouped GEMM per weight where
    torch._grouped_mm runs (CUDA bf16 sm90+), else each expert's whole SwiGLU in turn (intermediates in cache).
    `rows`: the per-expert path's weights already unbound, (w1, w2, w3) each as E rows (`GroupedExperts.bind`);
    `stacks`: builds (w1, w2, w3) stacked in the compute dtype for the grouped GEMM (fp32 master weights cast to
    the autocast dtype once, as autocast casts them for every GEMM; weights from two sources joined), instead
    of the given w1/w2/w3. Under autocast x is cast to its dtype once here, as autocast would for each GEMM
    (dispatchers hand fp32 activations to the experts under bf16 autocast: the grouped GEMM takes bf16 only)."""
    x = x.to(compute_dtype(x))
    if grouped_mm_input_eligible(x)[0]:
        ws = stacks() if stacks is not None else (w1, w2, w3)
        if ws[0] is not None and grouped_mm_eligible(x, ws[0], counts)[0]:
            h = F.silu(grouped_linear(x, ws[0], counts)) * grouped_linear(x, ws[2], counts)  # [N, d_ffn]
            return grouped_linear(h, ws[1], counts)  # [N, d]
    if rows is None and w1 is None:
        raise ValueError("swiglu_experts: pass the weights (w1, w2, w3) or their rows")
    return swiglu_experts_reference(x, counts, *(rows() if rows is not None else (w1, w2, w3)))


def swiglu_experts_with(linear: GroupedLinear, x: torch.Tensor, counts: list[int], ws: dict[str, torch.Tensor],
                        sources: dict[str, torch.Tensor]) -> torch.Tensor:
    """swiglu_experts through a custom grouped linear (N:M kernels) that also sees each weight's source."""
    x = x.to(compute_dtype(x))  # [N, d] in the GEMMs' dtype (see swiglu_experts)
    h = F.silu(linear(x, ws["w1"], counts, sources["w1"])) * linear(x, ws["w3"], counts, sources["w3"])  # [N, d_ffn]
    return linear(h, ws["w2"], counts, sources["w2"])  # [N, d]


def expert_ids_of(mod: nn.Module) -> list[int]:
    """Global ids of the experts a GroupedExperts holds, in stack order (EP/FSSDP set `expert_ids`; else all)."""
    return list(getattr(mod, "expert_ids", range(mod.num_experts)))


class GroupedExperts(nn.Module):
    """E experts as stacked weights w1/w3 [E, d_ffn, d] and w2 [E, d, d_ffn]."""

    def __init__(self, num_experts: int, d_model: int, d_ffn: int) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ffn = num_experts, d_model, d_ffn
        for name, (o, i) in expert_shapes(d_model, d_ffn).items():
            self.register_parameter(name, nn.Parameter(torch.empty(num_experts, o, i)))
        self.weight_transform: WeightTransform | None = None  # e.g. N:M masking (sparsity)
        self.grouped_linear_fn: GroupedLinear | None = None  # e.g. N:M kernels (sparsity.kernel)

    def weights(self, ids: list[int] | None = None,
                stacked: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The weights to compute with (own params unless given), after the weight transform."""
        ws = stacked if stacked is not None else {n: getattr(self, n) for n in EXPERT_WEIGHTS}
        ids = ids if ids is not None else list(range(self.num_experts))
        if self.weight_transform is not None:
            ws = {n: self.weight_transform(n, w, ids) for n, w in ws.items()}
        return ws

    def forward(self, x: torch.Tensor, counts: list[int], ids: list[int] | None = None,
                stacked: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x [N, d] sorted by expert (counts per expert in `ids` order) -> [N, d]."""
        return self.bind(ids, stacked)(x, counts)

    def bind(self, ids: list[int] | None = None, stacked: dict[str, torch.Tensor] | None = None,
             copies: tuple[list[int], dict[str, torch.Tensor]] | None = None,
             ) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
        """The experts as a function of (x [N, d] sorted by expert, counts) -> [N, d], its weights prepared once:
        the weight transform applied, and on the per-expert path unbound into rows. A layer calling it several
        times (its own slots while the exchange travels, then the received ones) builds one autograd view per
        expert and weight, so backward stacks each weight's gradient once instead of once per call and adds the
        calls' gradients per expert, not as full [E, out, in] tensors.

        `copies`: (copy ids, their stacked weights) of experts held as gathered copies (FSSDP), computed after
        `ids`: the function's experts are `ids` then the copy ids. The own experts compute on their own weights
        (their gradients land in them directly); the two sources are joined into one stack only where a grouped
        GEMM or an N:M kernel needs one."""
        ws = self.weights(ids, stacked)
        parts = [ws] + ([self.weights(*copies)] if copies is not None and copies[0] else [])
        if self.grouped_linear_fn is not None:
            sources = [stacked if stacked is not None else {n: getattr(self, n) for n in EXPERT_WEIGHTS}]
            sources += [copies[1]] if len(parts) > 1 else []
            return partial(swiglu_experts_with, self.grouped_linear_fn, ws=_joined(parts), sources=_joined(sources))
        # unbound on the first per-expert call: E_own (+ E_copies) rows per weight
        rows = cache(lambda: tuple(sum((p[n].unbind(0) for p in parts), ()) for n in EXPERT_WEIGHTS))
        stacks = cache(lambda: compute_stacks(parts))  # built only for a grouped GEMM, once per bind
        return partial(swiglu_experts, rows=rows, stacks=stacks)

    def uses_grouped_gemm(self, x: torch.Tensor) -> bool:
        """Whether a call on input `x` runs torch._grouped_mm (CUDA bf16 sm90+, dims multiples of 8, no N:M
        kernels). It computes on stacks joined from own and copied weights (new storage, saved for backward), so
        no view of a gathered copies buffer is saved: nothing in backward reads a re-gathered one."""
        if self.grouped_linear_fn is not None or not grouped_mm_dims_ok(self.d_model, self.d_ffn):
            return False
        dt = compute_dtype(x)
        return grouped_mm_input_eligible(x if x.dtype == dt else x[:0].to(dt))[0]

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=out_std)


def _joined(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks from several sources joined along the expert dim, in the last source's dtype (a gathered copy's
    compute dtype; own fp32 master weights are cast to it, as autocast would for each GEMM)."""
    if len(parts) == 1:
        return parts[0]
    return {n: torch.cat([p[n].to(parts[-1][n].dtype) for p in parts]) for n in parts[0]}  # [E_a + E_b, out, in]


def compute_stacks(parts: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """(w1, w2, w3) stacked for one grouped GEMM: the sources joined, then cast to the autocast dtype when
    autocast is on for their device (fp32 master weights under train.precision=bf16; autograd casts the
    gradient back, so it lands in the fp32 Parameters)."""
    ws = _joined(parts)
    return tuple(ws[n].to(compute_dtype(ws[n])) for n in EXPERT_WEIGHTS)
