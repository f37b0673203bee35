"""Grouped expert compute: the per-expert SwiGLU (CPU, and CUDA without torch._grouped_mm) equals the
grouped-GEMM formulation, in fp32 and under bf16 autocast, empty experts included. The GEMMs are the same
per-expert calls; silu's vectorized loop may round a chunk's tail elements differently (an ulp), so not
bit for bit at every shape."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sparsetrain.kernels import grouped_linear_reference, swiglu_experts_reference

from sparsetrain.model.experts import GroupedExperts, swiglu_experts

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
            if fn is swiglu_experts and not sum(counts):  # the model path casts x once: empty out in bf16 too
                b = b.to(torch.bfloat16 if autocast else b.dtype)
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


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_bound_experts_with_copies_equal_one_joined_stack(autocast):
    """`bind(copies=...)` (FSSDP: own experts on their Parameters, copies on gathered rows) computes what one
    stack holding both would, and each source gets its own experts' gradients; under autocast the copies are
    bf16 (the wire dtype) and the own weights fp32 masters."""
    from sparsetrain.model.experts import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(3, 8, 24)  # own experts 0..2
    experts.reset_parameters(0.3, 0.3)
    wire = torch.bfloat16 if autocast else torch.float32
    gathered = {n: (torch.randn(2, *getattr(experts, n).shape[1:]) * 0.3).to(wire).requires_grad_()
                for n in ("w1", "w2", "w3")}  # two copies, of experts 7 and 4
    counts = [3, 0, 5, 2, 4]  # own 0, 1, 2 then copies 7, 4
    x = torch.randn(sum(counts), 8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = experts.bind(ids=[0, 1, 2], copies=([7, 4], gathered))(x, counts)
    (y.float() * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    joined = {n: torch.cat([getattr(experts, n).detach().to(wire), gathered[n].detach()]).float().requires_grad_()
              for n in ("w1", "w2", "w3")}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref = swiglu_experts_reference(x, counts, joined["w1"], joined["w2"], joined["w3"])
    (ref.float() * torch.arange(ref.numel()).view_as(ref).sin()).sum().backward()
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(y.float(), ref.float(), **tol)
    for n in ("w1", "w2", "w3"):
        own, copy = getattr(experts, n).grad, gathered[n].grad
        assert own.dtype == torch.float32 and copy.dtype == wire
        torch.testing.assert_close(own, joined[n].grad[:3], **tol)
        torch.testing.assert_close(copy.float(), joined[n].grad[3:], **tol)


def test_compute_stacks_cast_master_weights_to_the_autocast_dtype():
    """The grouped GEMM's stacks: fp32 masters cast once to bf16 under autocast (gradients back in fp32),
    unchanged without it."""
    from sparsetrain.model.experts import GroupedExperts, compute_stacks

    experts = GroupedExperts(2, 8, 16)
    experts.reset_parameters(0.3, 0.3)
    assert [w.dtype for w in compute_stacks([experts.weights()])] == [torch.float32] * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stacks = compute_stacks([experts.weights()])
    assert [w.dtype for w in stacks] == [torch.bfloat16] * 3
    sum(w.float().sum() for w in stacks).backward()
    assert experts.w1.grad.dtype == torch.float32 and bool((experts.w1.grad == 1).all())


def test_uses_grouped_gemm_only_where_torch_grouped_mm_would_run(monkeypatch):
    """FSSDP skips the backward re-gather of a layer's copies exactly when the grouped GEMM runs: it saves the
    joined stacks, not views of the gathered buffer (the per-expert rows and the N:M transform save views)."""
    import sparsetrain.model.experts as experts_mod

    ex = GroupedExperts(4, 16, 32)
    x = torch.randn(6, 16)
    assert not ex.uses_grouped_gemm(x)  # CPU: per-expert rows
    seen = []
    monkeypatch.setattr(experts_mod, "grouped_mm_input_eligible", lambda t: (seen.append(t.dtype), (True, ""))[1])
    assert ex.uses_grouped_gemm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ex.uses_grouped_gemm(x) and seen[-1] == torch.bfloat16  # judged in the GEMMs' dtype
    assert not GroupedExperts(4, 12, 32).uses_grouped_gemm(x[:, :12])  # d_model not a multiple of 8
    ex.grouped_linear_fn = lambda *a: None  # N:M kernels: their own GEMMs
    assert not ex.uses_grouped_gemm(x)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_hot_expert_rows_in_cpu_blocks_equal_one_piece(monkeypatch, autocast):
    """On CPU an expert with more rows than a block is computed block by block (intermediates in cache): same
    outputs and gradients as the grouped GEMMs; the blocks really are used (more GEMMs in the graph)."""
    from sparsetrain.kernels import grouped

    torch.manual_seed(0)
    e, d, f = 4, 8, 24
    counts = [150, 0, 64, 65]  # > one block, none, exactly one, one row over
    x = torch.randn(sum(counts), d)
    ws = [torch.randn(e, f, d) * 0.3, torch.randn(e, d, f) * 0.3, torch.randn(e, f, d) * 0.3]
    want = _run(_grouped, x, counts, ws, autocast)
    whole = _nodes(swiglu_experts_reference(x, counts, *[w.requires_grad_() for w in ws]), "MmBackward0")
    monkeypatch.setattr(grouped, "CPU_BLOCK_BYTES", 64 * f * 4)  # 64 fp32 rows of d_ffn per block
    assert grouped._row_block(x, f) == 64
    got = _run(swiglu_experts_reference, x, counts, ws, autocast)
    for a, b in zip(got, want):  # bf16: a blocked weight grad sums bf16 products per block in fp32 (one GEMM's
        # bf16 output rounds once): up to 0.0115 apart here
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2 if autocast else 1e-5,
                                   atol=2e-2 if autocast else 1e-5)
    blocked = _nodes(swiglu_experts_reference(x, counts, *ws), "MmBackward0")
    assert blocked == whole + 3 * (2 + 1)  # expert 0: 3 blocks (+2), expert 3: 2 blocks (+1); 3 GEMMs each


def test_dense_mlp_rows_in_cpu_blocks_equal_one_piece(monkeypatch):
    """The dense SwiGLU MLP (dense blocks, DeepSpeed's experts) runs CPU rows in the same blocks: same output and
    gradients as one piece, for [B, S, d] and [N, d] inputs."""
    from sparsetrain.kernels import grouped

    from sparsetrain.model.layers import MLP

    torch.manual_seed(0)
    mlp = MLP(8, 24)
    for shape in ((3, 50, 8), (150, 8)):
        x = torch.randn(*shape)
        want = _mlp_run(mlp, x)
        monkeypatch.setattr(grouped, "CPU_BLOCK_BYTES", 64 * 24 * 4)  # 64 rows per block: 3 blocks
        got = _mlp_run(mlp, x)
        monkeypatch.setattr(grouped, "CPU_BLOCK_BYTES", 1 << 62)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _mlp_run(mlp, x):
    mlp.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = mlp(x)
    (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in mlp.parameters()]
