"""Shared pieces of the strategy-vs-single-process parity tests."""
from __future__ import annotations

import os
from typing import Any

import torch

from sparsetrain.config import Config, config_from_dict, load_config, to_dict

SMALL = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.seq_len=32",
    "moe.num_experts=8", "moe.top_k=2", "moe.d_ffn=64", "data.batch_size=8", "data.eval_batches=2",
    "train.eval_every=0", "train.log_every=1", "train.warmup_steps=2", "train.progress=false",
    "checkpoint.save_final=false", "checkpoint.resume=false", "launch.torch_threads=1",
    # parity runs exercise the copy machinery at shapes where copies would not pay (tests/parallel/test_copy_cost.py
    # and test_fssdp_no_copies.py cover the gate)
    "parallel.fssdp.cost_gate=false",
]


def small_config(*overrides: str, steps: int = 5) -> dict:
    """A tiny fp32 config dict for parity runs (world-independent batch)."""
    cfg = load_config("tiny", SMALL + [f"train.steps={steps}", "launch.workers=1", *overrides])
    return to_dict(cfg)


def train_and_collect(cfg_dict: dict, out_dir: str) -> dict[str, Any]:
    """Build a Trainer from cfg_dict on the current process group, train, return losses and full params."""
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.train.state import full_model_state
    from sparsetrain.train.trainer import Trainer

    cfg_dict = {**cfg_dict, "train": {**cfg_dict["train"], "out_dir": out_dir}}
    cfg: Config = config_from_dict(cfg_dict)
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    tr = Trainer(cfg, info)
    tr.fit()
    losses = [r["loss"] for r in tr.history]
    state = full_model_state(tr.model)
    extra = {k: v for k, v in tr.history[-1].items() if isinstance(v, (int, float))} if tr.history else {}
    reshards = getattr(tr.strategy, "reshards", 0)
    return {"losses": losses, "state": state, "last": extra, "rank": int(os.environ.get("RANK", "0")),
            "reshards": reshards, "reshard_moves": getattr(tr.strategy, "reshard_moves", 0),
            "early_reshards": getattr(tr.strategy, "early_reshards", 0), "sprs_posted": dict(getattr(tr.strategy, "sprs_posted", {})),
            "regather_skipped": getattr(tr.strategy, "regather_skipped", 0)}


def run_reference(cfg_dict: dict, out_dir: str) -> dict[str, Any]:
    """Single-process run with strategy none on the same global batch."""
    ref = {**cfg_dict, "parallel": {**cfg_dict["parallel"], "strategy": "none"}}
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ[k] = v
    return train_and_collect(ref, out_dir)


def assert_same_training(ref: dict, got: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Per-step losses and every final parameter match within tolerance."""
    assert len(ref["losses"]) == len(got["losses"]), (ref["losses"], got["losses"])
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=atol)
    model_keys = [k for k in ref["state"] if k.startswith("model.") and "rope" not in k]
    assert set(model_keys) <= set(got["state"]), sorted(set(model_keys) - set(got["state"]))[:5]
    for k in model_keys:
        torch.testing.assert_close(got["state"][k], ref["state"][k], rtol=rtol * 10, atol=atol * 10, msg=k)


def _parity_body(rank: int, world: int, cfg: dict, out: str, fp64: bool = False) -> dict:
    if fp64:
        torch.set_default_dtype(torch.float64)
    res = train_and_collect(cfg, out)
    return res if rank == 0 else {"losses": res["losses"]}


def run_parity(world: int, cfg: dict, tmp: Any, rtol: float = 1e-5, atol: float = 1e-6, fp64: bool = False,
               ref_cfg: dict | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train cfg on `world` gloo ranks and ref_cfg (default: cfg) on one process; losses and final parameters
    must agree and every rank must see the same losses. Returns (single-process result, rank 0's result).

    fp64: build and train both sides in float64 -- for discontinuous routing (quota workloads, capacity drops)
    where fp32 reassociation between the sharded and single-process GEMMs can reorder near-equal gate
    scores and the difference then grows through Adam; in fp64 it cannot, so the logic is what is compared.
    """
    from tests.dist_utils import run_distributed

    default = torch.get_default_dtype()
    if fp64:
        torch.set_default_dtype(torch.float64)
    try:
        ref = run_reference(cfg if ref_cfg is None else ref_cfg, str(tmp / "ref"))
    finally:
        torch.set_default_dtype(default)
    results = run_distributed(_parity_body, world, cfg, str(tmp / "dist"), fp64)
    assert_same_training(ref, results[0], rtol=rtol, atol=atol)
    for r in results[1:]:
        assert r["losses"] == results[0]["losses"]
    return ref, results[0]


def check_parity(world: int, cfg: dict, tmp: Any, rtol: float = 1e-5, atol: float = 1e-6,
                 fp64: bool = False) -> dict[str, Any]:
    """`run_parity` with the same config on both sides; returns rank 0's result."""
    return run_parity(world, cfg, tmp, rtol=rtol, atol=atol, fp64=fp64)[1]
