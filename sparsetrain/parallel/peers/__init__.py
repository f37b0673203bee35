"""Peer MoE runtimes behind `parallel.strategy` (DeepSpeed-MoE, Megatron-Core MoE) for side-by-side benchmarks.

Each adapter lives in its own module and imports its library inside functions; the registry in
`sparsetrain.parallel` reaches them lazily, so `import sparsetrain` never pulls DeepSpeed or Megatron in.
"""
from __future__ import annotations

import os
from pathlib import Path

EXTENSIONS_DIR = Path(__file__).resolve().parents[3] / ".cache" / "torch_extensions"


def use_project_extension_cache() -> None:
    """Compiled torch extensions (DeepSpeed's CPU comm op) go to a cache inside the project unless set."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))
