"""Importing the package (and its CLI, kernels, launcher, sparsity) pulls in no heavy optional dependency."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.unit]

MODULES = ["sparsetrain", "sparsetrain.cli", "sparsetrain.kernels", "sparsetrain.launcher", "sparsetrain.sparsity"]
HEAVY = ["ray", "deepspeed", "megatron", "pynvml", "triton"]

# torch itself imports pynvml when it is installed (torch.cuda); only what our modules add on top counts.
_PROBE = """
import json, sys
heavy = {heavy!r}
def found():
    return {{k for k in sys.modules if k.split(".")[0] in heavy}}
import torch
baseline = found()
for m in {modules!r}:
    __import__(m)
loaded = sorted(found() - baseline)
cuda = False
if "torch" in sys.modules:
    import torch
    cuda = bool(torch.cuda.is_initialized())
print(json.dumps({{"loaded": loaded, "cuda_initialized": cuda}}))
"""


def test_imports_are_light():
    code = _PROBE.format(modules=MODULES, heavy=HEAVY)
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["loaded"] == [], f"heavy modules imported by {MODULES}: {res['loaded']}"
    assert res["cuda_initialized"] is False
