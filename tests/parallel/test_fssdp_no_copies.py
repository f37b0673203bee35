"""FSSDP costs nothing when nothing needs copying, and its placement is a function of the seed and config."""
from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.parity_utils import small_config

pytestmark = [pytest.mark.distributed]

DIST_CALLS = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single", "broadcast",
              "batch_isend_irecv", "reduce_scatter_tensor", "barrier")  # not isend/irecv: P2POp checks identity


def _count_collectives() -> dict[str, int]:
    """Count this process's torch.distributed calls by name (test-only wrappers)."""
    import torch.distributed as dist

    counts = dict.fromkeys(DIST_CALLS, 0)
    for name in DIST_CALLS:
        fn = getattr(dist, name)

        def wrapped(*a, _fn=fn, _name=name, **kw):
            counts[_name] += 1
            return _fn(*a, **kw)

        setattr(dist, name, wrapped)
    return counts


def _steps_body(rank: int, world: int, cfg_dict: dict, out: str, steps: int) -> dict:
    from sparsetrain.config import config_from_dict
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.telemetry.comm import COMM
    from sparsetrain.train.state import full_model_state
    from sparsetrain.train.trainer import Trainer

    cfg_dict = {**cfg_dict, "train": {**cfg_dict["train"], "out_dir": out}}
    tr = Trainer(config_from_dict(cfg_dict), init_distributed("cpu"))
    counts = _count_collectives()
    per_step, losses, spag = [], [], 0
    for step in range(steps):
        before = dict(counts)
        COMM.reset()
        losses.append(tr.train_step(step)["loss"])
        spag += COMM.snapshot().get("spag", 0)
        per_step.append({k: counts[k] - before[k] for k in counts if counts[k] != before[k]})
    s = tr.strategy
    placements = [[list(c) for c in p.copies] for p in getattr(s, "placements", [])]
    state = full_model_state(tr.model)  # collective: every rank takes part
    return {"losses": losses, "calls": per_step, "spag": spag, "placements": placements,
            "state": state if rank == 0 else None,
            "gated": getattr(s, "copies_gated", 0), "budget": getattr(s, "overlap_budget", None),
            "reshard": [getattr(s, "reshards", 0), getattr(s, "reshards_gated", 0), getattr(s, "owners", None)]}


def test_fssdp_without_copies_issues_eps_collectives(tmp_path):
    """A placement without copies (the gate refuses them: a link too slow to pay) runs EP's path: no
    collective beyond EP's per step, no spAG, the same losses."""
    common = ["parallel.dense=ddp", "train.log_every=100"]  # log steps add metric reductions: not compared
    fs = small_config("parallel.strategy=fssdp", "parallel.fssdp.cost_gate=true", "parallel.fssdp.link_GBps=1e-6",
                      "parallel.fssdp.reshard_every=0", *common, steps=4)
    ep = small_config("parallel.strategy=ep", *common, steps=4)
    got = run_distributed(_steps_body, 2, fs, str(tmp_path / "fs"), 4, timeout=600)
    ref = run_distributed(_steps_body, 2, ep, str(tmp_path / "ep"), 4, timeout=600)
    assert got[0]["spag"] == 0 and all(len(c) == 1 for p in got[0]["placements"] for c in p)
    for g, r in zip(got, ref):  # step 0 includes set-up; EP also all-reduces expert grads over a 1-rank group
        for gs, rs in zip(g["calls"][1:], r["calls"][1:]):
            assert set(gs) <= set(rs) and all(gs[k] <= rs[k] for k in gs), (g["calls"], r["calls"])
    assert got[0]["losses"] == pytest.approx(ref[0]["losses"], rel=1e-6, abs=1e-6)


# fixed machine numbers (as the device defaults are) under which copies and re-shards pay at these tiny shapes
MACHINE = ["parallel.fssdp.link_GBps=1", "parallel.fssdp.expert_TFLOPs=0.02"]


@pytest.mark.parametrize("extra", [[], ["moe.router_skew=1.2"]], ids=["learned", "skewed"])
def test_fssdp_default_config_is_deterministic(tmp_path, extra):
    """Two runs, one seed, FSSDP's default settings (gate on, budget from the cost model, fixed machine numbers): the same
    placements, losses and parameters, bit for bit."""
    cfg = small_config("parallel.strategy=fssdp", "parallel.fssdp.cost_gate=true", "parallel.fssdp.reshard_every=3",
                       *MACHINE, *extra, steps=6)
    a = run_distributed(_steps_body, 2, cfg, str(tmp_path / "a"), 6, timeout=600)
    b = run_distributed(_steps_body, 2, cfg, str(tmp_path / "b"), 6, timeout=600)
    assert a[0]["losses"] == b[0]["losses"]
    assert a[0]["placements"] == b[0]["placements"] and a[0]["budget"] == b[0]["budget"] >= 0
    for k, v in a[0]["state"].items():
        assert torch.equal(v, b[0]["state"][k]), k
    if extra:  # the skewed case makes copies that pay, so determinism covers the copy path too
        assert a[0]["spag"] > 0


@pytest.mark.parametrize("sets,pays", [(["parallel.fssdp.cost_gate=true", *MACHINE], True),
                                       (["parallel.fssdp.cost_gate=true", "parallel.fssdp.link_GBps=1e-6"], False),
                                       (["parallel.fssdp.link_GBps=1e-6", "parallel.fssdp.cost_gate=false"], True)],
                         ids=["pays", "refused", "gate_off"])
def test_reshard_only_when_it_pays(tmp_path, sets, pays):
    """Skewed routing, a re-shard opportunity every 3 steps: a 1 GB/s link pays for the moves; a link
    so slow that moving one expert takes minutes does not (counted in reshards_gated); without the gate the
    imbalance test alone decides, as before. Every rank takes the same decision."""
    cfg = small_config("parallel.strategy=fssdp", "parallel.fssdp.reshard_every=3", "moe.router_skew=1.2", *sets,
                       steps=6)
    got = run_distributed(_steps_body, 2, cfg, str(tmp_path), 6, timeout=600)
    assert got[0]["reshard"] == got[1]["reshard"]
    reshards, gated, _ = got[0]["reshard"]
    if pays:
        assert reshards >= 1 and gated == 0, got[0]["reshard"]
    else:
        assert reshards == 0 and gated == 2, got[0]["reshard"]  # both opportunities (steps 2 and 5) refused


def _fit_body(rank: int, world: int, cfg_dict: dict, out: str) -> list[dict]:
    import json
    from pathlib import Path

    from sparsetrain.config import config_from_dict
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.train.trainer import Trainer

    cfg_dict = {**cfg_dict, "train": {**cfg_dict["train"], "out_dir": out}}
    tr = Trainer(config_from_dict(cfg_dict), init_distributed("cpu"))
    tr.fit()
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []


def test_logged_reshard_bytes_cover_steps_between_log_steps(tmp_path):
    """A re-shard at step 2 with log steps 3 and 5: the step-3 record carries its bytes as a per-step mean over
    the interval (a record used to hold the log step's bytes only, and `reshard` never reached it)."""
    cfg = small_config("parallel.strategy=fssdp", "parallel.fssdp.reshard_every=3", "moe.router_skew=1.2",
                       "parallel.fssdp.cost_gate=true", *MACHINE, "train.log_every=4", "train.eval_every=0", steps=6)
    recs = run_distributed(_fit_body, 2, cfg, str(tmp_path), timeout=600)[0]
    first = next(r for r in recs if r["step"] == 3)
    assert first["interval_steps"] == 4 and first["reshard_MB"] > 0, first
    assert first["a2a_MB"] > 0
