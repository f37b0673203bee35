"""KV-cache decoding equals the full forward (MoE and dense layers), one position per new token; sampling filters."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.config import load_config
from sparsetrain.model.gpt import build_model
from sparsetrain.model.sample import filter_logits, generate

pytestmark = [pytest.mark.unit]

SMALL = ["launch.workers=1", "model.d_model=32", "model.n_layers=3", "model.n_heads=4", "model.seq_len=16",
         "moe.num_experts=4", "moe.top_k=2", "moe.d_ffn=32", "model.vocab_size=64"]


def _model(*extra: str):
    model = build_model(load_config("tiny", SMALL + list(extra))).eval()
    with torch.no_grad():  # logits sharper than at init (untied from the embedding scale): no greedy near-ties
        model.norm.weight.mul_(5)
    return model


@pytest.mark.parametrize("moe_every", [1, 2])
def test_cached_prefill_chunks_equal_full_forward(moe_every):
    model = _model(f"model.moe_every={moe_every}")
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx).logits  # [2, 16, V]
        cache = model.new_cache(batch=2)
        parts = [model(idx[:, a:b], cache=cache).logits for a, b in ((0, 7), (7, 12), (12, 13), (13, 16))]
    assert cache.pos == 16
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed model.seq_len=16"):
        model(idx[:, :1], cache=cache)


@pytest.mark.parametrize("moe_every,new", [(1, 8), (2, 8), (1, 30)])  # 30: past seq_len, the window restarts
def test_generate_with_cache_equals_without_greedy(moe_every, new):
    model = _model(f"model.moe_every={moe_every}")
    prompt = [3, 14, 15, 9, 2]
    a = generate(model, prompt, new, temperature=0, use_cache=True, keep_logits=True)
    b = generate(model, prompt, new, temperature=0, use_cache=False, keep_logits=True)
    assert a.ids == b.ids and len(a.ids) == new
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=1e-5, atol=1e-5)
    if new == 8:  # within the window: the prompt once, then one position per new token
        assert a.positions == len(prompt) + new - 1
        assert b.positions == sum(range(len(prompt), len(prompt) + new))
    else:  # window restarts at 16 tokens keep the last 8: still far fewer positions than the full forward
        assert a.positions < b.positions / 3


def test_sampling_with_cache_is_seeded_and_equal():
    model = _model()
    kw = {"temperature": 3.0, "top_k": 20, "top_p": 0.95, "seed": 4}
    a = generate(model, [1, 2, 3], 12, use_cache=True, **kw)
    assert a.ids == generate(model, [1, 2, 3], 12, use_cache=False, **kw).ids
    assert a.ids != generate(model, [1, 2, 3], 12, use_cache=True, **{**kw, "seed": 5}).ids


def test_vocab_limit_and_stop_id():
    model = _model()
    gen = generate(model, [1, 2], 40, temperature=1.5, top_k=0, vocab_limit=10)
    assert len(gen.ids) == 40 and max(gen.ids) < 10
    greedy = generate(model, [1, 2], 10, temperature=0).ids
    stopped = generate(model, [1, 2], 10, temperature=0, stop_id=greedy[3]).ids
    assert stopped == greedy[: greedy.index(greedy[3]) + 1]


def test_filter_logits_top_k_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0]).log_softmax(-1)
    probs = logits.softmax(-1)  # ~[0.61, 0.22, 0.14, 0.03]
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [False, True, True, True]
    p = float(probs[0] + probs[1])
    assert torch.isinf(filter_logits(logits, top_p=p - 1e-3)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, top_p=p + 1e-3)).tolist() == [False, False, False, True]
    shuffled = logits[[2, 0, 3, 1]]  # order does not matter
    assert torch.isinf(filter_logits(shuffled, top_p=0.5)).tolist() == [True, False, True, True]
