"""Per-step collectives with parallel.dense=ddp: EP's aux-loss counts ride in the dispatch's count exchange (no
count all-reduce in the forward; they equal an explicit all-reduce of the ranks' counts), and the step's numbers
ride in the dense gradient all-reduce (one all-reduce per step, as in a minimal DDP loop)."""
from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.parity_utils import small_config

pytestmark = [pytest.mark.distributed]


def _body(rank: int, world: int, cfg_dict: dict, out: str, steps: int, fused: bool = True) -> dict:
    import torch
    import torch.distributed as dist

    from sparsetrain.config import config_from_dict
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.train.trainer import Trainer

    cfg_dict = {**cfg_dict, "train": {**cfg_dict["train"], "out_dir": out}}
    tr = Trainer(config_from_dict(cfg_dict), init_distributed("cpu"))
    tr.strategy.fuses_step_reduction = fused  # False: finish_backward, then the separate step reduction
    calls = {"all_reduce": 0, "all_to_all_single": 0}
    for name in calls:
        fn = getattr(dist, name)

        def wrapped(*a, _fn=fn, _name=name, **kw):
            calls[_name] += 1
            return _fn(*a, **kw)

        setattr(dist, name, wrapped)
    per_step, recs = [], []
    for step in range(steps):
        before = dict(calls)
        rec = tr.train_step(step)
        recs.append([rec["loss"], rec["aux_loss"], rec["grad_norm"]])
        per_step.append({k: calls[k] - before[k] for k in calls})
    x, y = tr.data.train_batch(steps)
    out = tr.model(x, y)  # the forward's global counts, and the ranks' own counts reduced explicitly
    local = out.tokens_per_expert.float().clone()
    dist.all_reduce(local)
    return {"calls": per_step, "same": bool(torch.equal(out.global_tokens_per_expert.float(), local)),
            "moe_layers": len(tr.model.moe_layers()), "recs": recs}


@pytest.mark.parametrize("extra", [[], ["moe.capacity_factor=1.0"]], ids=["dropless", "capacity"])
def test_ep_step_collectives(tmp_path, extra):
    cfg = small_config("parallel.strategy=ep", "parallel.dense=ddp", "train.log_every=100", *extra, steps=3)
    res = run_distributed(_body, 2, cfg, str(tmp_path), 3, timeout=600)
    for r in res:
        assert r["same"]
        for c in r["calls"][1:]:  # step 0 includes set-up
            # per MoE layer: counts, dispatch, combine forward + their two backwards; per step ONE all-reduce:
            # dense gradients + losses, flags, squared expert-grad norm (no count all-reduce for the aux loss)
            assert c == {"all_to_all_single": 5 * r["moe_layers"], "all_reduce": 1}, r["calls"]
    if not extra:  # the fused reduction gives the unfused losses and global grad norm (fp32 vs fp64 sums)
        ref = run_distributed(_body, 2, cfg, str(tmp_path / "unfused"), 3, False, timeout=600)
        assert ref[0]["calls"][1]["all_reduce"] == 2
        got, want = ([v for rec in r[0]["recs"] for v in rec] for r in (res, ref))  # steps x (loss, aux, norm)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_dp_ddp_step_collectives(tmp_path):
    cfg = small_config("parallel.strategy=dp", "parallel.dense=ddp", "train.log_every=100", steps=3)
    res = run_distributed(_body, 2, cfg, str(tmp_path), 3, timeout=600)
    for r in res:
        assert r["same"]
        for c in r["calls"][1:]:  # the forward's one [L, E] count reduction (aux loss) + the fused step one
            assert c == {"all_to_all_single": 0, "all_reduce": 2}, r["calls"]
