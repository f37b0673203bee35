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


@pytest.mark.skipif(not _sm(9), reason="torch._grouped_mm path needs sm90+")
def test_experts_with_fp32_masters_take_grouped_mm_under_autocast(monkeypatch) -> None:
    """train.precision=bf16 keeps fp32 master expert weights: the expert GEMMs must still run as grouped GEMMs
    (their stacks cast to bf16 once per layer), not fall back to one matmul per expert."""
    from sparsetrain.kernels import grouped as grouped_mod

    from sparsetrain.model.experts import GroupedExperts

    calls = []
    real = grouped_mod.grouped_linear_grouped_mm
    monkeypatch.setattr(grouped_mod, "grouped_linear_grouped_mm", lambda *a: calls.append(1) or real(*a))
    experts = GroupedExperts(4, 256, 512).cuda()
    experts.reset_parameters(0.02, 0.02)
    counts = [64, 0, 128, 32]
    x = torch.randn(sum(counts), 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = experts(x, counts)
    y.float().sum().backward()
    assert len(calls) == 3 and experts.w1.grad.dtype == torch.float32
    ref = swiglu_ref(x.detach().float(), counts, experts)
    assert torch.allclose(y.float(), ref, atol=5e-2, rtol=5e-2)


def swiglu_ref(x: torch.Tensor, counts: list[int], experts) -> torch.Tensor:
    from sparsetrain.kernels import swiglu_experts_reference

    return swiglu_experts_reference(x, counts, experts.w1.detach(), experts.w2.detach(), experts.w3.detach())


@pytest.mark.skipif(not _sm(9), reason="torch._grouped_mm path needs sm90+")
def test_local_moe_layer_takes_grouped_mm_with_fp32_tokens_under_autocast(monkeypatch) -> None:
    """One GPU / dp: the router hands fp32 activations to the experts under bf16 autocast; they are cast once
    and the grouped GEMM runs (it was skipped: fp32 input), and grads reach the fp32 masters."""
    from sparsetrain.kernels import grouped as grouped_mod

    from sparsetrain.model.moe import MoELayer

    calls = []
    real = grouped_mod.grouped_linear_grouped_mm
    monkeypatch.setattr(grouped_mod, "grouped_linear_grouped_mm", lambda *a: calls.append(1) or real(*a))
    layer = MoELayer(256, 8, 2, 512).cuda()
    layer.experts.reset_parameters(0.02, 0.02)
    x = torch.randn(2, 64, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
        assert layer.experts.uses_grouped_gemm(x)  # fp32 tokens qualify under autocast (cast once to bf16)
    y.float().sum().backward()
    assert len(calls) == 3 and layer.experts.w1.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert not layer.experts.uses_grouped_gemm(x)  # outside autocast fp32 tokens take the per-expert matmuls


@pytest.mark.skipif(not _sm(8), reason="needs sm80+")
def test_cuda_2_4_with_fp32_masters_under_bf16_autocast() -> None:
    """train.precision=bf16 + sparsity.kernel=cuda_2_4: fp32 master weights, fp32 or bf16 activations; the 2:4
    GEMM runs in bf16 with autocast off inside, gradients come back in the inputs' dtypes."""
    from sparsetrain.kernels.nm_paths import NM_PATHS

    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda")
    w = (w * transposable_nm_mask(w, 2, 4)).requires_grad_(True)  # fp32 master
    path = NM_PATHS["cuda_2_4"]
    for x_dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(128, 512, device="cuda", dtype=x_dtype, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert path.eligible(x, w, 2, 4)[0], path.eligible(x, w, 2, 4)
            y = path.run_prepared(x, path.prepare(w, 2, 4), w)
            y2 = nm_linear(x, w, n=2, m=4, path="cuda_2_4")
        assert y.dtype == y2.dtype == torch.bfloat16
        (y.float().square().sum() + y2.float().square().sum()).backward()
        ref = torch.nn.functional.linear(x.detach().float(), w.detach())
        assert torch.allclose(y.float(), ref, atol=0.5, rtol=5e-2)
        assert x.grad.dtype == x_dtype and w.grad.dtype == torch.float32
        w.grad = None
