"""GPT: shapes, causality, MoE/dense layer pattern, tied embeddings, deterministic init."""
from __future__ import annotations

import math

import pytest
import torch

from sparsetrain.config import load_config
from sparsetrain.model.gpt import GPT, build_model
from sparsetrain.model.layers import MLP
from sparsetrain.model.moe import MoELayer

pytestmark = [pytest.mark.unit]

SMALL = ["launch.workers=1", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.seq_len=16",
         "moe.num_experts=4", "moe.top_k=2", "moe.d_ffn=32"]


def _cfg(*extra: str):
    return load_config("tiny", SMALL + list(extra))


def _idx(b: int = 2, s: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


def test_output_shapes_and_losses():
    cfg = _cfg()
    model = build_model(cfg)
    idx = _idx()
    out = model(idx, _idx(seed=1))
    assert out.logits.shape == (2, 16, 256)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert abs(float(out.loss.detach()) - math.log(256)) < 0.5  # near-uniform at init
    assert out.tokens_per_expert.shape == (2, 4)
    assert int(out.tokens_per_expert.sum()) == 2 * 2 * 16 * 2  # layers x tokens x top_k
    assert float(out.aux_loss.detach()) > 0 and float(out.z_loss.detach()) > 0
    assert model(idx).loss is None
    assert model(idx[:, :5]).logits.shape == (2, 5, 256)  # shorter than seq_len


def test_causal():
    model = build_model(_cfg()).eval()
    idx = _idx(b=1)
    pos = 9
    changed = idx.clone()
    changed[0, pos] = (changed[0, pos] + 1) % 256
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :pos], b[:, :pos], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a[:, pos:], b[:, pos:])


@pytest.mark.parametrize("every,n_layers,want", [(1, 2, [True, True]), (2, 4, [False, True, False, True]),
                                                 (3, 3, [False, False, True])])
def test_moe_every(every, n_layers, want):
    model = build_model(_cfg(f"model.moe_every={every}", f"model.n_layers={n_layers}"))
    assert [b.is_moe for b in model.layers] == want
    for b in model.layers:
        assert isinstance(b.ffn, MoELayer if b.is_moe else MLP)
    assert len(model.moe_layers()) == sum(want)
    out = model(_idx(), _idx())
    assert out.tokens_per_expert.shape == (sum(want), 4)


def test_dense_ffn_size():
    model = build_model(_cfg("model.moe_every=2", "model.d_ffn_dense=48"))
    assert model.layers[0].ffn.w1.weight.shape == (48, 32)
    model = build_model(_cfg("model.moe_every=2"))
    assert model.layers[0].ffn.w1.weight.shape == (128, 32)  # default 4 * d_model


def test_tied_embeddings():
    model = build_model(_cfg())
    assert model.lm_head.weight is model.tok_emb.weight
    n_unique = sum(p.numel() for p in model.parameters())
    assert model.num_params() == n_unique
    untied = build_model(_cfg("model.tie_embeddings=false"))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() == n_unique + 256 * 32
    # a gradient step through both uses of the tied weight
    out = model(_idx(), _idx())
    out.loss.backward()
    assert model.tok_emb.weight.grad is not None


def test_deterministic_init_from_seed():
    a, b = build_model(_cfg()), build_model(_cfg())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = build_model(_cfg("train.seed=7")).state_dict()
    assert not torch.equal(sa["tok_emb.weight"], c["tok_emb.weight"])


@torch.no_grad()
def test_init_scales():
    cfg = _cfg("model.n_layers=4", "model.moe_every=2", "model.d_model=64", "moe.d_ffn=128")
    model = GPT(cfg).requires_grad_(False)
    std, out_std = cfg.model.init_std, cfg.model.init_std / math.sqrt(2 * 4)
    assert abs(float(model.layers[1].ffn.experts.w1.std()) - std) < 0.2 * std
    assert abs(float(model.layers[1].ffn.experts.w2.std()) - out_std) < 0.2 * out_std
    assert abs(float(model.layers[0].attn.wo.weight.std()) - out_std) < 0.2 * out_std
    assert abs(float(model.layers[0].ffn.w2.weight.std()) - out_std) < 0.2 * out_std
    assert torch.equal(model.norm.weight, torch.ones(64))
    assert torch.count_nonzero(model.layers[1].ffn.router.expert_bias) == 0
