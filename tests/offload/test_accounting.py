"""The activation estimate `sparsetrain plan` prints matches the meter (saved bytes per block) on CPU fp32."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.config import load_config
from sparsetrain.model.gpt import build_model
from sparsetrain.offload.accounting import activation_bytes_by_block, activation_plan_lines, block_activation_bytes
from sparsetrain.offload.checkpointing import apply_activation_checkpointing
from sparsetrain.offload.meter import ActivationMeter
from sparsetrain.parallel.plan_report import plan_report

pytestmark = pytest.mark.unit

CFG = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.seq_len=32", "moe.num_experts=8",
       "moe.d_ffn=64", "data.batch_size=4", "launch.workers=1", "model.moe_every=2"]


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_estimate_matches_meter(mode: str) -> None:
    cfg = load_config("tiny", CFG)
    model = build_model(cfg)
    apply_activation_checkpointing(model, mode)
    x = torch.randint(0, 256, (4, 32))
    with ActivationMeter(model) as meter:
        out = model(x, x)
        (out.loss + out.aux_loss).backward()
    for i, block in enumerate(model.layers):  # block 0 dense MLP, block 1 MoE
        est = block_activation_bytes(cfg, 1, block.is_moe, mode)
        assert abs(est - meter.bytes_by_block[i]) <= 0.02 * meter.bytes_by_block[i], (i, est, meter.bytes_by_block)


def test_offload_and_plan_lines() -> None:
    cfg = load_config("tiny", [*CFG, "offload.enabled=true", "offload.every_k_layers=2"])
    by = activation_bytes_by_block(cfg, 1)
    assert by[0]["on_device"] == by[0]["saved"] > 0 and by[1]["on_device"] == 0  # block 1 offloaded
    lines = activation_plan_lines(cfg, 1)
    assert [r.split()[0] for r in lines[-3:]] == ["none", "selective", "full"]
    assert "activations per rank" in plan_report(cfg)


def test_memory_plan_counts_checkpointing_and_the_pool_bound() -> None:
    from sparsetrain.parallel.memory_plan import memory_plan

    base = ["launch.workers=1", "parallel.strategy=none", "model.n_layers=8", "train.device=cuda"]
    acts = {mode: memory_plan(load_config("tiny", [*base, f"train.activation_checkpointing={mode}"])).ranks[0]
            for mode in ("none", "selective", "full")}
    assert acts["full"].activations < acts["selective"].activations < acts["none"].activations
    off = memory_plan(load_config("tiny", [*base, "offload.enabled=true", "offload.every_k_layers=2"])).ranks[0]
    capped = memory_plan(load_config("tiny", [*base, "offload.enabled=true", "offload.every_k_layers=2",
                                              "offload.max_host_mib=1"])).ranks[0]
    assert capped.offloaded <= 2**20 < off.offloaded
    assert capped.activations + capped.offloaded == off.activations + off.offloaded
