"""Shared pytest setup: make ``tests.dist_utils`` importable however pytest is started; skip `gpu` tests without CUDA."""
from __future__ import annotations

import os
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    # Appended, not prepended: installed packages keep priority over the repo's top-level dirs
    # (kernels/, launcher/ are only meant to be imported as sparsetrain.*). Ranks started by
    # tests.dist_utils inherit sys.path, so they can import `tests.*` and the test modules too.
    sys.path.append(_ROOT)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
