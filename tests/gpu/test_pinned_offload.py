"""Activation offload on CUDA: pinned host buffers, side-stream copies, less device memory, same gradients."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.config import OffloadConfig, load_config
from sparsetrain.model.gpt import build_model
from sparsetrain.offload import enable_activation_offload

pytestmark = pytest.mark.gpu


def _forward_bytes(model, x):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = model(x, x)
    torch.cuda.synchronize()
    return out, torch.cuda.memory_allocated() - base


def test_offload_uses_pinned_buffers_and_matches():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = load_config("tiny", ["launch.workers=1", "model.d_model=256", "model.n_layers=4"])
    x = torch.randint(0, cfg.model.vocab_size, (8, cfg.model.seq_len), device="cuda")
    ref = build_model(cfg, "cuda")
    out, ref_bytes = _forward_bytes(ref, x)
    out.loss.backward()
    model = build_model(cfg, "cuda")
    ctl = enable_activation_offload(model, OffloadConfig(enabled=True, min_tensor_bytes=1 << 12))
    got, off_bytes = _forward_bytes(model, x)
    stats = ctl.stats()
    assert stats["offloaded_bytes"] > 0
    assert off_bytes < ref_bytes - stats["offloaded_bytes"] // 2, (off_bytes, ref_bytes, stats["offloaded_bytes"])
    got.loss.backward()
    torch.cuda.synchronize()
    pool = next(iter(ctl._pools.values()))
    free = [b for bufs in pool._free.values() for b in bufs]  # returned to the pool after backward
    assert pool.pin_memory and free and all(b.is_pinned() for b in free)
    torch.testing.assert_close(got.loss, out.loss)
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)
