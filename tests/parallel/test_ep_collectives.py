"""EP's per-step collectives: the aux loss's global counts ride in the dispatch's count exchange (no count
all-reduce in the forward), and they equal an explicit all-reduce of the ranks' counts."""
from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.parity_utils import small_config

pytestmark = [pytest.mark.distributed]


def _body(rank: int, world: int, cfg_dict: dict, out: str, steps: int) -> dict:
    import torch
    import torch.distributed as dist

    from sparsetrain.config import config_from_dict
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.train.trainer import Trainer

    cfg_dict = {**cfg_dict, "train": {**cfg_dict["train"], "out_dir": out}}
    tr = Trainer(config_from_dict(cfg_dict), init_distributed("cpu"))
    calls = {"all_reduce": 0, "all_to_all_single": 0}
    for name in calls:
        fn = getattr(dist, name)

        def wrapped(*a, _fn=fn, _name=name, **kw):
            calls[_name] += 1
            return _fn(*a, **kw)

        setattr(dist, name, wrapped)
    per_step = []
    for step in range(steps):
        before = dict(calls)
        tr.train_step(step)
        per_step.append({k: calls[k] - before[k] for k in calls})
    x, y = tr.data.train_batch(steps)
    out = tr.model(x, y)  # the forward's global counts, and the ranks' own counts reduced explicitly
    local = out.tokens_per_expert.float().clone()
    dist.all_reduce(local)
    return {"calls": per_step, "same": bool(torch.equal(out.global_tokens_per_expert.float(), local)),
            "moe_layers": len(tr.model.moe_layers())}


@pytest.mark.parametrize("extra", [[], ["moe.capacity_factor=1.0"]], ids=["dropless", "capacity"])
def test_ep_forward_reduces_no_counts(tmp_path, extra):
    cfg = small_config("parallel.strategy=ep", "parallel.dense=ddp", "train.log_every=100", *extra, steps=3)
    res = run_distributed(_body, 2, cfg, str(tmp_path), 3, timeout=600)
    for r in res:
        assert r["same"]
        for c in r["calls"][1:]:  # step 0 includes set-up
            # per MoE layer: counts, dispatch, combine forward + their two backwards; per step: the dense
            # gradient all-reduce and the trainer's one fused reduction -- no count all-reduce for the aux loss
            assert c == {"all_to_all_single": 5 * r["moe_layers"], "all_reduce": 2}, r["calls"]
