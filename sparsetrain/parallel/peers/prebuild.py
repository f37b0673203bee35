"""`python -m sparsetrain.parallel.peers.prebuild`: compile the peers' torch extensions once (make setup).

DeepSpeed on CPU compiles its shared-memory communication op the first time a process group starts
(about 3.5 minutes on 2 cores). This builds it into the project cache (`TORCH_EXTENSIONS_DIR`) so tests
and runs load it in seconds. Does nothing without DeepSpeed or on a CUDA machine.
"""
from __future__ import annotations

import importlib.util
import time

import torch


def main() -> None:
    """Build DeepSpeed's CPU communication op into the project extension cache."""
    if importlib.util.find_spec("deepspeed") is None or torch.cuda.is_available():
        return
    from sparsetrain.parallel.peers.deepspeed_moe import import_deepspeed

    import_deepspeed(torch.device("cpu"))
    from deepspeed.comm.torch import build_shm_op

    t0 = time.perf_counter()
    op = build_shm_op()
    print(f"deepspeed CPU comm op {'ready' if op is not None else 'not applicable'} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
