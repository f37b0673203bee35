"""Fixtures shared by the checkpoint tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def six_steps(tmp_path_factory) -> tuple[Path, list[float]]:
    """An uninterrupted 6-step run with checkpoint.every=3 (read-only: tests copy what they damage)."""
    from tests.train.test_checkpoint import _run
    from tests.train.test_trainer import tiny_cfg

    out = tmp_path_factory.mktemp("full")
    tr = _run(tiny_cfg(out, "checkpoint.every=3", "moe.num_experts=4", steps=6))
    return out, [r["loss"] for r in tr.history]
