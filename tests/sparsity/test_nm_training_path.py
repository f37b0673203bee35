"""N:M kernels in the training path: tiny training with the Triton path (TRITON_INTERPRET=1, one subprocess so
the env is set before triton loads) matches the reference path; weights are prepared once per optimizer step;
mask decay (beta > 0) runs dense until the masks are exact."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsetrain.config import load_config
from sparsetrain.model.gpt import build_model
from sparsetrain.sparsity import NMConfig, nm_sparsifier, sparsify_

pytestmark = [pytest.mark.unit]

triton_only = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("_nm_train_checks.py")
    proc = subprocess.run([sys.executable, str(script)], check=False, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@triton_only
def test_triton_training_matches_reference(results: dict) -> None:
    for decay in (0, 1):
        assert results[f"loss_diff_{decay}"] < 1e-5, results
        assert results[f"param_diff_{decay}"] < 1e-4, results


@triton_only
def test_prepared_once_per_optimizer_step_not_per_call(results: dict) -> None:
    # 1 layer: 4 attention linears + 3 expert stacks x 4 experts = 16 prepared weights per step,
    # although every step runs 2 micro-batches (each weight used twice forward and twice backward)
    assert results["prepares_0"] == [16, 32], results
    assert results["calls_0"] == {"triton": 2 * 2 * 7}, results


@triton_only
def test_mask_decay_runs_dense_until_masks_are_exact(results: dict) -> None:
    assert results["prepares_1"] == [0, 16], results  # beta > 0 at step 0: no N:M form, dense GEMMs
    assert results["calls_1"] == {"dense": 2 * 7, "triton": 2 * 7}, results


def test_auto_stays_dense_on_cpu_bitwise() -> None:
    cfg = load_config("tiny", ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=16",
                               "model.vocab_size=64", "moe.num_experts=4", "moe.d_ffn=32"])
    x = torch.randint(0, 64, (2, 16))
    losses = []
    for kernel in ("reference", "auto"):
        model = build_model(cfg)
        sparsify_(model, NMConfig(modules=["experts", "attn"], kernel=kernel))
        out = model(x, x)
        out.loss.backward()
        losses.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        sp = nm_sparsifier(model)
        if kernel == "auto":
            assert sp.compute.calls == {"dense": 7} and sp.compute.prepares == 0
        else:
            assert sp.compute is None
    assert torch.equal(losses[0][0], losses[1][0])
    assert all(torch.equal(losses[0][1][n], losses[1][1][n]) for n in losses[0][1])
    with pytest.raises(ValueError, match="kernel"):
        NMConfig(kernel="fast")


def test_dense_expert_gemms_get_stacks_in_the_autocast_dtype(monkeypatch) -> None:
    """Under bf16 autocast the masked fp32 expert stacks reach the grouped GEMM in bf16 (it takes bf16 only on
    CUDA sm90+; fp32 stacks fell back to one matmul per expert), and gradients land in the fp32 originals."""
    from sparsetrain.sparsity import nm_compute

    seen = []
    real = nm_compute.grouped_linear
    monkeypatch.setattr(nm_compute, "grouped_linear",
                        lambda x, w, c: (seen.append((x.dtype, w.dtype)), real(x, w, c))[1])
    cfg = load_config("tiny", ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=16",
                               "model.vocab_size=64", "moe.num_experts=4", "moe.d_ffn=32"])
    model = build_model(cfg)
    sparsify_(model, NMConfig(modules=["experts"], kernel="auto"))
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, x)
    out.loss.backward()
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
