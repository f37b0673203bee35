"""Resume checks the config (model-defining keys refused, run control logged); FSSDP crash+resume is bit-exact."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from sparsetrain.config import to_dict
from sparsetrain.parallel.placement import initial_owners
from sparsetrain.train import checkpoint as ckpt
from sparsetrain.train.checkpoint import CheckpointError
from sparsetrain.train.fingerprint import MODEL_DEFINING, compare, fingerprint
from tests.dist_utils import run_distributed
from tests.parity_utils import small_config
from tests.test_cli import TINY, _sets, cli
from tests.train.test_checkpoint import _run
from tests.train.test_trainer import tiny_cfg

RESUME = ["checkpoint.every=3", "checkpoint.resume=true", "moe.num_experts=4"]


def _with_checkpoint(src, dst) -> None:
    shutil.copytree(src / "checkpoints" / "step_00000005", dst / "checkpoints" / "step_00000005")


@pytest.mark.unit
def test_fingerprint_saved_and_compare():
    cfg = to_dict(tiny_cfg("/tmp/x", *RESUME))
    fp = fingerprint(cfg)
    assert fp["keys"]["moe.num_experts"] == 4 and set(fp["keys"]) <= set(MODEL_DEFINING)
    other = json.loads(json.dumps(cfg))
    other["train"]["lr"], other["moe"]["top_k"] = 1e-4, 1
    assert fingerprint(other)["sha256"] != fp["sha256"]
    refused, changed = compare(cfg, other)
    assert refused == ["moe.top_k 2 -> 1"] and changed == ["train.lr 0.003 -> 0.0001"]
    other = json.loads(json.dumps(cfg))
    other["sparsity"]["n"], other["sparsity"]["modules"] = 1, []  # the recipe of a sparsity that is off
    assert compare(cfg, other) == ([], ['sparsity.modules ["experts"] -> []', "sparsity.n 2 -> 1"])
    other["sparsity"]["enabled"] = True
    assert compare(cfg, other)[0] == ["sparsity.enabled False -> True", 'sparsity.modules ["experts"] -> []',
                                      "sparsity.n 2 -> 1"]


@pytest.mark.unit
def test_model_defining_change_refused_listing_keys(tmp_path, six_steps):
    out, _ = six_steps
    _with_checkpoint(out, tmp_path)
    extra = json.loads((tmp_path / "checkpoints" / "step_00000005" / ckpt.EXTRA).read_text())
    assert extra["fingerprint"]["keys"]["moe.num_experts"] == 4
    cfg = tiny_cfg(tmp_path, *RESUME, "moe.top_k=1", "model.n_layers=4", steps=8)
    want = r"belongs to a different model: model.n_layers 2 -> 4, moe.top_k 2 -> 1; resume with"
    with pytest.raises(CheckpointError, match=want):
        ckpt.preflight_resume(to_dict(cfg))  # what the CLI runs before any process starts
    with pytest.raises(CheckpointError, match=want):
        _run(cfg)  # and the ranks, after verifying the checkpoint
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(CheckpointError, match="checkpoint.resume=false, but .* already holds checkpoints"):
        ckpt.preflight_resume(to_dict(tiny_cfg(tmp_path, *RESUME, "moe.top_k=1", "checkpoint.resume=false")))


@pytest.mark.unit
def test_eval_load_of_other_model_lists_keys(tmp_path, six_steps):
    from sparsetrain.model.gpt import build_model

    out, _ = six_steps
    path = out / "checkpoints" / "step_00000005"
    cfg = tiny_cfg(tmp_path, *RESUME, "model.d_model=64", "parallel.strategy=none")
    with pytest.raises(CheckpointError, match=r"different model: model.d_model 32 -> 64; use the config it was"):
        ckpt.load_checkpoint(path, build_model(cfg), None, cfg_dict=to_dict(cfg))
    same = tiny_cfg(tmp_path, *RESUME, "train.lr=0.5")  # run-control differences do not matter to eval
    ckpt.load_checkpoint(path, build_model(same), None, cfg_dict=to_dict(same))


@pytest.mark.unit
def test_run_control_change_allowed_and_logged(tmp_path, six_steps, capsys):
    out, _ = six_steps
    _with_checkpoint(out, tmp_path)
    tr = _run(tiny_cfg(tmp_path, *RESUME, "train.lr=0.001", "train.seed=7", "train.log_every=2", steps=7))
    assert tr.start_step == 6 and [r["step"] for r in tr.history] == [6]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("config changed")]
    want = ("config changed since step_00000005 (run control, allowed): train.log_every 1 -> 2; "
            "train.lr 0.003 -> 0.001; train.seed 1337 -> 7; train.steps 6 -> 7")
    assert lines == [want], lines


@pytest.mark.unit
def test_cli_refuses_other_model_before_starting(tmp_path, six_steps):
    out, _ = six_steps
    _with_checkpoint(out, tmp_path)
    r = cli("train", "-c", "tiny", *_sets(TINY), "--set", f"train.out_dir={tmp_path}", "--set", "moe.num_experts=8",
            "--set", "checkpoint.resume=true")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "moe.num_experts 4 -> 8" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / ".sparsetrain.lock").exists() and not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------ FSSDP: crash + resume, bit-exact

FSSDP = ["parallel.strategy=fssdp", "parallel.fssdp.reshard_every=1", "moe.router_skew=1.6", "checkpoint.every=5"]


def _crash_resume_body(rank: int, world: int, cfg: dict, tmp: str) -> dict:
    from sparsetrain.config import config_from_dict
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.train.state import full_model_state
    from sparsetrain.train.trainer import Trainer

    torch.set_num_threads(1)
    info = init_distributed("cpu")

    def trainer(out: str, resume: bool) -> Trainer:
        d = json.loads(json.dumps(cfg))
        d["train"]["out_dir"], d["checkpoint"]["resume"] = out, resume
        return Trainer(config_from_dict(d), info)

    full = trainer(f"{tmp}/full", False)
    full.fit()
    first = trainer(f"{tmp}/crash", True)
    step_fn = first.train_step

    def dies_after_step_6(step: int) -> dict:
        if step > 6:
            raise KeyboardInterrupt  # a crash between checkpoints: steps 5-6 are lost, step 4 is committed
        return step_fn(step)

    first.train_step = dies_after_step_6
    try:
        first.fit()
    except KeyboardInterrupt:
        pass
    saved = json.loads((ckpt.step_dir(first.ckpt_dir, 4) / ckpt.EXTRA).read_text())["strategy"]
    second = trainer(f"{tmp}/crash", True)
    second.fit()
    return {"full": full_model_state(full.model), "resumed": full_model_state(second.model),
            "losses": ([r["loss"] for r in full.history][5:], [r["loss"] for r in second.history]),
            "start": second.start_step, "saved_owners": saved["owners"], "reshards": (full.strategy.reshards,
                                                                                      second.strategy.reshards),
            "owners": (full.strategy.owners, second.strategy.owners), "budget": saved["overlap_budget"],
            "early": (full.strategy.early_reshards, second.strategy.early_reshards)}


# the hot set moves every 3 steps, scheduled re-shards every 4: early re-shards happen between them
FSSDP_EARLY = ["parallel.strategy=fssdp", "parallel.fssdp.reshard_every=4", "parallel.fssdp.reshard_early=true",
               "moe.router_skew=1.6", "moe.skew_drift_every=3", "checkpoint.every=5"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("overrides", [FSSDP, FSSDP_EARLY], ids=["every_step", "early"])
def test_fssdp_crash_resume_bit_exact(tmp_path, overrides):
    """FSSDP with re-sharding: 8 steps straight == 7 steps, crash, resume from step 4's checkpoint to 8.

    The default overlap budget (-1) comes from the cost model, fixed at set-up (no timing), so runs are
    deterministic; the budget and bandwidth are saved and restored all the same (fssdp_state). Early
    re-shards depend only on the tracked loads, which the checkpoint carries.
    """
    cfg = small_config(*overrides, steps=8)
    res = run_distributed(_crash_resume_body, 2, cfg, str(tmp_path), timeout=600)
    for r in res:
        assert r["start"] == 5
        assert r["saved_owners"] != [initial_owners(8, 2)] * 2, "no re-shard before the checkpoint: test is moot"
        assert r["reshards"][0] == r["reshards"][1] and r["owners"][0] == r["owners"][1]
        assert r["early"][0] == r["early"][1] and (r["early"][0] >= 1) == ("reshard_early=true" in str(overrides))
        assert r["losses"][0] == r["losses"][1], r["losses"]
        assert r["full"].keys() == r["resumed"].keys()
        for k, v in r["full"].items():
            assert torch.equal(v, r["resumed"][k]), k


def _measured_numbers_body(rank: int, world: int, cfg: dict, tmp: str) -> dict:
    from unittest import mock

    from sparsetrain.config import config_from_dict
    from sparsetrain.parallel import fssdp_machine
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.train.trainer import Trainer

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    first = Trainer(config_from_dict(cfg), info)
    first.fit()
    measured = (first.strategy.bandwidth, first.strategy.expert_flops)
    d = json.loads(json.dumps(cfg))
    d["checkpoint"]["resume"], d["train"]["steps"] = True, 4
    with mock.patch.object(fssdp_machine, "measure_expert_flops", return_value=1.0), \
            mock.patch.object(fssdp_machine, "measure_bandwidth", return_value=1.0):
        second = Trainer(config_from_dict(d), info)  # a restart on a machine that would now measure 1.0
        second.fit()
    return {"measured": measured, "resumed": (second.strategy.bandwidth, second.strategy.expert_flops),
            "start": second.start_step}


@pytest.mark.distributed
def test_fssdp_measured_machine_numbers_restored_on_resume(tmp_path):
    """link_GBps / expert_TFLOPs = -1 are measured once per job: a resumed run plans with the numbers saved
    in the checkpoint, not with a fresh (different) measurement."""
    cfg = small_config("parallel.strategy=fssdp", "parallel.fssdp.link_GBps=-1", "parallel.fssdp.expert_TFLOPs=-1",
                       "checkpoint.every=2", steps=2)
    cfg["train"]["out_dir"] = str(tmp_path / "run")
    for r in run_distributed(_measured_numbers_body, 2, cfg, str(tmp_path), timeout=600):
        bw, flops = r["measured"]
        assert bw > 1.0 and flops > 1.0 and r["start"] == 2
        assert r["resumed"] == (bw, flops)
