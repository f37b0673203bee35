"""AdamW kernels (`train.optimizer_impl`): each one built as asked, the same update, DTensor and plain
parameters never in one group, and the memory plan's optimizer temporaries per kernel."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetrain.config import ConfigError, load_config
from sparsetrain.parallel.memory_plan import adamw_transient_bytes
from sparsetrain.train.optim import build_optimizer, param_groups
from sparsetrain.train.trainer import Trainer
from tests.train.test_trainer import tiny_cfg

pytestmark = [pytest.mark.unit]


@pytest.mark.parametrize("impl,flags", [("fused", {"fused": True}), ("foreach", {"foreach": True, "fused": None}),
                                        ("for-loop", {"foreach": False, "fused": None})])
def test_optimizer_impl_picks_the_adamw_kernel(tmp_path, impl, flags):
    cfg = tiny_cfg(tmp_path, f"train.optimizer_impl={impl}")
    opt = build_optimizer([("w", nn.Parameter(torch.ones(2, 2))), ("b", nn.Parameter(torch.ones(2)))], cfg.train)
    assert all(g.get(k) == v for g in opt.param_groups for k, v in flags.items())
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.train.weight_decay, 0.0]


def test_unknown_optimizer_impl_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.optimizer_impl.*'apex'.*fused"):
        load_config("tiny", [f"train.out_dir={tmp_path}", "train.optimizer_impl=apex"])


def test_sharded_and_plain_parameters_go_in_separate_groups():
    """A fused / foreach kernel refuses a mix of DTensor and plain tensors in one call (FSDP2 dense + experts)."""
    plain, vec = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(3))
    sharded = nn.Parameter(torch.ones(4, 2))
    sharded.to_local = lambda: sharded  # what marks a DTensor here
    groups = param_groups([("a", plain), ("s", sharded), ("v", vec)], 0.1)
    assert [(g["params"], g["weight_decay"]) for g in groups] == [([plain], 0.1), ([sharded], 0.1), ([vec], 0.0)]
    assert param_groups([], 0.1) == [{"params": [], "weight_decay": 0.0}]


def test_fused_and_for_loop_train_the_same_model(tmp_path):
    """Same losses and parameters after a few steps (the kernels differ in rounding only)."""
    runs = {}
    for impl in ("fused", "for-loop"):
        torch.manual_seed(0)
        tr = Trainer(tiny_cfg(tmp_path / impl, f"train.optimizer_impl={impl}", steps=3))
        tr.fit()
        assert tr.optimizer.param_groups[0]["fused"] is (True if impl == "fused" else None)
        runs[impl] = ([r["loss"] for r in tr.history], {k: v.detach().clone() for k, v in tr.model.state_dict().items()})
    (loss_a, sd_a), (loss_b, sd_b) = runs["fused"], runs["for-loop"]
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_memory_plan_counts_no_optimizer_temporaries_for_the_fused_kernel(tmp_path):
    fused = adamw_transient_bytes(tiny_cfg(tmp_path, "train.optimizer_impl=fused"), owned_per_layer=4)
    loop = adamw_transient_bytes(tiny_cfg(tmp_path, "train.optimizer_impl=for-loop"), owned_per_layer=4)
    foreach = adamw_transient_bytes(tiny_cfg(tmp_path, "train.optimizer_impl=foreach"), owned_per_layer=4)
    assert fused == 0 and loop >= 3 * 4 * 32 * 32 * 4  # >= 3 x the stacked experts' [4, 32, 32] fp32
    assert foreach > loop  # every tensor's sqrt at once (measured: 48 vs 24 MiB, benchmarks/optimizer_step.py)


@pytest.mark.parametrize("flags,where", [({"fused": True}, "meta"), ({"capturable": True}, "meta"),
                                         ({"foreach": False}, "cpu")])
def test_created_and_restored_step_counters_live_where_the_kernel_reads_them(flags, where):
    """Fused / capturable AdamW read `step` on the parameter's device (CUDA on a GPU: a host counter there is an
    error); the for-loop reads it on the host. `meta` stands in for the accelerator."""
    from collections import defaultdict
    from types import SimpleNamespace

    from sparsetrain.parallel.optim_state import ensure_optimizer_state
    from sparsetrain.train.state import set_optimizer_step

    p = nn.Parameter(torch.empty(2, 2, device="meta"))
    opt = SimpleNamespace(param_groups=[{"params": [p], **flags}], state=defaultdict(dict))
    ensure_optimizer_state(opt)
    assert opt.state[p]["step"].device.type == where
    set_optimizer_step(opt, torch.tensor(7.0))
    assert opt.state[p]["step"].device.type == where and opt.state[p]["step"].dtype == torch.float32
