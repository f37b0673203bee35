"""`sparsetrain eval` on a multi-rank run's checkpoint reproduces the val loss the run logged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsetrain.config import config_from_dict
from tests.dist_utils import run_distributed
from tests.parity_utils import small_config, train_and_collect

pytestmark = [pytest.mark.distributed]


def _train(rank: int, world: int, cfg: dict, out: str) -> None:
    train_and_collect(cfg, out)


@pytest.mark.parametrize("extra", [
    ["moe.capacity_factor=1.0"],  # each rank applied capacity to its own slice of the val batch
    ["moe.capacity_factor=1.0", "train.grad_accum=2"],  # ... in training micro-batches (2 per rank)
    ["moe.router_skew=1.2", "moe.skew_drift_every=2"],  # the routing targets of the checkpoint's step, not step 0
])
def test_eval_reproduces_the_logged_val_loss(tmp_path: Path, extra: list[str]) -> None:
    from sparsetrain.data import TokenBatches
    from sparsetrain.train.offline_eval import run_slices, val_loss
    from sparsetrain.train.offline_eval import single_process_model as _single_process_model

    cfg = small_config("parallel.strategy=ep", "launch.workers=2", "train.eval_every=4", "checkpoint.save_final=true",
                       *extra, steps=4)
    out = tmp_path / "run"
    run_distributed(_train, 2, cfg, str(out))
    logged = [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "val_loss" in r][-1]
    one = config_from_dict({**cfg, "train": {**cfg["train"], "out_dir": str(out)},
                            "parallel": {**cfg["parallel"], "strategy": "none"},
                            "launch": {**cfg["launch"], "workers": 1}})
    model, _, saved = _single_process_model(one, None)
    assert saved["step"] == 3
    got = val_loss(model, TokenBatches(one), one.data.eval_batches, run_slices(one, saved))
    assert got == pytest.approx(logged, rel=1e-5)


@pytest.mark.unit
def test_generate_from_a_workload_run_routes_per_token(tmp_path: Path) -> None:
    """A routing workload routes by quota over a forward's tokens (one token at a time with the KV cache):
    generate's model routes with the router's own top-k, so cached and full-forward logits agree."""
    from sparsetrain.model.sample import generate
    from sparsetrain.train.offline_eval import single_process_model as _single_process_model
    from sparsetrain.train.trainer import Trainer
    from tests.train.test_trainer import tiny_cfg

    cfg = tiny_cfg(tmp_path, "moe.router_skew=1.2", "checkpoint.save_final=true", steps=2)
    Trainer(cfg).fit()
    model, _, _ = _single_process_model(cfg, None, workload=False)
    assert all(m.router.workload is None for m in model.moe_layers())
    a = generate(model, [3, 14, 15, 9, 2], 8, temperature=0, use_cache=True, keep_logits=True)
    b = generate(model, [3, 14, 15, 9, 2], 8, temperature=0, use_cache=False, keep_logits=True)
    assert a.ids == b.ids
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_val_batch_that_does_not_split_is_one_config_line() -> None:
    """A val batch the run's slices (world x grad_accum in capacity mode) do not divide: a config error naming
    the fix, not a traceback."""
    from sparsetrain.config import ConfigError
    from sparsetrain.train.offline_eval import val_loss

    class FiveRows:
        def val_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.zeros(5, 4, dtype=torch.long), torch.zeros(5, 4, dtype=torch.long)

    with pytest.raises(ConfigError, match="do not split into the run's 4 slices .*data.batch_size"):
        val_loss(None, FiveRows(), 1, slices=4)
