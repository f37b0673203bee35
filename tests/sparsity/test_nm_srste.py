"""SR-STE gradient formula, mask decay beta(t), structure-decay stages."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.sparsity import NMConfig, beta_at, mask_decay_beta, masked_weight, nm_mask, sr_ste, structure_stage

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("beta", [0.0, 0.25])
def test_sr_ste_forward_and_gradient_formula(beta: float) -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 8, requires_grad=True)
    x = torch.randn(5, 8)
    mask = nm_mask(w, 2, 4)
    lam = 2e-4
    wm = sr_ste(w, mask, beta, lam)
    maskf = mask.float()
    assert torch.allclose(wm, w.detach() * (maskf + beta * (1 - maskf)))
    y = (x @ wm.t()).square().sum()
    y.backward()
    # gradient w.r.t. the masked weight, computed independently
    wm_leaf = wm.detach().clone().requires_grad_(True)
    (x @ wm_leaf.t()).square().sum().backward()
    expect = wm_leaf.grad + lam * (1 - maskf) * w.detach()
    assert torch.allclose(w.grad, expect, atol=1e-6)


def test_magnitude_masked_weight_gradient() -> None:
    w = torch.randn(4, 8, requires_grad=True)
    mask = nm_mask(w, 2, 4)
    masked_weight(w, mask, 0.5).sum().backward()
    assert torch.allclose(w.grad, mask.float() + 0.5 * (1 - mask.float()))


def test_mask_decay_beta_schedule() -> None:
    assert mask_decay_beta(0, 0) == 0.0 and mask_decay_beta(5, 0) == 0.0
    assert [mask_decay_beta(t, 4) for t in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_structure_stages_and_beta_restart() -> None:
    cfg = NMConfig(n=2, m=8, structure_decay=["7:8", "4:8"], structure_decay_every=10, mask_decay_steps=5)
    assert cfg.stages() == [(7, 8), (4, 8), (2, 8)]
    assert [structure_stage(t, cfg) for t in (0, 9, 10, 19, 20, 1000)] == [
        (0, 7, 8), (0, 7, 8), (1, 4, 8), (1, 4, 8), (2, 2, 8), (2, 2, 8)]
    assert beta_at(0, cfg) == 1.0 and beta_at(5, cfg) == 0.0
    assert beta_at(10, cfg) == 1.0 and beta_at(12, cfg) == pytest.approx(0.6)
    plain = NMConfig(n=2, m=4)
    assert structure_stage(123, plain) == (0, 2, 4) and beta_at(3, plain) == 0.0
