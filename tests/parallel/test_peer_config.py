"""Peer strategies (deepspeed_moe, megatron_moe): config refusals before any process starts, lazy imports."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sparsetrain.config import ConfigError, load_config
from sparsetrain.parallel.mesh import DistInfo
from tests.test_cli import ROOT, cli

pytestmark = [pytest.mark.unit]


def test_megatron_moe_on_cpu_is_one_line_error_before_anything_starts():
    r = cli("train", "--config", "configs/tiny.yaml", "--set", "parallel.strategy=megatron_moe",
            "--set", "train.device=cpu")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "megatron_moe runs only on CUDA GPUs" in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_megatron_moe_refused_without_gpu():
    with pytest.raises(ConfigError, match="megatron_moe runs only on CUDA GPUs"):
        load_config("tiny", ["parallel.strategy=megatron_moe"])  # train.device=auto, no GPU here
    pytest.importorskip("megatron.core")
    from sparsetrain.parallel.peers.megatron_moe import MegatronMoE

    cfg = load_config("tiny", ["parallel.strategy=ep"])
    with pytest.raises(ValueError, match="megatron_moe runs only on CUDA GPUs"):
        MegatronMoE(cfg, DistInfo(device=torch.device("cpu")))


@pytest.mark.parametrize("override,match", [
    ("moe.top_k=3", "top_k 1 or 2"),
    ("parallel.deepspeed.zero_stage=3", "zero_stage=3"),
    ("checkpoint.every=10", "checkpoint.every=0"),
    ("moe.balance=aux_free", "aux_free"),
])
def test_deepspeed_moe_config_refusals(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", ["parallel.strategy=deepspeed_moe", "launch.workers=2", override])


def test_routing_workloads_deepspeed_follows_them_megatron_refuses():
    """DeepSpeed's gate is made to follow the workload quotas (deepspeed_gate.py); Megatron's router is not."""
    cfg = load_config("tiny", ["parallel.strategy=deepspeed_moe", "launch.workers=2", "moe.router_skew=1.2",
                               "moe.skew_drift_every=10"])
    assert cfg.moe.router_skew == 1.2
    for wl in ("moe.router_skew=1.2", "moe.routing_trace=benchmarks/traces/aux_on.jsonl"):
        with pytest.raises(ConfigError, match="does not follow routing workloads"):
            load_config("tiny", ["parallel.strategy=megatron_moe", "train.device=cuda", "moe.num_experts=16", wl])


def test_core_never_imports_the_peers():
    """Building the core strategies leaves DeepSpeed and Megatron-Core unimported."""
    code = ("import sys; from sparsetrain.config import load_config; from sparsetrain.parallel import STRATEGIES; "
            "import sparsetrain.parallel.fssdp, sparsetrain.parallel.ep; "
            "assert 'deepspeed_moe' in STRATEGIES and 'megatron_moe' in STRATEGIES; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'megatron')]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("reduce,want", [("fp32", None), ("bf16", "bf16")])
def test_deepspeed_engine_reduces_in_grad_reduce_dtype(reduce, want):
    """train.grad_reduce_dtype reaches DeepSpeed's gradient all-reduce (`communication_data_type`), as it does
    every sparsetrain strategy's (it was silently fp32)."""
    pytest.importorskip("deepspeed")
    from sparsetrain.parallel.mesh import DistInfo
    from sparsetrain.parallel.peers.deepspeed_moe import DeepSpeedMoE

    cfg = load_config("tiny", ["parallel.strategy=deepspeed_moe", f"train.grad_reduce_dtype={reduce}"])
    ds = DeepSpeedMoE(cfg, DistInfo()).ds_config()
    assert ds.get("communication_data_type") == want
    assert ds["train_batch_size"] == cfg.data.batch_size and ds["zero_optimization"]["stage"] >= 0
