"""The saved-tensor stack: layers compose (innermost first, PASS hands on), checkpoint regions stay innermost,
the bounded host pool refuses what does not fit and offload keeps such tensors on device (exact gradients)."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.config import OffloadConfig
from sparsetrain.model.gpt import build_model
from sparsetrain.offload.checkpointing import apply_activation_checkpointing, checkpoint_targets, is_checkpointed
from sparsetrain.offload.meter import ActivationMeter
from sparsetrain.offload.pool import HostBufferPool
from sparsetrain.offload.saved import PASS, active_layers, checkpoint_region, in_checkpoint, saved_layer
from tests.offload.test_activation_offload import assert_equal_training, batches, tiny_cfg, train

pytestmark = pytest.mark.unit


class Tagging:
    """Claims tensors of one shape; remembers what it packed and unpacked."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape, self.packed, self.unpacked = shape, 0, 0

    def pack(self, t: torch.Tensor):
        if tuple(t.shape) != self.shape:
            return PASS
        self.packed += 1
        return t.detach().clone()

    def unpack(self, p):
        self.unpacked += 1
        return p


def test_layers_compose_innermost_first_and_pass_on() -> None:
    outer, inner = Tagging((3, 4)), Tagging((4, 5))
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(4, 5, requires_grad=True)
    with saved_layer(outer), saved_layer(inner) as active:
        assert active and active_layers() == (outer, inner)
        y = (a @ b).sum()  # saves a (outer's shape) and b (inner's shape)
    assert active_layers() == ()
    y.backward()
    assert (outer.packed, inner.packed) == (1, 1) and (outer.unpacked, inner.unpacked) == (1, 1)
    torch.testing.assert_close(a.grad, b.detach().sum(1).expand(3, 4))


def test_no_layer_inside_a_checkpoint_region() -> None:
    layer = Tagging((3, 4))
    with checkpoint_region(recompute=False):
        assert in_checkpoint()
        with saved_layer(layer) as active:
            assert not active and active_layers() == ()
    assert not in_checkpoint()


def test_pool_bound_refuses_and_trims() -> None:
    pool = HostBufferPool(max_bytes=8192)
    a = pool.acquire(4096)
    b = pool.acquire(4096)
    assert a is not None and b is not None and pool.acquire(512) is None and pool.refusals == 1
    pool.release(a)
    pool.release(b)
    c = pool.acquire(6000)  # idle 4 KiB buffers are dropped to make room
    assert c is not None and pool.capacity_bytes <= 8192
    with pytest.raises(ValueError, match="max_bytes"):
        HostBufferPool(max_bytes=-1)


def test_bounded_pool_keeps_the_rest_on_device_exactly() -> None:
    ref = train(tiny_cfg(), None)
    oc = OffloadConfig(enabled=True, min_tensor_bytes=1024, max_host_mib=0)
    unbounded = train(tiny_cfg(), oc)[2][0]
    bound = 0.25  # MiB
    assert unbounded["pool_peak_bytes"] > bound * 2**20, "the bound below must bite"
    got = train(tiny_cfg(), OffloadConfig(enabled=True, min_tensor_bytes=1024, max_host_mib=bound))
    assert_equal_training(ref, got)
    for s in got[2]:
        assert s["kept_pool_full_tensors"] > 0 and s["offloaded_tensors"] > 0
        assert s["pool_capacity_bytes"] <= bound * 2**20 and s["pool_max_bytes"] == bound * 2**20


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_exact_and_keeps_less(mode: str) -> None:
    cfg = tiny_cfg()
    x, y = batches(1)[0]
    grads, kept = [], []
    for m in ("none", mode):
        model = build_model(cfg)
        apply_activation_checkpointing(model, m)
        assert all(is_checkpointed(t) for t in checkpoint_targets(model, m))
        with ActivationMeter(model) as meter:
            out = model(x, y)
            (out.loss + out.aux_loss + out.z_loss).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        kept.append(meter.total())
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert kept[1] < (0.3 if mode == "full" else 0.8) * kept[0], kept
    with pytest.raises(ValueError, match="activation_checkpointing"):
        checkpoint_targets(build_model(cfg), "some")


def test_trainer_reports_offload_and_activation_bytes(tmp_path) -> None:
    from sparsetrain.config import load_config
    from sparsetrain.train.trainer import Trainer

    cfg = load_config("tiny", ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=16",
                               "moe.num_experts=4", "moe.d_ffn=32", "data.batch_size=2", "launch.workers=1",
                               "parallel.strategy=none", "train.steps=2", "train.eval_every=0", "train.log_every=1",
                               "train.progress=false", "checkpoint.save_final=false", "checkpoint.resume=false",
                               "train.activation_checkpointing=selective", "offload.enabled=true",
                               "offload.every_k_layers=2", "offload.min_tensor_bytes=0", "offload.max_host_mib=4",
                               f"train.out_dir={tmp_path}"])
    summary = Trainer(cfg).fit()
    saved, dev = summary["activation_MiB_by_block"], summary["activation_on_device_MiB_by_block"]
    assert set(saved) == {0, 1} and saved[0] == dev[0] > 0 and 0 <= dev[1] < saved[1]  # block 1 offloaded
    assert summary["offload_MB"] > 0 and 0 < summary["offload_pool_MB"] <= 4 and summary["offload_max_host_MiB"] == 4
    assert summary["activation_checkpointing"] == "selective"
