"""`sparsetrain plan`: memory per rank and first placement, without processes."""
from __future__ import annotations

import pytest

from sparsetrain.config import load_config
from sparsetrain.parallel.plan_report import initial_placement, layer_sizes, plan_report

pytestmark = [pytest.mark.unit]


def test_plan_report_lists_every_rank_and_expert():
    # t = 2 chunks hidden under attention (a GPU-like budget; this CPU's own numbers give t = 0: no copies)
    cfg = load_config("tiny", ["launch.workers=4", "moe.router_skew=1.2", "parallel.fssdp.overlap_budget=2"])
    text = plan_report(cfg)
    assert "4 ranks (2 nodes x 2)" in text
    rank_rows = [ln for ln in text.splitlines() if ln[:4].strip().isdigit() and "  " in ln and ln.count(".") >= 4]
    assert len(rank_rows) == 4
    _topo, _owners, placement, loads = initial_placement(cfg, 4)
    placement.validate(4)
    hottest = int(loads.argmax())  # Zipf over a seeded permutation: the hottest is copied to every rank (t <= m)
    assert placement.copies[hottest] == (0, 1, 2, 3)
    assert f"{placement.spag_bytes(layer_sizes(cfg)[1] * 4) / 2**20:.2f} MiB" in text


def test_layer_sizes_match_the_model():
    from sparsetrain.model.gpt import build_model

    cfg = load_config("tiny", ["launch.workers=1"])
    dense, per_expert, n_moe = layer_sizes(cfg)
    model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert dense + per_expert * n_moe * cfg.moe.num_experts == total
