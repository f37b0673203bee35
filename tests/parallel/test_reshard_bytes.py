"""Re-sharding moves: `move_ownership` sends per moved expert its params and Adam state (what the re-shard gate
counts), delivers exactly the old owner's rows, and leaves layers without moves alone."""
from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

pytestmark = [pytest.mark.distributed]

OLD = [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
NEW = [[1, 0, 0, 0, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]]  # layer 0: swap experts 0 and 3; layer 1: rank 0
# sends 2, gets 2; layer 2: no moves


def _rows(layers, opt) -> dict:
    """(layer, expert, weight) -> (param, exp_avg, exp_avg_sq) rows this rank holds."""
    from sparsetrain.model.experts import EXPERT_WEIGHTS

    return {(li, e, w): tuple(t[i].clone() for t in (getattr(m, w).detach(), opt.state[getattr(m, w)]["exp_avg"],
                                                       opt.state[getattr(m, w)]["exp_avg_sq"]))
            for li, m in enumerate(layers) for i, e in enumerate(m.expert_ids) for w in EXPERT_WEIGHTS}


def _body(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    from sparsetrain.model.experts import GroupedExperts
    from sparsetrain.parallel.ep import keep_expert_rows
    from sparsetrain.parallel.reshard import move_ownership, moved_bytes_per_expert
    from sparsetrain.telemetry.comm import COMM

    torch.manual_seed(0)
    layers = [GroupedExperts(6, 8, 16) for _ in OLD]
    for mod, owners in zip(layers, OLD):
        mod.reset_parameters(0.02, 0.02)
        keep_expert_rows(mod, [e for e, o in enumerate(owners) if o == rank])
    opt = torch.optim.AdamW([p for m in layers for p in m.parameters()], lr=1e-3)
    sum(p.sum() for m in layers for p in m.parameters()).backward()
    opt.step()
    before, kept = _rows(layers, opt), layers[2].w1
    COMM.reset()
    opt, _ = move_ownership(layers, opt, OLD, NEW, rank, dist.group.WORLD)
    sent = COMM.snapshot()
    return {"sent": sent.get("reshard", 0), "as_copies": sent.get("spag", 0), "per_expert": moved_bytes_per_expert(layers[0]),
            "ids": [m.expert_ids for m in layers], "before": before, "after": _rows(layers, opt),
            "untouched": layers[2].w1 is kept}


def test_moved_bytes_equal_what_move_ownership_sends():
    from sparsetrain.parallel.copy_cost import reshard_cost_s

    got = run_distributed(_body, 2, timeout=300)
    per = got[0]["per_expert"]
    assert per == 3 * 3 * 8 * 16 * 4  # (w1, w2, w3) x (param, exp_avg, exp_avg_sq) x d x f x fp32
    assert [r["sent"] for r in got] == [3 * per, 3 * per]  # rank 0 sends expert 0, then 1 and 2; rank 1 likewise
    assert [r["as_copies"] for r in got] == [0, 0]  # counted as 'reshard', not as expert-copy spAG traffic
    assert got[0]["ids"] == [[1, 2, 3], [0, 4, 5], [0, 1, 2]] and got[1]["ids"] == [[0, 4, 5], [1, 2, 3], [3, 4, 5]]
    for r in got:  # every row after the move is the old owner's row before it: params and both Adam moments
        assert r["untouched"]  # a layer without moves keeps its Parameters
        for (li, e, w), now in r["after"].items():
            old = got[OLD[li][e]]["before"][(li, e, w)]
            assert all(torch.equal(a, b) for a, b in zip(now, old)), (li, e, w)
    # the gate's cost: one transfer per layer, as long as its busiest rank's moves (1, then 2)
    assert reshard_cost_s(OLD, NEW, 2, per, 1e6) == pytest.approx(3 * per / 1e6)
