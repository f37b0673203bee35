"""`memory_plan`: activation bytes vs the tensors autograd really saves, and totals by strategy."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.config import load_config
from sparsetrain.parallel.memory_plan import _activation_bytes, memory_plan

pytestmark = [pytest.mark.unit]


@pytest.mark.parametrize("over", [
    ["model.d_model=64", "moe.d_ffn=128"],
    ["model.d_model=96", "model.n_heads=3", "moe.d_ffn=256", "moe.top_k=1", "moe.num_experts=16"],
    ["model.d_model=64", "moe.d_ffn=64", "model.vocab_size=512", "model.seq_len=64"],
    ["model.d_model=128", "moe.d_ffn=512", "model.vocab_size=512", "train.precision=bf16"],
])
def test_activation_bytes_match_memtracker(over):
    """Saved activations of one forward (MemTracker's ACT bytes at the end of forward) vs the formula; under
    bf16 autocast MemTracker also counts the cached bf16 weight casts (the plan's compute_copies)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from sparsetrain.model.gpt import build_model

    cfg = load_config("tiny", ["launch.workers=1", "parallel.strategy=none", "model.n_layers=2", *over])
    model = build_model(cfg)
    b, s = 4, cfg.model.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (b, s))
    tracker = MemTracker()
    tracker.track_external(model)
    bf16 = cfg.train.precision == "bf16"
    with tracker:
        before = tracker.get_tracker_snapshot("current")[torch.device("cpu")][_MemRefType.ACT]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, x)
        after = tracker.get_tracker_snapshot("current")[torch.device("cpu")][_MemRefType.ACT]
        (out.loss + out.aux_loss + out.z_loss).backward()
    blocks, head, _ = _activation_bytes(cfg, b * s, float(b * s * cfg.moe.top_k), 2 if bf16 else 4)
    planned = sum(blocks) + head + (memory_plan(cfg, device="cpu").ranks[0].compute_copies if bf16 else 0)
    assert planned == pytest.approx(after - before, rel=0.05), (planned, after - before)


def test_strategies_hold_what_they_own():
    base = ["launch.workers=4", "model.d_model=256", "moe.num_experts=16", "moe.d_ffn=1024", "train.device=cuda"]
    ep = memory_plan(load_config("tiny", base + ["parallel.strategy=ep"]))
    dp = memory_plan(load_config("tiny", base + ["parallel.strategy=dp"]))
    fs = memory_plan(load_config("tiny", base + ["parallel.strategy=fssdp", "parallel.fssdp.overlap_budget=2"]))
    # hecate copies the t hottest experts everywhere; on a GPU the model-derived t of this tiny attention is 0
    assert sum(r.expert_copies for r in memory_plan(load_config("tiny", base + ["parallel.strategy=fssdp"])).ranks) == 0
    per_expert = 3 * 256 * 1024 * 4 * 4  # fp32 bytes of one expert in all 4 layers
    # dp under FSDP2 (default) shards the replicated experts with the blocks: 1/4 of them per rank, like EP,
    # and gathers a whole MoE block, its 16 experts included; under ddp every rank holds all 16
    assert dp.ranks[0].params == ep.ranks[0].params and dp.ranks[0].gathered_dense > ep.ranks[0].gathered_dense
    ddp = ["parallel.dense=ddp"]
    dp_ddp = memory_plan(load_config("tiny", base + ddp + ["parallel.strategy=dp"]))
    ep_ddp = memory_plan(load_config("tiny", base + ddp + ["parallel.strategy=ep"]))
    assert dp_ddp.ranks[0].params - ep_ddp.ranks[0].params == pytest.approx(12 * per_expert, rel=1e-6)  # 16 vs 4
    assert fs.ranks[0].params == ep.ranks[0].params  # FSSDP owns like EP; copies are extra
    assert sum(r.expert_copies for r in fs.ranks) > 0 and fs.max_mib > ep.max_mib
    keep = memory_plan(load_config("tiny", base + ["parallel.strategy=fssdp", "parallel.fssdp.overlap_budget=2",
                                                   "parallel.fssdp.keep_materialized=true"]))
    assert max(r.gathered_experts for r in keep.ranks) == 2 * max(r.gathered_experts for r in fs.ranks)  # 4 layers vs 2
    bf16 = memory_plan(load_config("tiny", base + ["parallel.strategy=ep", "train.precision=bf16"]))
    r32, r16 = ep.ranks[0], bf16.ranks[0]
    assert r16.params == r32.params and r16.optimizer == r32.optimizer  # fp32 master weights and Adam state
    assert r16.compute_copies == r32.params // 2 and r16.activations < r32.activations


def test_offload_moves_activations_to_host_on_cuda():
    base = ["launch.workers=1", "parallel.strategy=none", "model.n_layers=8", "train.device=cuda"]
    plain = memory_plan(load_config("tiny", base)).ranks[0]
    off = memory_plan(load_config("tiny", base + ["offload.enabled=true"])).ranks[0]
    assert off.activations < plain.activations and off.offloaded > 0
    assert off.activations + off.offloaded == plain.activations
    ckpt = memory_plan(load_config("tiny", base + ["offload.enabled=true",
                                                   "offload.checkpoint_activations=true"])).ranks[0]
    assert ckpt.activations + ckpt.offloaded < plain.activations / 4  # only block inputs are saved


def test_plan_json_has_memory_per_rank():
    import json

    from sparsetrain.parallel.plan_report import plan_json

    out = json.loads(plan_json(load_config("tiny", ["launch.workers=4"])))
    assert len(out["memory_mib_per_rank"]) == 4 and out["params_total"] == 3445888
    assert out["ranks"][0]["peak"] / 2**20 == pytest.approx(out["memory_mib_per_rank"][0], abs=0.1)


def test_cli_plan_json():
    import json

    from typer.testing import CliRunner

    from sparsetrain.cli import app

    res = CliRunner().invoke(app, ["plan", "-c", "gpt-moe-l", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert len(out["memory_mib_per_rank"]) == 64 and out["fits_80gib_10pct_headroom"]
    assert out["max_mib"] <= 80 * 1024 * 0.9
