"""Router math checked by hand: top-k selection, weights, aux / z losses, aux-free bias, Zipf skew."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.model.router import TopKRouter

pytestmark = [pytest.mark.unit]

D, E = 16, 6


def _router(top_k: int = 2, **kw) -> TopKRouter:
    torch.manual_seed(0)
    r = TopKRouter(D, E, top_k, **kw)
    r.reset_parameters(0.5)
    return r


def _x(t: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_topk_ids_and_weights_match_manual(top_k):
    r = _router(top_k)
    x = _x()
    out = r(x)
    probs = torch.softmax(x @ r.gate.weight.T, dim=-1)  # [T, E]
    vals, ids = torch.topk(probs, top_k, dim=-1)
    assert torch.equal(out.expert_ids, ids)
    want = vals / vals.sum(-1, keepdim=True) if top_k > 1 else vals
    torch.testing.assert_close(out.weights, want, rtol=1e-6, atol=1e-7)
    if top_k > 1:
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(x.shape[0]))
    assert out.expert_ids.shape == (x.shape[0], top_k) and out.expert_ids.dtype == torch.long
    assert torch.equal(out.tokens_per_expert, torch.bincount(ids.flatten(), minlength=E))


def test_aux_loss_matches_switch_formula():
    coef = 0.03
    r = _router(2, aux_loss_coef=coef, z_loss_coef=0.0)
    x = _x(50)
    out = r(x)
    probs = torch.softmax(x @ r.gate.weight.T, dim=-1)
    counts = torch.bincount(out.expert_ids.flatten(), minlength=E).float()
    f = counts / counts.sum()
    p = probs.mean(0)
    want = coef * E * (f * p).sum()
    torch.testing.assert_close(out.aux_loss, want, rtol=1e-6, atol=1e-8)
    assert float(out.z_loss) == 0.0


def test_z_loss_matches_formula():
    coef = 0.002
    r = _router(2, aux_loss_coef=0.0, z_loss_coef=coef)
    x = _x(30)
    out = r(x)
    logits = x @ r.gate.weight.T
    want = coef * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(out.z_loss, want, rtol=1e-6, atol=1e-8)
    assert float(out.aux_loss) == 0.0


def test_aux_loss_has_gradient_to_gate_only_through_probs():
    r = _router(2, aux_loss_coef=0.01, z_loss_coef=0.0)
    out = r(_x())
    out.aux_loss.backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() > 0


def test_aux_loss_with_reduced_counts_uses_global_formula():
    """Two 'ranks' with counts summed: each rank's aux = coef*E*sum f_global*P_local; their mean is the global one."""
    world, coef = 2, 0.01
    r = _router(2, aux_loss_coef=coef, z_loss_coef=0.0)
    xs = [_x(20, seed=s) for s in range(world)]
    full = r(torch.cat(xs))  # the single-process value on the global batch
    global_counts = full.tokens_per_expert.float()
    r.reduce_counts = lambda c: global_counts.to(c)  # what an all-reduce would return on every rank
    per_rank = [r(x).aux_loss for x in xs]
    torch.testing.assert_close(torch.stack(per_rank).mean(), full.aux_loss, rtol=1e-6, atol=1e-8)
    # and each rank's value is the formula with the global f and its local P
    probs0 = torch.softmax(xs[0] @ r.gate.weight.T, -1).mean(0)
    want0 = coef * E * (global_counts / global_counts.sum() * probs0).sum()
    torch.testing.assert_close(per_rank[0], want0, rtol=1e-6, atol=1e-8)


def test_aux_loss_with_world_multiplied_counts_unchanged():
    """Counts scaled by the world size (identical shards) leave f, hence aux, unchanged."""
    r = _router(2)
    x = _x()
    base = r(x).aux_loss
    r.reduce_counts = lambda c: c * 4
    torch.testing.assert_close(r(x).aux_loss, base)


def test_aux_free_bias_moves_toward_underloaded_experts():
    rate = 0.01
    r = _router(2, balance="aux_free", bias_update_rate=rate, aux_loss_coef=0.01)
    r.train()
    x = _x(64)
    out = r(x)
    assert float(out.aux_loss) == 0.0  # aux_free: no aux loss term
    counts = out.tokens_per_expert.float()
    r.update_bias()
    want = rate * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(r.expert_bias, want)
    hot, cold = int(counts.argmax()), int(counts.argmin())
    assert r.expert_bias[hot] < 0 < r.expert_bias[cold]
    # pending counts are consumed: a second update without forward does nothing
    before = r.expert_bias.clone()
    r.update_bias()
    assert torch.equal(r.expert_bias, before)


def test_aux_free_bias_changes_selection_not_weights():
    r = _router(2, balance="aux_free")
    x = _x()
    probs = torch.softmax(x @ r.gate.weight.T, -1)
    cold = int(r(x).tokens_per_expert.argmin())
    with torch.no_grad():
        r.expert_bias.zero_()
        r.expert_bias[cold] = 10.0  # large bias: expert `cold` is chosen for every token
    out = r(x)
    assert (out.expert_ids == cold).any(-1).all()
    want = probs.gather(-1, out.expert_ids)
    want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(out.weights, want, rtol=1e-6, atol=1e-7)  # from probs, bias-free


def test_aux_free_update_is_noop_for_aux_loss_balance():
    r = _router(2, balance="aux_loss")
    r.train()
    r(_x())
    r.update_bias()
    assert torch.count_nonzero(r.expert_bias) == 0
