"""Activation offload: exact gradients on vs off, block/size/param policy, pool reuse, checkpointing, remove()."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.config import Config, OffloadConfig, load_config
from sparsetrain.model.gpt import GPT, build_model
from sparsetrain.offload import enable_activation_offload
from sparsetrain.offload.activation import _resident_ptrs
from sparsetrain.offload.pool import HostBufferPool, size_class

pytestmark = pytest.mark.unit

SMALL = ["model.d_model=32", "model.n_layers=4", "model.n_heads=2", "model.seq_len=16", "model.vocab_size=64",
         "moe.num_experts=4", "moe.d_ffn=32"]


def tiny_cfg(*extra: str) -> Config:
    return load_config("tiny", SMALL + list(extra))


def batches(n: int, same: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)) for _ in range(n)]
    return [out[0]] * n if same else out


def train(cfg: Config, oc: OffloadConfig | None, steps: int = 2, same: bool = False,
          device: str = "cpu") -> tuple[list[dict[str, torch.Tensor]], GPT, list[dict]]:
    """Run `steps` AdamW steps; return per-step grads, the model and per-step offload stats."""
    model = build_model(cfg, device)
    ctl = enable_activation_offload(model, oc) if oc is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    grads, stats = [], []
    for x, y in batches(steps, same):
        out = model(x.to(device), y.to(device))
        (out.loss + out.aux_loss + out.z_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ctl is not None:
            stats.append(ctl.stats())
            ctl.reset_stats()
    return grads, model, stats


def assert_equal_training(ref: tuple, got: tuple) -> None:
    for g_ref, g_got in zip(ref[0], got[0]):
        bad = [n for n in g_ref if not torch.equal(g_ref[n], g_got[n])]
        assert not bad, f"gradients differ with offload on: {bad}"
    for (n, p), q in zip(ref[1].named_parameters(), got[1].parameters()):
        assert torch.equal(p, q), f"parameter {n} differs after the optimizer steps"


@pytest.fixture(scope="module")
def reference() -> tuple:
    return train(tiny_cfg(), None)


def test_gradients_bitwise_equal_all_blocks(reference: tuple) -> None:
    got = train(tiny_cfg(), OffloadConfig(enabled=True, every_k_layers=1, min_tensor_bytes=1024))
    assert_equal_training(reference, got)
    for s in got[2]:
        assert s["offloaded_tensors"] > 0 and s["dedup_hits"] > 0
        assert s["prefetched_tensors"] == s["offloaded_tensors"] and s["fetched_on_demand_tensors"] == 0
        assert s["pool_in_use_bytes"] == 0  # every buffer came back after backward


def test_gradients_equal_without_prefetch(reference: tuple) -> None:
    got = train(tiny_cfg(), OffloadConfig(enabled=True, min_tensor_bytes=0, prefetch=False))
    assert_equal_training(reference, got)
    assert got[2][0]["fetched_on_demand_tensors"] == got[2][0]["offloaded_tensors"] > 0


@pytest.mark.parametrize("k", [1, 2])
def test_combined_with_activation_checkpointing(reference: tuple, k: int) -> None:
    oc = OffloadConfig(enabled=True, every_k_layers=k, min_tensor_bytes=1024, checkpoint_activations=True)
    got = train(tiny_cfg(), oc)
    assert_equal_training(reference, got)
    s = got[2][0]
    n_sel = 4 // k
    assert s["offloaded_tensors"] == n_sel  # a checkpointed block saves only its input x (cos/sin are buffers)
    assert s["offloaded_bytes"] == n_sel * 2 * 16 * 32 * 4
    assert s["kept_resident_tensors"] == 2 * n_sel


def test_two_forwards_before_one_backward() -> None:
    """Gradient accumulation over two micro-batch graphs alive at once: each backward fetches its own copies."""
    cfg = tiny_cfg()
    (x1, y1), (x2, y2) = batches(2)
    grads = []
    for oc in (None, OffloadConfig(enabled=True, every_k_layers=2, min_tensor_bytes=1024)):
        model = build_model(cfg)
        ctl = enable_activation_offload(model, oc) if oc is not None else None
        (model(x1, y1).loss + model(x2, y2).loss).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        if ctl is not None:
            s = ctl.stats()
            assert s["prefetched_tensors"] == s["offloaded_tensors"] > 0 and s["pool_in_use_bytes"] == 0
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_policy_every_k_small_tensors_and_params() -> None:
    cfg = tiny_cfg()
    model = build_model(cfg)
    ctl = enable_activation_offload(model, OffloadConfig(enabled=True, every_k_layers=2, min_tensor_bytes=2048))
    assert ctl.selected == [1, 3]
    assert not model.layers[0]._forward_hooks and model.layers[2]._forward_hooks  # block 2 prefetches block 1
    x, y = batches(1)[0]
    out = model(x, y)
    handles = ctl.live_handles()
    params = _resident_ptrs(model)
    assert handles and {h.block for h in handles} == {1, 3}
    assert all(h.nbytes >= 2048 for h in handles)
    assert not any(h.src_ptr in params for h in handles)
    s = ctl.stats()
    assert set(s["offloaded_bytes_by_block"]) == {1, 3}
    assert s["kept_small_tensors"] > 0 and s["kept_resident_tensors"] > 0
    del handles
    out.loss.backward()
    assert ctl.live_handles() == [] and ctl.stats()["pool_in_use_bytes"] == 0


def test_params_never_offloaded_even_with_zero_threshold() -> None:
    model = build_model(tiny_cfg())
    ctl = enable_activation_offload(model, OffloadConfig(enabled=True, min_tensor_bytes=0))
    x, y = batches(1)[0]
    out = model(x, y)
    params = _resident_ptrs(model)
    assert not any(h.src_ptr in params for h in ctl.live_handles())
    assert ctl.stats()["kept_resident_tensors"] > 0
    del out


def test_pool_reuse_second_step_allocates_nothing() -> None:
    cfg = tiny_cfg("model.moe_every=100")  # dense blocks: identical shapes every step
    _, _, stats = train(cfg, OffloadConfig(enabled=True, min_tensor_bytes=1024), steps=2, same=True)
    first, second = stats
    assert first["pool_allocations"] > 0
    assert second["pool_allocations"] == 0 and second["pool_reuses"] == second["offloaded_tensors"] > 0
    assert second["pool_peak_bytes"] >= second["offloaded_bytes"]


def test_forward_without_backward_returns_buffers() -> None:
    model = build_model(tiny_cfg("model.moe_every=100"))  # MoE layers keep last_route (and its graph) alive
    ctl = enable_activation_offload(model, OffloadConfig(enabled=True, min_tensor_bytes=1024))
    x, y = batches(1)[0]
    out = model(x, y)
    assert ctl.stats()["pool_in_use_bytes"] > 0
    del out
    assert ctl.stats()["pool_in_use_bytes"] == 0 and ctl.live_handles() == []
    with torch.no_grad():
        model(x, y)
    assert ctl.stats()["offloaded_tensors"] > 0 and ctl.live_handles() == []


def test_remove_restores_model() -> None:
    model = build_model(tiny_cfg())
    x, y = batches(1)[0]
    ref = model(x, y).loss
    oc = OffloadConfig(enabled=True, min_tensor_bytes=0, checkpoint_activations=True)
    ctl = enable_activation_offload(model, oc)
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_activation_offload(model, oc)
    ctl.remove()
    for b in model.layers:
        assert not b._forward_hooks and not b._forward_pre_hooks and "forward" not in b.__dict__
    assert torch.equal(model(x, y).loss, ref)
    assert ctl.stats()["offloaded_tensors"] == 0
    enable_activation_offload(model, oc).remove()  # can be enabled again after remove()


def test_bad_config_values() -> None:
    model = build_model(tiny_cfg())
    with pytest.raises(ValueError, match="every_k_layers"):
        enable_activation_offload(model, OffloadConfig(every_k_layers=0))
    with pytest.raises(ValueError, match="min_tensor_bytes"):
        enable_activation_offload(model, OffloadConfig(min_tensor_bytes=-1))
    with pytest.raises(ValueError, match="layers"):
        enable_activation_offload(torch.nn.Linear(2, 2), OffloadConfig())


def test_pool_size_classes_and_reuse() -> None:
    for n in (1, 511, 512, 513, 4096, 4097, 10**6, 3 * 2**20 + 5):
        c = size_class(n)
        assert n <= c < n + max(512, n // 8 + 1)
    pool = HostBufferPool()
    a = pool.acquire(5000)
    pool.release(a)
    b = pool.acquire(4990)  # same size class -> same buffer
    assert b.data_ptr() == a.data_ptr() and pool.allocations == 1 and pool.reuses == 1
    pool.release(b)
    pool.clear()
    assert pool.capacity_bytes == 0 and pool.in_use_bytes == 0


@pytest.mark.gpu
def test_cuda_stream_path_matches_and_saves_memory() -> None:
    cfg = tiny_cfg("model.d_model=256", "model.seq_len=128", "moe.d_ffn=256")
    oc = OffloadConfig(enabled=True, min_tensor_bytes=1 << 14)
    ref = train(cfg, None, device="cuda")
    got = train(cfg, oc, device="cuda")
    for g_ref, g_got in zip(ref[0], got[0]):
        for n in g_ref:
            torch.testing.assert_close(g_got[n], g_ref[n], rtol=0, atol=0, msg=f"grad {n}")
    s = got[2][-1]
    assert s["prefetched_tensors"] == s["offloaded_tensors"] > 0 and s["pool_in_use_bytes"] == 0
    model = build_model(cfg, "cuda")
    x, y = (t.cuda() for t in batches(1)[0])

    def activation_bytes() -> int:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = model(x, y)
        torch.cuda.synchronize()
        used = torch.cuda.memory_allocated() - base
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return used

    activation_bytes()  # warm-up (lazy inits)
    plain = activation_bytes()
    ctl = enable_activation_offload(model, oc)
    assert all(p.is_pinned() for pool in ctl._pools.values() for bufs in pool._free.values() for p in bufs)
    offloaded = activation_bytes()
    assert offloaded < 0.6 * plain, (offloaded, plain)
