"""N:M kernels in the training path: sparse expert and dense linears run through the `nm_linear` paths.

`sparsify_` installs one `NMCompute` per model when `NMConfig.kernel` is not 'reference'. Each sparse GEMM
gets its path from the dispatcher (`kernels.nm_dispatch`: benchmark table, else measured once per shape
bucket on CUDA and cached, else a rule; 'auto' keeps the dense masked GEMM on CPU). The path reads a
prepared form of the weight (compressed values + indices, or 2:4 semi-structured) built from the dense
masked weight once per optimizer step — the cache is stamped with the schedule's step and mask generation
and the source weight's version — never per call. The weight gradient flows into the dense masked weight,
so SR-STE's straight-through gradient and its decay work unchanged. While mask decay scales pruned weights
by beta > 0 the masked weight is not N:M sparse and the dense path runs.

Expert GEMMs launch one kernel per expert (no grouped N:M kernel yet); FSSDP's gathered copies are new
tensors every gather, so they are prepared once per gather (once per forward of the layer).
"""
from __future__ import annotations

import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.kernels import compute_dtype, grouped_linear
from sparsetrain.kernels.nm_dispatch import _resolve
from sparsetrain.kernels.nm_paths import NM_PATHS
from sparsetrain.sparsity.config import KERNELS

if TYPE_CHECKING:
    from sparsetrain.sparsity.sparsify import NMState


class NMCompute:
    """Runs N:M GEMMs through the chosen path on prepared weights cached per weight update."""

    def __init__(self, state: NMState, kernel: str) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"sparsity.kernel={kernel!r}; allowed: {', '.join(KERNELS)}")
        self.state, self.kernel = state, kernel
        self._cache: dict[int, tuple[weakref.ReferenceType[torch.Tensor], tuple, dict]] = {}
        self.prepares = 0  # prepared weight forms built (compressions), since construction
        self.calls: Counter[str] = Counter()  # GEMMs run per path name ('dense' when the kernel is off)

    def active(self, x: torch.Tensor) -> bool:
        """Whether sparse kernels apply now: a kernel chosen, masks exact (beta == 0), CUDA for 'auto'."""
        if self.kernel == "reference" or self.state.beta != 0:
            return False
        return x.is_cuda if self.kernel == "auto" else True

    def _path(self, x: torch.Tensor, w: torch.Tensor) -> str:
        return _resolve(x, w, self.state.n, self.state.m, None if self.kernel == "auto" else self.kernel)

    def prepared(self, source: torch.Tensor, path: str, w: torch.Tensor, expert: int | None = None) -> Any:
        """Path `path`'s form of masked weight `w` (row `expert` of a stack), rebuilt only when `source`
        (the Parameter or gathered stack it was masked from) or the schedule moved on."""
        s = self.state
        stamp = (source._version, s.step, s.generation, s.n, s.m)
        hit = self._cache.get(id(source))
        if hit is None or hit[0]() is not source or hit[1] != stamp:
            if len(self._cache) > 256:  # drop entries of freed tensors (gathered copies of past steps)
                self._cache = {k: v for k, v in self._cache.items() if v[0]() is not None}
            hit = (weakref.ref(source), stamp, {})
            self._cache[id(source)] = hit
        forms = hit[2]
        if (path, expert) not in forms:
            forms[(path, expert)] = NM_PATHS[path].prepare(w.detach() if expert is None else w.detach()[expert],
                                                           s.n, s.m)
            self.prepares += 1
        return forms[(path, expert)]

    def grouped(self, x: torch.Tensor, w: torch.Tensor, counts: list[int], source: torch.Tensor) -> torch.Tensor:
        """Expert GEMM: x [N, in] sorted by expert, masked stack w [E, out, in] -> [N, out]. The dense paths get
        the stack in the GEMMs' dtype (fp32 masters under bf16 autocast: the grouped GEMM takes bf16 only)."""
        if not self.active(x) or w.shape[0] == 0:
            self.calls["dense"] += 1
            return grouped_linear(x, w.to(compute_dtype(w)), counts)
        avg = max(1, sum(counts) // max(1, len(counts)))
        probe = x[:avg] if x.shape[0] >= avg else x.new_zeros(avg, x.shape[-1])  # shape/device for dispatch
        path = self._path(probe, w[0])
        self.calls[path] += 1
        if path == "reference":
            return grouped_linear(x, w.to(compute_dtype(w)), counts)
        run = NM_PATHS[path].run_prepared
        outs = [run(xe, self.prepared(source, path, w, e), w[e]) for e, xe in enumerate(torch.split(x, counts))]
        return torch.cat(outs, dim=0)  # [N, out]

    def linear(self, mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """nn.Linear forward with its N:M-parametrized weight; x [..., in] -> [..., out]."""
        w = mod.weight  # masked by the parametrization, autograd-connected to the original
        if not self.active(x):
            self.calls["dense"] += 1
            return F.linear(x, w, mod.bias)
        x2 = x.reshape(-1, x.shape[-1])  # [..., in] -> [B, in]
        path = self._path(x2, w)
        self.calls[path] += 1
        if path == "reference":
            return F.linear(x, w, mod.bias)
        y = NM_PATHS[path].run_prepared(x2, self.prepared(mod.parametrizations.weight.original, path, w), w)
        if mod.bias is not None:
            y = y + mod.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])  # [B, out] -> [..., out]

    def install_linear(self, mod: nn.Linear) -> None:
        """Route this parametrized Linear's forward through `linear` (instance attribute)."""
        mod.forward = lambda x, mod=mod: self.linear(mod, x)  # type: ignore[method-assign]
