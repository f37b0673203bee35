"""Model size, FLOPs per token, peak FLOP/s and the throughput log fields."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.config import load_config
from sparsetrain.model.gpt import build_model
from sparsetrain.telemetry.flops import model_size, peak_tflops, train_flops_per_token
from sparsetrain.telemetry.metrics import format_log

pytestmark = [pytest.mark.unit]


@pytest.mark.parametrize("over", [
    [],
    ["model.tie_embeddings=false", "moe.num_experts=6", "moe.top_k=1"],
    ["model.moe_every=2", "model.d_ffn_dense=96", "model.n_layers=3"],
])
def test_model_size_counts_the_built_model(over):
    cfg = load_config("tiny", ["launch.workers=1", "model.d_model=64", *over])
    model = build_model(cfg)
    size = model_size(cfg)
    assert size.total == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert size.per_expert * size.num_experts * size.n_moe == experts
    k, e = cfg.moe.top_k, cfg.moe.num_experts
    assert size.active == size.total - experts * (e - k) // e


def test_flops_per_token_by_hand():
    cfg = load_config("tiny", ["launch.workers=1"])  # d 128, 4 layers, 8 experts top-2, d_ffn 256, V 256, S 128
    d, layers, f, v, s = 128, 4, 256, 256, 128
    matmul = layers * (4 * d * d + d * 8 + 2 * 3 * d * f) + v * d  # attention, router, 2 experts; LM head
    assert model_size(cfg).matmul_active == matmul
    assert train_flops_per_token(cfg) == 6 * matmul + 12 * layers * d * s


def test_peak_tflops_from_config_or_table(monkeypatch):
    cpu = torch.device("cpu")
    assert peak_tflops(load_config("tiny", ["launch.workers=1"]), cpu) == 0.0  # CPU: no table entry
    assert peak_tflops(load_config("tiny", ["launch.workers=1", "train.peak_tflops=2.5"]), cpu) == 2.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA GH200 480GB")
    cfg = load_config("tiny", ["launch.workers=1", "train.precision=bf16"])
    assert peak_tflops(cfg, torch.device("cuda", 0)) == 989.4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA A100-SXM4-80GB")
    assert peak_tflops(load_config("tiny", ["launch.workers=1"]), torch.device("cuda", 0)) == 19.5


def test_log_line_shows_throughput_and_memory():
    rec = {"step": 9, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 1000.0, "step_ms": 512.0, "tflops_per_rank": 0.5,
           "mfu": 0.25, "peak_memory_mib": [100.0, 300.0]}
    line = format_log(rec)
    assert "step 512ms" in line and "TFLOP/s/rank 0.5 MFU 25.0%" in line and "mem max 300MiB" in line
