"""`sparsetrain eval` on a multi-rank run's checkpoint reproduces the val loss the run logged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsetrain.config import config_from_dict
from tests.dist_utils import run_distributed
from tests.parity_utils import small_config, train_and_collect

pytestmark = [pytest.mark.distributed]


def _train(rank: int, world: int, cfg: dict, out: str) -> None:
    train_and_collect(cfg, out)


@pytest.mark.parametrize("extra", [
    ["moe.capacity_factor=1.0"],  # each rank applied capacity to its own slice of the val batch
    ["moe.router_skew=1.2", "moe.skew_drift_every=2"],  # the routing targets of the checkpoint's step, not step 0
])
def test_eval_reproduces_the_logged_val_loss(tmp_path: Path, extra: list[str]) -> None:
    from sparsetrain.cli import _single_process_model
    from sparsetrain.data import TokenBatches
    from sparsetrain.train.offline_eval import run_slices, val_loss

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
