"""CUDA paths: 2:4 semi-structured linear and torch._grouped_mm (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch
from sparsetrain.kernels import grouped_linear, grouped_linear_reference, nm_linear
from sparsetrain.kernels.grouped import grouped_mm_eligible

from sparsetrain.sparsity import nm_mask, transposable_nm_mask

pytestmark = pytest.mark.gpu


def _sm(major: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= major


@pytest.mark.skipif(not _sm(8), reason="needs sm80+")
@pytest.mark.parametrize("transposable", [False, True])
def test_cuda_2_4_matches_reference(transposable: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda", dtype=torch.float16)
    w = (w * (transposable_nm_mask(w, 2, 4) if transposable else nm_mask(w, 2, 4))).requires_grad_(True)
    x = torch.randn(128, 512, device="cuda", dtype=torch.float16, requires_grad=True)
    y = nm_linear(x, w, n=2, m=4, path="cuda_2_4")
    y.float().square().sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    y2 = nm_linear(x2, w2, n=2, m=4, path="reference")
    y2.float().square().sum().backward()
    assert torch.allclose(y, y2, atol=2e-2, rtol=1e-2)
    assert torch.allclose(x.grad, x2.grad, atol=5e-1, rtol=2e-2)
    assert torch.allclose(w.grad, w2.grad, atol=5e-1, rtol=2e-2)


@pytest.mark.skipif(not _sm(9), reason="torch._grouped_mm path needs sm90+")
def test_grouped_mm_matches_reference() -> None:
    counts = [64, 0, 128, 32]
    x = torch.randn(sum(counts), 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert grouped_mm_eligible(x, w, counts)[0]
    y = grouped_linear(x, w, counts)
    ref = grouped_linear_reference(x.detach(), w.detach(), counts)
    assert torch.allclose(y.float(), ref.float(), atol=1e-1, rtol=2e-2)
    y.float().sum().backward()
    assert x.grad is not None and w.grad is not None
