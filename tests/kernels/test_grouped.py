"""Grouped expert compute: the per-expert SwiGLU (CPU, and CUDA without torch._grouped_mm) equals the
grouped-GEMM formulation, in fp32 and under bf16 autocast, empty experts included. The GEMMs are the same
per-expert calls; silu's vectorized loop may round a chunk's tail elements differently (an ulp), so not
bit for bit at every shape."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sparsetrain.kernels import grouped_linear_reference, swiglu_experts_reference

from sparsetrain.model.experts import swiglu_experts

pytestmark = [pytest.mark.unit]


def _grouped(x, counts, w1, w2, w3):
    h = F.silu(grouped_linear_reference(x, w1, counts)) * grouped_linear_reference(x, w3, counts)  # [N, d_ffn]
    return grouped_linear_reference(h, w2, counts)


def _run(fn, x, counts, ws, autocast):
    x, ws = x.detach().requires_grad_(), [w.detach().requires_grad_() for w in ws]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(x, counts, *ws)
    if not sum(counts):  # no rows: an empty output outside the graph (the dispatcher keeps its own graph)
        return [y]
    (y.float() * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    return [y.detach(), x.grad] + [w.grad for w in ws]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("counts", [[5, 0, 7, 1], [0, 0, 0, 0], [16, 16, 16, 16]])
def test_per_expert_swiglu_equals_grouped_gemms(counts, autocast):
    torch.manual_seed(0)
    e, d, f = 4, 8, 24
    x = torch.randn(sum(counts), d)
    ws = [torch.randn(e, f, d) * 0.3, torch.randn(e, d, f) * 0.3, torch.randn(e, f, d) * 0.3]
    want = _run(_grouped, x, counts, ws, autocast)
    for fn in (swiglu_experts_reference, swiglu_experts):  # the model's entry point takes this path on CPU
        got = _run(fn, x, counts, ws, autocast)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2 if autocast else 1e-6,
                                       atol=1e-2 if autocast else 1e-6)


def _nodes(y: torch.Tensor, name: str) -> int:
    """Autograd nodes called `name` in y's graph."""
    seen, todo, n = set(), [y.grad_fn], 0
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        n += type(fn).__name__ == name
        todo += [nxt for nxt, _ in fn.next_functions]
    return n


def test_bound_experts_called_twice_stack_each_weight_gradient_once():
    """`GroupedExperts.bind`: a layer's two calls (own slots, then received ones) share the per-expert views,
    so backward stacks each of w1/w2/w3's gradients once; the gradients equal those of two separate calls."""
    from sparsetrain.model.experts import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 24)
    experts.reset_parameters(0.3, 0.3)
    c1, c2 = [3, 0, 2, 1], [1, 4, 0, 2]
    x1, x2 = torch.randn(sum(c1), 8), torch.randn(sum(c2), 8)
    grads = {}
    for way in ("bound", "separate"):
        experts.zero_grad(set_to_none=True)
        fn = experts.bind() if way == "bound" else experts
        y = torch.cat([fn(x1, c1), fn(x2, c2)])
        assert _nodes(y, "UnbindBackward0") == (3 if way == "bound" else 6)
        (y * torch.arange(y.numel()).view_as(y).cos()).sum().backward()
        grads[way] = [p.grad.clone() for p in (experts.w1, experts.w2, experts.w3)]
    for a, b in zip(grads["bound"], grads["separate"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
