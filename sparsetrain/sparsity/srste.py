"""Masked-weight autograd: SR-STE (sparse-refined straight-through) and plain magnitude masking."""
from __future__ import annotations

import torch


class SRSTE(torch.autograd.Function):
    """Forward W*(mask + beta*(1-mask)); backward grad_W = grad + lambda_w * (1 - mask) * W."""

    @staticmethod
    def forward(ctx, w, mask, beta: float, lambda_w: float):  # type: ignore[override]
        mask = mask.to(w.dtype)
        ctx.save_for_backward(w, mask)
        ctx.lambda_w = lambda_w
        return w * (mask + beta * (1 - mask)) if beta else w * mask

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w, mask = ctx.saved_tensors
        return grad + ctx.lambda_w * (1 - mask) * w, None, None, None


def sr_ste(w: torch.Tensor, mask: torch.Tensor, beta: float = 0.0, lambda_w: float = 2e-4) -> torch.Tensor:
    """SR-STE masked weight (dense straight-through gradient plus decay on pruned weights)."""
    return SRSTE.apply(w, mask, float(beta), float(lambda_w))


def masked_weight(w: torch.Tensor, mask: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """Magnitude method: W*(mask + beta*(1-mask)) with ordinary autograd (pruned grads scaled by beta)."""
    m = mask.to(w.dtype)
    return w * (m + beta * (1 - m)) if beta else w * m
