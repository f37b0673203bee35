"""The CUDA grouped-GEMM regime on CPU: torch._grouped_mm runs on CPU bf16 too, so with its CUDA/sm90 gate opened
the experts run one grouped GEMM per weight and hand back bf16 rows for fp32 tokens under bf16 autocast, as on
an H100/H200. Every dispatcher's combine, exchange and gradient path then meets those dtypes on 2 gloo ranks,
including the token exchanges (ep, fssdp) that one GPU cannot run. CPU autocast promotes mixed-dtype index ops
that CUDA autocast refuses, so the combine's own dtype rule is checked without autocast in
tests/model/test_moe.py (test_combine_takes_the_experts_dtype)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.parity_utils import small_config

pytestmark = pytest.mark.distributed

STRATEGIES = {"dp": ["parallel.strategy=dp"], "ep-capacity": ["parallel.strategy=ep", "moe.capacity_factor=1.0"],
              "fssdp": ["parallel.strategy=fssdp", "parallel.fssdp.overlap_budget=4", "moe.router_skew=1.2"]}


def _open_the_grouped_mm_gate() -> list[int]:
    """CPU bf16 counts as 'CUDA bf16 sm90+' for the grouped GEMM; returns a list whose [0] counts its calls."""
    from sparsetrain.kernels import grouped

    from sparsetrain.model import experts

    calls = [0]
    real = torch._grouped_mm

    def counting(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    def input_ok(x: torch.Tensor) -> tuple[bool, str]:
        return x.dtype == torch.bfloat16, "CPU bf16 standing in for CUDA sm90+"

    def ok(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> tuple[bool, str]:
        fits = grouped.grouped_mm_dims_ok(x.shape[-1], w.shape[1]) and len(counts) == w.shape[0]
        return x.dtype == w.dtype == torch.bfloat16 and fits, "CPU bf16 standing in for CUDA sm90+"

    def linear(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:  # grouped_linear sans is_cuda
        if ok(x, w, counts)[0]:
            return grouped.grouped_linear_grouped_mm(x, w, counts)
        return grouped.grouped_linear_reference(x, w, counts)

    torch._grouped_mm = counting
    for mod in (grouped, experts):
        mod.grouped_mm_input_eligible, mod.grouped_mm_eligible, mod.grouped_linear = input_ok, ok, linear
    return calls


def _train(rank: int, world: int, cfgs: dict[str, dict], out: str) -> dict:
    from sparsetrain.config import config_from_dict
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.train.trainer import Trainer

    info = init_distributed("cpu")
    res = {}
    for name, d in cfgs.items():
        calls = _open_the_grouped_mm_gate() if name.endswith("grouped") else [0]
        tr = Trainer(config_from_dict({**d, "train": {**d["train"], "out_dir": f"{out}/{name}"}}), info)
        tr.fit()
        res[name] = {"losses": [r["loss"] for r in tr.history], "grouped_calls": calls[0],
                     "param_dtypes": {str(p.dtype) for p in tr.model.parameters()}}
    return res


def test_bf16_experts_output_through_every_dispatcher(tmp_path):
    cfgs = {}
    for name, ov in STRATEGIES.items():
        cfgs[f"{name}-fp32"] = small_config(*ov, steps=3)
        cfgs[f"{name}-grouped"] = small_config(*ov, "train.precision=bf16", steps=3)
    res = run_distributed(_train, 2, cfgs, str(tmp_path), timeout=900)[0]
    for name in STRATEGIES:
        f32, b16 = res[f"{name}-fp32"], res[f"{name}-grouped"]
        assert b16["grouped_calls"] > 0, (name, "the grouped GEMM never ran")
        assert f32["grouped_calls"] == 0
        assert all(math.isfinite(v) for v in b16["losses"]), (name, b16["losses"])
        assert b16["param_dtypes"] == {"torch.float32"}, name  # fp32 masters; bf16 only in compute
        rel = max(abs(a - b) / a for a, b in zip(f32["losses"], b16["losses"]))
        assert rel < 3e-2, (name, f32["losses"], b16["losses"])
