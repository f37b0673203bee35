"""MoE layer: the LocalDispatcher equals a per-token loop; capacity mode drops exactly the over-capacity slots."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.model.moe import LocalDispatcher, MoELayer, capacity_keep, capacity_weights

pytestmark = [pytest.mark.unit]

D, E, FFN = 16, 4, 24


def _layer(top_k: int = 2, capacity_factor: float = 0.0, dtype=torch.float64) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D, E, top_k, FFN, aux_loss_coef=0.01, z_loss_coef=0.001, capacity_factor=capacity_factor)
    layer.router.reset_parameters(0.5)
    layer.experts.reset_parameters(0.2, 0.2)
    return layer.to(dtype)


def _x(b: int = 3, s: int = 8, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, s, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _expert(layer: MoELayer, e: int, v: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return ex.w2[e] @ (F.silu(ex.w1[e] @ v) * (ex.w3[e] @ v))


def _naive(layer: MoELayer, x: torch.Tensor, keep: torch.Tensor | None = None, renorm: bool = False) -> torch.Tensor:
    """For each token: sum_k w_k * expert_{e_k}(x), skipping slots not kept (weights renormalized if asked)."""
    route = layer.last_route
    flat = x.reshape(-1, D)
    t, k = route.expert_ids.shape
    out = torch.zeros_like(flat)
    for i in range(t):
        for j in range(k):
            if keep is not None and not bool(keep[i * k + j]):
                continue
            w = route.weights[i, j]
            if renorm and k > 1:
                w = w / sum(route.weights[i, jj] for jj in range(k) if bool(keep[i * k + jj]))
            out[i] += w * _expert(layer, int(route.expert_ids[i, j]), flat[i])
    return out.view_as(x)


def _priority_keep(ids: torch.Tensor, scores: torch.Tensor, cap: int) -> torch.Tensor:
    """Reference: visit slots by (choice rank, gate score descending, token), keep the first `cap` per expert."""
    t, k = ids.shape
    slots = sorted(range(t * k), key=lambda s: (s % k, -float(scores.flatten()[s]), s // k))
    seen = [0] * E
    keep = torch.zeros(t * k, dtype=torch.bool)
    for s in slots:
        e = int(ids.flatten()[s])
        keep[s] = seen[e] < cap
        seen[e] += 1
    return keep


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dropless_matches_per_token_loop_fp64(top_k):
    layer = _layer(top_k)
    x = _x()
    y = layer(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert layer.last_dropped == 0
    torch.testing.assert_close(y, _naive(layer, x), rtol=1e-12, atol=1e-12)


def test_tokens_per_expert_matches_bincount():
    layer = _layer(2)
    layer(_x())
    r = layer.last_route
    assert torch.equal(r.tokens_per_expert, torch.bincount(r.expert_ids.flatten(), minlength=E))
    assert int(r.tokens_per_expert.sum()) == 3 * 8 * 2


def test_large_capacity_equals_dropless_exactly():
    x = _x()
    ref = _layer(2)(x)
    big = _layer(2, capacity_factor=float(E))  # capacity = T*k: nothing can drop
    y = big(x)
    assert big.last_dropped == 0
    assert torch.equal(y, ref)


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("cf", [0.5, 0.75, 1.0])
def test_small_capacity_drops_by_choice_rank_then_score(cf, renorm):
    layer = _layer(2, capacity_factor=cf)
    layer.dispatcher.capacity_renorm = renorm
    x = _x()
    y = layer(x)
    route = layer.last_route
    ids, scores = route.expert_ids, route.gate_scores()
    t, k = ids.shape
    cap = math.ceil(cf * t * k / E)
    keep = _priority_keep(ids, scores, cap)
    assert torch.equal(capacity_keep(ids, scores, E, cap), keep)
    dropped = int((~keep).sum())
    per_expert = torch.bincount(ids.flatten(), minlength=E).tolist()
    assert dropped == sum(max(0, c - cap) for c in per_expert)
    assert layer.last_dropped == dropped
    if cf < 1.0:
        assert dropped > 0
    for e in range(E):  # an expert keeps a second choice only once every first choice for it is kept
        first = (ids[:, 0] == e)
        if bool((keep.view(t, k)[:, 1] & (ids[:, 1] == e)).any()):
            assert bool(keep.view(t, k)[:, 0][first].all())
    torch.testing.assert_close(y, _naive(layer, x, keep, renorm), rtol=1e-12, atol=1e-12)


def test_capacity_weights_renormalize_survivors():
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]])
    keep = torch.tensor([True, False, True, True, False, False])
    torch.testing.assert_close(capacity_weights(w, keep, True), torch.tensor([[1.0, 0.0], [0.6, 0.4], [0.0, 0.0]]))
    torch.testing.assert_close(capacity_weights(w, keep, False), torch.tensor([[0.7, 0.0], [0.6, 0.4], [0.0, 0.0]]))


def test_fully_dropped_token_outputs_zero():
    layer = _layer(1, capacity_factor=1.0 / 24)  # capacity 1 slot per expert for 24 tokens, k=1
    x = _x()
    y = layer(x).reshape(-1, D)
    keep = capacity_keep(layer.last_route.expert_ids, layer.last_route.gate_scores(), E, 1)
    assert int(keep.sum()) <= E
    assert torch.count_nonzero(y[~keep]) == 0
    assert layer.last_dropped == 24 - int(keep.sum())


def test_gradients_reach_every_expert_that_received_tokens():
    layer = _layer(2, dtype=torch.float32)
    x = _x(dtype=torch.float32).requires_grad_(True)
    y = layer(x)
    (y.pow(2).sum() + layer.last_route.aux_loss + layer.last_route.z_loss).backward()
    counts = layer.last_route.tokens_per_expert
    for name in ("w1", "w2", "w3"):
        g = getattr(layer.experts, name).grad
        assert g is not None
        for e in range(E):
            nz = bool(g[e].abs().sum() > 0)
            assert nz == bool(counts[e] > 0), (name, e, counts.tolist())
    assert layer.router.gate.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_expert_with_no_tokens_gets_zero_grad():
    layer = _layer(1, dtype=torch.float32)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.expert_bias[0] = 10.0
    layer.router.balance = "aux_free"  # the selection bias makes expert 0 win every token; 1..E-1 get none
    x = _x(dtype=torch.float32)
    layer(x).sum().backward()
    assert layer.last_route.tokens_per_expert[0] == 24
    g = layer.experts.w1.grad
    assert g[0].abs().sum() > 0 and torch.count_nonzero(g[1:]) == 0


def test_dispatcher_is_swappable():
    layer = _layer(2)
    x = _x()
    ref = layer(x)
    calls = []

    class Recording(LocalDispatcher):
        def __call__(self, experts, x, route):
            calls.append(x.shape)
            return super().__call__(experts, x, route)

    layer.dispatcher = Recording()
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)
    assert calls == [torch.Size([24, D])]


def test_local_experts_get_tokens_in_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast the router's fp32 activations reach the experts cast once to bf16, as the token
    exchange sends them: the grouped GEMM (CUDA sm90+) takes bf16 only, so fp32 tokens fell back to one
    matmul per expert on one GPU and under dp. Gradients still land in the fp32 master weights."""
    import sparsetrain.model.experts as experts_mod

    seen = []
    real = experts_mod.grouped_mm_input_eligible
    monkeypatch.setattr(experts_mod, "grouped_mm_input_eligible", lambda x: (seen.append(x.dtype), real(x))[1])
    torch.manual_seed(0)
    layer = MoELayer(16, 4, 2, 32)
    layer.experts.reset_parameters(0.02, 0.02)
    x = torch.randn(2, 8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert seen == [torch.bfloat16]
    assert layer.experts.w1.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    seen.clear()
    layer(x)  # autocast off: tokens keep their dtype
    assert seen == [torch.float32]


def test_combine_takes_the_experts_dtype():
    """The grouped GEMM hands back bf16 rows for fp32 tokens under CUDA autocast: the combine scatters them
    in the experts' dtype (it scattered into an fp32 buffer and index_copy refused, on the first GPU step)."""
    torch.manual_seed(0)
    layer = MoELayer(16, 4, 2, 32)
    layer.experts.reset_parameters(0.02, 0.02)
    real = layer.experts.forward
    layer.experts.forward = lambda x, counts: real(x, counts).to(torch.bfloat16)  # as grouped_mm returns them
    x = torch.randn(2, 8, 16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert torch.isfinite(y).all() and x.grad.dtype == torch.float32 and layer.experts.w1.grad is not None
